"""Run directory -> report.md (three tables + glossary), CSVs, PNG plots and manifest.json.

Everything is recomputed from the raw JSONL under ``raw/`` and the provenance in ``run.json``, so
``tqbench report RUN_DIR`` can regenerate a report at any time (also from a partial run).
"""
from __future__ import annotations

import json
import math
import numbers
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from tqbench.metrics import summarize_part
from tqbench.report.glossary import GLOSSARY
from tqbench.report.manifest import now_iso

PERF_COLUMNS = [  # (header, column, higher_is_better)
    ("Req/s", "request_throughput", True), ("OutTok/s", "output_throughput", True),
    ("TTFT", "ttft_ms_mean", False), ("TPOT", "tpot_ms_mean", False), ("ITL", "itl_ms_mean", False),
    ("p90 TTFT", "ttft_ms_p90", False), ("p90 TPOT", "tpot_ms_p90", False), ("p99 TTFT", "ttft_ms_p99", False),
]


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, (list, dict)):
        return str(value)
    try:
        if value is None or pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        pass
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        return f"{int(value):,}" if value.is_integer() and abs(value) >= 1000 else f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: Any, base: Any) -> str:
    try:
        value, base = float(value), float(base)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "–"
    return f"{value / base:.2f}×"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _baseline(run_info: dict, dtypes: list[str]) -> str | None:
    config = run_info.get("config", {})
    wanted = config.get("baseline") or (config.get("kv_cache_dtypes") or [None])[0]
    return wanted if wanted in dtypes else (dtypes[0] if dtypes else None)


def _dtype_order(run_info: dict, *frames: pd.DataFrame | None) -> list[str]:
    order = list((run_info.get("config") or {}).get("kv_cache_dtypes", []))
    for frame in frames:
        if frame is not None:
            order += [d for d in frame["kv_cache_dtype"].astype(str) if d not in order]
    return list(dict.fromkeys(order))


def _failure_note(failures: list[dict], part: str) -> str:
    lines = [f"- **FAIL** `{f['kv_cache_dtype']}`: {f['error'].splitlines()[0][:300]}" for f in failures if f["part"] == part]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def capacity_section(frame: pd.DataFrame | None, why: str | None, run_info: dict, failures: list[dict]) -> str:
    out = ["## 1. KV-CACHE COMPRESSION", ""]
    if frame is None:
        out.append(f"_No capacity data: {why}._")
    else:
        base = _baseline(run_info, list(frame["kv_cache_dtype"]))
        base_row = frame[frame["kv_cache_dtype"] == base].iloc[0] if base in set(frame["kv_cache_dtype"]) else None
        rows = []
        for _, r in frame.iterrows():
            rows.append([
                f"`{r['kv_cache_dtype']}`", _fmt(r.get("kv_cache_tokens")),
                _ratio(r.get("kv_cache_tokens"), base_row.get("kv_cache_tokens") if base_row is not None else None),
                _fmt(r.get("max_concurrency")), _fmt(r.get("max_model_len")), _fmt(r.get("predicted_kv_tokens")),
                _ratio(r.get("kv_cache_tokens"), r.get("predicted_kv_tokens")),
                f"{_fmt(r.get('admitted_max'))} @ {_fmt(r.get('probe_context_len'))}", _fmt(r.get("preemptions")),
            ])
        out.append(_table(["KV dtype", "KV cache tokens", f"vs {base}", "Max concurrency", "max_model_len",
                           "Predicted tokens", "measured/predicted", "Admitted N @ len", "Preemptions"], rows))
    out.append(_failure_note(failures, "capacity"))
    return "\n".join(out)


def quality_section(frame: pd.DataFrame | None, why: str | None, run_info: dict, failures: list[dict]) -> str:
    out = ["## 2. QUALITY (PPL / NIAH pass@total / GSM8K exact-match)", ""]
    if (run_info.get("part_models") or {}).get("quality"):  # merged run: quality served by another model
        out += [f"Model for this section: `{run_info['part_models']['quality']}` (not `{run_info.get('model')}`).", ""]
    if frame is None:
        out.append(f"_No quality data: {why}._")
    else:
        dtypes = list(dict.fromkeys(frame["kv_cache_dtype"].astype(str)))
        base = _baseline(run_info, dtypes)
        metrics = list(dict.fromkeys(zip(frame["task"], frame["metric"])))
        lookup = {(r["kv_cache_dtype"], r["task"], r["metric"]): r for _, r in frame.iterrows()}
        headers = ["KV dtype"]
        for task, metric in metrics:
            headers += [f"{task} {metric}", "Δ vs base"]
        rows = []
        for dtype in dtypes:
            row = [f"`{dtype}`"]
            for task, metric in metrics:
                r, b = lookup.get((dtype, task, metric)), lookup.get((base, task, metric))
                if r is None:
                    row += ["–", "–"]
                    continue
                cell = _fmt(r["value"], 4) + (f" ± {_fmt(r['stderr'], 4)}" if pd.notna(r.get("stderr")) else "")
                n = r.get("n")
                cell += f" (n={int(n)})" if pd.notna(n) else ""
                delta = "–" if b is None else f"{float(r['value']) - float(b['value']):+.4f}"
                row += [cell, delta]
            rows.append(row)
        out.append(_table(headers, rows))
        out.append("\nValues ± standard error; 95 % intervals are in `quality.csv` (ci_low, ci_high).")
    out.append(_failure_note(failures, "quality"))
    return "\n".join(out)


def bench_serve_command(row: pd.Series, run_info: dict) -> str:
    argv = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", run_info.get("base_url") or "http://127.0.0.1:8000",
            "--endpoint", "/v1/completions", "--model", run_info.get("model") or "MODEL", "--dataset-name", "random",
            "--random-input-len", str(row["input_len"]), "--random-output-len", str(row["output_len"]),
            "--num-prompts", str(row["num_prompts"]), "--max-concurrency", str(row["concurrency"]),
            "--request-rate", "inf" if math.isinf(row["request_rate"]) else str(row["request_rate"]),
            "--burstiness", str(row.get("burstiness", 1.0)), "--ignore-eos",
            "--seed", str((run_info.get("config") or {}).get("seed", 0)),
            "--num-warmups", str(((run_info.get("config") or {}).get("latency") or {}).get("num_warmups", 0)),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]
    return shlex.join(argv)


def latency_section(frame: pd.DataFrame | None, why: str | None, run_info: dict, failures: list[dict]) -> str:
    out = ["## 3. PERFORMANCE", ""]
    if frame is None:
        out.append(f"_No latency data: {why}._")
        out.append(_failure_note(failures, "latency"))
        return "\n".join(out)
    base = _baseline(run_info, list(dict.fromkeys(frame["kv_cache_dtype"])))
    out.append(f"Latencies in ms (mean unless marked). Ratio columns divide by `{base}`. "
               "ITL/tok = token-accurate ITL (see glossary).\n")
    for scenario in dict.fromkeys(frame["scenario"]):
        part = frame[frame["scenario"] == scenario]
        first = part.iloc[0]
        rate = "" if math.isinf(first["request_rate"]) else f", rate={first['request_rate']:g}/s, burstiness={first['burstiness']:g}"
        out.append(f"--- {scenario} (ISL={first['input_len']}, OSL={first['output_len']}, N={first['num_prompts']}, "
                   f"C={first['concurrency']}{rate}) ---\n")
        base_rows = part[part["kv_cache_dtype"] == base]
        base_row = base_rows.iloc[0] if len(base_rows) else None
        rows = []
        for _, r in part.iterrows():
            row = [f"`{r['kv_cache_dtype']}`"] + [_fmt(r[c]) for _, c, _ in PERF_COLUMNS]
            row += [_fmt(r["itl_token_ms_mean"]), f"{r['completed']}/{r['completed'] + r['failed']}"]
            row += [_ratio(r["output_throughput"], None if base_row is None else base_row["output_throughput"]),
                    _ratio(r["tpot_ms_mean"], None if base_row is None else base_row["tpot_ms_mean"]),
                    _ratio(r["ttft_ms_mean"], None if base_row is None else base_row["ttft_ms_mean"])]
            rows.append(row)
        headers = ["KV dtype"] + [h for h, _, _ in PERF_COLUMNS] + ["ITL/tok", "ok/total", "OutTok/s vs base",
                                                                   "TPOT vs base", "TTFT vs base"]
        out.append(_table(headers, rows))
        out.append(f"\nReproduce with: `{bench_serve_command(first, run_info)}`\n")
    out.append(_failure_note(failures, "latency"))
    return "\n".join(out)


def _manifest(run_dir: Path, run_info: dict, frames: dict[str, pd.DataFrame | None]) -> dict[str, Any]:
    servers = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "raw" / "server").glob("*.json"))}
    versions = sorted({s.get("vllm_version") for s in servers.values() if s.get("vllm_version")})
    digests = sorted({d for s in servers.values() for d in s.get("image_digests") or []})
    return {
        "generated": now_iso(),
        "started": run_info.get("started"),
        "model": run_info.get("model"),
        "target": run_info.get("target"),
        "stack": run_info.get("stack"),
        "vllm_version": versions[0] if len(versions) == 1 else versions or None,
        **(run_info.get("provenance") or {}),
        "image_digest": (run_info.get("provenance") or {}).get("image_digest") or (digests[0] if len(digests) == 1
                                                                                    else digests or None),
        "servers": servers,
        "config": run_info.get("config"),
        "invocations": run_info.get("invocations", []),
        "rows": {part: (0 if frame is None else len(frame)) for part, frame in frames.items()},
    }


def build_report(run_dir: Path) -> Path:
    """Regenerate every report artefact of ``run_dir`` from its raw data; returns report.md."""
    from tqbench.report import plots
    from tqbench.runner import open_failures

    run_dir = Path(run_dir)
    if not (run_dir / "raw").exists() and not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a tqbench run directory (no raw/ or run.json)")
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    failures = open_failures(run_dir)
    capacity, capacity_why = summarize_part("capacity", run_dir)
    quality, quality_why = summarize_part("quality", run_dir)
    latency, latency_why = summarize_part("latency", run_dir)
    order = _dtype_order(run_info, capacity, quality, latency)
    if latency is not None:  # scenarios in config order, not directory order
        known = [s["name"] for s in ((run_info.get("config") or {}).get("latency") or {}).get("scenarios", [])]
        rank = {name: i for i, name in enumerate(known + [n for n in latency["scenario"] if n not in known])}
        latency = latency.sort_values("scenario", key=lambda col: col.map(rank), kind="stable")
    for name, frame in (("capacity", capacity), ("quality", quality), ("latency", latency)):
        if frame is not None:
            frame = frame.assign(_order=frame["kv_cache_dtype"].map({d: i for i, d in enumerate(order)}))
            frame = frame.sort_values("_order", kind="stable").drop(columns="_order")
            frame.to_csv(run_dir / f"{name}.csv", index=False)
            if name == "capacity":
                capacity = frame
            elif name == "quality":
                quality = frame
            else:
                latency = frame
        elif (run_dir / f"{name}.csv").exists():
            (run_dir / f"{name}.csv").unlink()
    niah_grid, _ = summarize_part("quality", run_dir, "summarize_niah_grid")
    if niah_grid is not None:
        niah_grid.to_csv(run_dir / "niah_grid.csv", index=False)

    plot_notes = []
    for name, frame, draw in (("capacity", capacity, plots.capacity_plot), ("quality", quality, plots.quality_plot),
                              ("latency", latency, plots.latency_plot)):
        if frame is not None:
            try:
                draw(frame, run_dir / f"{name}.png")
                plot_notes.append(f"![{name}]({name}.png)")
            except Exception as exc:  # a plot must never cost the tables
                plot_notes.append(f"_{name} plot failed: {type(exc).__name__}: {exc}_")

    config = run_info.get("config") or {}
    provenance = run_info.get("provenance") or {}
    head = [
        f"# tqbench report: {config.get('name', '?')} — {run_info.get('model', '?')}",
        "",
        f"- target: {run_info.get('target', '?')}",
        f"- started: {run_info.get('started', '?')}; report generated: {now_iso()}",
        f"- tqstack commit: {(provenance.get('tqstack') or {}).get('commit')}; patch series: "
        f"{(provenance.get('patch_series') or {}).get('series_sha256')}",
        f"- GPUs: {', '.join(g.get('name') or '?' for g in provenance.get('gpus') or []) or 'none detected on the client'}",
        f"- KV dtypes: {', '.join(order)}; baseline: `{_baseline(run_info, order)}`",
        "",
    ]
    if failures:
        head += ["**Unfinished cells** (see raw/failures.jsonl; rerun the same command to resume):", ""]
        head += [f"- `{f['kv_cache_dtype']}` / {f['part']}: {f['kind']} — {f['error'].splitlines()[0][:300]}"
                 for f in failures]
        head.append("")
    body = [
        capacity_section(capacity, capacity_why, run_info, failures),
        quality_section(quality, quality_why, run_info, failures),
        latency_section(latency, latency_why, run_info, failures),
        "## Plots\n\n" + ("\n\n".join(plot_notes) if plot_notes else "_No data to plot._"),
        "## Glossary\n\n" + GLOSSARY,
    ]
    report = run_dir / "report.md"
    report.write_text("\n".join(head) + "\n" + "\n\n".join(body) + "\n")
    manifest = _manifest(run_dir, run_info, {"capacity": capacity, "quality": quality, "latency": latency})
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return report
