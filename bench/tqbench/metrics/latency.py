"""Latency metrics from raw per-request records, with ``vllm bench serve`` definitions.

Per request (successful requests only; a failed request counts in ``failed`` and the duration):
- TTFT  = first chunk carrying ``choices`` - start
- E2EL  = last chunk carrying ``choices`` - start
- TPOT  = (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output token
- ITL   = gaps between successive ``choices`` chunks, pooled over all requests (one sample per chunk)
- token ITL = the same gaps split evenly over the tokens the later chunk carried (one sample per
  token after the first chunk), so servers that coalesce tokens into one chunk are not flattered
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
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el", "itl_token")
COLUMNS = [
    "kv_cache_dtype", "scenario", "input_len", "output_len", "num_prompts", "concurrency", "request_rate",
    "burstiness", "completed", "failed", "duration_s", "request_throughput", "output_throughput",
    "total_token_throughput",
    *[f"{m}_ms_{s}" for m in LATENCY_METRICS for s in ("mean", *[f"p{p}" for p in PERCENTILES])],
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
            "tpot_ms": np.nan, "itl_ms": [], "itl_token_ms": [],
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
        rows.append(row)
    return pd.DataFrame(rows)


def _stats(values: pd.Series) -> dict[str, float]:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return {"mean": np.nan, **{f"p{p}": np.nan for p in PERCENTILES}}
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


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
