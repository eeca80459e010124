"""Latency metrics from raw per-request records, with ``vllm bench serve`` definitions.

Per request (successful requests only; a failed request counts in ``failed`` and the duration):
- TTFT  = first chunk carrying ``choices`` - start
- E2EL  = last chunk carrying ``choices`` - start
- TPOT  = (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output token
- ITL   = gaps between successive ``choices`` chunks, pooled over all requests (one sample per chunk)
- token ITL = the same gaps split evenly over the tokens the later chunk carried (one sample per
  token after the first chunk), so servers that coalesce tokens into one chunk are not flattered
Decode and prefill phases, separately (chunked prefill otherwise mixes prefill into TPOT):
- decode TPOT = per request, the token gaps during which *no* request of the scenario was in
  prefill (between its send and its first token) divided by the tokens they carried; with all
  requests sent together this is every decode step after the last prefill ended. Decode tok/s per
  user = 1000 / decode TPOT. Requests whose every gap overlapped some prefill have no sample.
- prefill throughput = prompt tokens of completed requests / the time at least one prefill was in
  flight (union of the send -> first token windows); TTFT per 1K = TTFT / (prompt tokens / 1000).
Run level: duration = first send (or the open-loop schedule's time zero) to the last request end;
request/output/total-token throughput = completed requests / output tokens / (prompt + output)
tokens of completed requests, divided by the duration. Percentiles interpolate linearly
(``numpy.percentile`` default, as vLLM).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from tqbench.records import is_done, read_jsonl

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el", "itl_token", "decode_tpot")
COLUMNS = [
    "kv_cache_dtype", "scenario", "input_len", "output_len", "num_prompts", "concurrency", "request_rate",
    "burstiness", "completed", "failed", "duration_s", "request_throughput", "output_throughput",
    "total_token_throughput",
    *[f"{m}_ms_{s}" for m in LATENCY_METRICS for s in ("mean", *[f"p{p}" for p in PERCENTILES])],
    "decode_requests", "decode_tok_s_per_user_p50", "prefill_tok_s", "ttft_per_1k_ms_p50",
]


def output_tokens(record: dict[str, Any]) -> int:
    """Server usage when present, else the sum of per-chunk token deltas."""
    if record.get("completion_tokens") is not None:
        return int(record["completion_tokens"])
    return int(sum(record.get("chunk_tokens") or []))


def request_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per measured (non-warm-up) request with its per-request latencies in ms."""
    rows = []
    for r in records:
        if r.get("warmup"):
            continue
        ok = bool(r.get("ok")) and bool(r.get("chunk_ns"))
        row = {
            "request_id": r.get("request_id"), "ok": ok, "start_ns": r["start_ns"], "end_ns": r["end_ns"],
            "t0_ns": r.get("t0_ns"), "prompt_tokens": r.get("prompt_tokens") or 0,
            "output_tokens": output_tokens(r) if ok else 0, "ttft_ms": np.nan, "e2el_ms": np.nan,
            "tpot_ms": np.nan, "itl_ms": [], "itl_token_ms": [], "first_ns": np.nan, "gap_from_ns": [],
            "gap_to_ns": [], "gap_tokens": [],
        }
        if ok:
            chunks = np.asarray(r["chunk_ns"], dtype=np.int64)
            tokens = np.asarray(r["chunk_tokens"], dtype=np.int64)
            row["ttft_ms"] = (chunks[0] - r["start_ns"]) / 1e6
            row["e2el_ms"] = (chunks[-1] - r["start_ns"]) / 1e6
            if row["output_tokens"] > 1:
                row["tpot_ms"] = (row["e2el_ms"] - row["ttft_ms"]) / (row["output_tokens"] - 1)
            row["itl_ms"] = (np.diff(chunks) / 1e6).tolist()
            bearing = chunks[tokens > 0]  # token ITL: only chunks that brought tokens
            counts = tokens[tokens > 0]
            gaps = np.diff(bearing) / 1e6
            row["itl_token_ms"] = np.repeat(gaps / counts[1:], counts[1:]).tolist() if len(gaps) else []
            row["first_ns"] = int(chunks[0])
            row["gap_from_ns"], row["gap_to_ns"], row["gap_tokens"] = (bearing[:-1].tolist(), bearing[1:].tolist(),
                                                                       counts[1:].tolist())
        rows.append(row)
    return pd.DataFrame(rows)


def _stats(values: pd.Series) -> dict[str, float]:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return {"mean": np.nan, **{f"p{p}": np.nan for p in PERCENTILES}}
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def _merged(windows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Union of [start, end) windows as sorted, disjoint (starts, ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(windows):
        if starts and start <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def phase_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """Decode-phase TPOT (gaps with no prefill in flight) and prefill throughput; see the module docstring."""
    done = frame[frame["ok"]]
    out: dict[str, Any] = {"decode_requests": 0, "decode_tok_s_per_user_p50": np.nan, "prefill_tok_s": np.nan,
                           "ttft_per_1k_ms_p50": np.nan}
    if done.empty:
        return out
    starts, ends = _merged([(int(s), int(f)) for s, f in zip(done["start_ns"], done["first_ns"])])
    decode_tpot = []
    for _, r in done.iterrows():
        a = np.asarray(r["gap_from_ns"], dtype=np.int64)
        b = np.asarray(r["gap_to_ns"], dtype=np.int64)
        n = np.asarray(r["gap_tokens"], dtype=np.int64)
        if not len(a):
            continue
        j = np.searchsorted(starts, b, side="left") - 1  # last prefill window starting before the gap ends
        overlaps = (j >= 0) & (ends[np.clip(j, 0, None)] > a)
        clean = ~overlaps
        if clean.any() and n[clean].sum() > 0:
            decode_tpot.append((b[clean] - a[clean]).sum() / 1e6 / n[clean].sum())
    decode = pd.Series(decode_tpot, dtype=float)
    for stat, value in _stats(decode).items():
        out[f"decode_tpot_ms_{stat}"] = value
    out["decode_requests"] = int(len(decode))
    if len(decode):
        out["decode_tok_s_per_user_p50"] = float(np.percentile(1000.0 / decode, 50))
    busy_s = (ends - starts).sum() / 1e9
    prompt = done["prompt_tokens"].astype(float)
    if busy_s > 0 and prompt.sum() > 0:
        out["prefill_tok_s"] = float(prompt.sum() / busy_s)
    per_1k = (done["ttft_ms"] / (prompt / 1000.0))[prompt > 0]
    if len(per_1k):
        out["ttft_per_1k_ms_p50"] = float(np.percentile(per_1k, 50))
    return out


def scenario_metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Run-level metrics of one (kv dtype, scenario) from its raw records."""
    frame = request_frame(records)
    if frame.empty:
        raise ValueError("no measured requests")
    done = frame[frame["ok"]]
    start = frame["start_ns"].min()
    if frame["t0_ns"].notna().any():
        start = min(start, frame["t0_ns"].dropna().min())
    duration_s = (frame["end_ns"].max() - start) / 1e9
    out: dict[str, Any] = {
        "completed": int(len(done)),
        "failed": int(len(frame) - len(done)),
        "duration_s": float(duration_s),
        "request_throughput": len(done) / duration_s,
        "output_throughput": done["output_tokens"].sum() / duration_s,
        "total_token_throughput": (done["prompt_tokens"].sum() + done["output_tokens"].sum()) / duration_s,
    }
    samples = {
        "ttft": done["ttft_ms"], "tpot": done["tpot_ms"], "e2el": done["e2el_ms"],
        "itl": done["itl_ms"].explode(), "itl_token": done["itl_token_ms"].explode(),
    }
    for metric, values in samples.items():
        for stat, value in _stats(values).items():
            out[f"{metric}_ms_{stat}"] = value
    out.update(phase_metrics(frame))
    return out


def scenario_dirs(run_dir: Path) -> Iterable[tuple[str, Path]]:
    for spec_path in sorted((Path(run_dir) / "raw" / "latency").glob("*/*/scenario.json")):
        yield spec_path.parent.parent.name, spec_path.parent


def load_records(scenario_dir: Path) -> list[dict[str, Any]]:
    return [r for path in sorted(scenario_dir.glob("requests*.jsonl")) for r in read_jsonl(path)]


def summarize(run_dir: Path) -> pd.DataFrame:
    """One row per finished (DONE) (kv_cache_dtype, scenario); unfinished ones stay raw only."""
    rows = []
    for dtype, scenario_dir in scenario_dirs(run_dir):
        if not is_done(scenario_dir):
            continue
        spec = json.loads((scenario_dir / "scenario.json").read_text())
        records = load_records(scenario_dir)
        if not any(not r.get("warmup") for r in records):
            continue
        scenario = spec["scenario"]
        rows.append({
            "kv_cache_dtype": dtype, "scenario": scenario["name"], "input_len": scenario["input_len"],
            "output_len": scenario["output_len"], "num_prompts": scenario["num_prompts"],
            "concurrency": scenario["concurrency"], "request_rate": float(scenario["request_rate"]),
            "burstiness": scenario.get("burstiness", 1.0), **scenario_metrics(records),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def skipped(run_dir: Path) -> pd.DataFrame:
    """Scenarios that were skipped (``when_too_long: skip``), with the reason."""
    rows = []
    for dtype, scenario_dir in scenario_dirs(run_dir):
        spec = json.loads((scenario_dir / "scenario.json").read_text())
        if spec.get("skipped"):
            rows.append({"kv_cache_dtype": dtype, "scenario": spec["scenario"]["name"], "reason": spec["skipped"]})
    return pd.DataFrame(rows, columns=["kv_cache_dtype", "scenario", "reason"])
