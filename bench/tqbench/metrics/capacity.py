"""Capacity table from raw records: ``raw/capacity/<kv_cache_dtype>/{server,planner,probe}.jsonl``.

One row per (KV dtype, probe length): the server facts repeat on every row of a dtype.
``admitted_max`` is recomputed from the probe steps (largest admitted N at that probe length),
``refused_min`` is the smallest refused N above it, ``preemptions`` the preemptions the probe
caused over all its steps at that length (the refused steps should hold them all).
``admitted_tokens`` = admitted_max x probe length: KV tokens actually held by admitted requests.
``skipped`` (from ``probe_skipped.jsonl``) lists probe lengths that were not run and why.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tqbench.records import read_jsonl

COLUMNS = ["kv_cache_dtype", "kv_cache_tokens", "max_concurrency", "max_model_len", "num_gpu_blocks", "block_size",
           "predicted_kv_tokens", "predicted_max_concurrency", "probe_context_len", "admitted_max", "preemptions",
           "refused_min", "admitted_tokens", "probe_steps", "kv_cache_tokens_source", "planner_note"]


def summarize(run_dir: Path) -> pd.DataFrame:
    root = Path(run_dir) / "raw" / "capacity"
    rows = []
    for cell in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        server = next(read_jsonl(cell / "server.jsonl"), None)
        if server is None:
            continue
        planner = next(read_jsonl(cell / "planner.jsonl"), {})
        steps = list(read_jsonl(cell / "probe.jsonl"))
        row = {"kv_cache_dtype": cell.name, **{k: server.get(k) for k in (
            "kv_cache_tokens", "max_concurrency", "max_model_len", "num_gpu_blocks", "block_size",
            "kv_cache_tokens_source")},
               "predicted_kv_tokens": planner.get("predicted_kv_tokens"),
               "predicted_max_concurrency": planner.get("predicted_max_concurrency"),
               "planner_note": planner.get("note"), "probe_steps": len(steps)}
        lengths = list(dict.fromkeys(s["context_len"] for s in steps))
        if not lengths:
            rows.append(row)
        for context_len in lengths:
            at_len = [s for s in steps if s["context_len"] == context_len]
            admitted = max((s["n"] for s in at_len if s["admitted"]), default=0)
            refused = [s["n"] for s in at_len if not s["admitted"] and s["n"] > admitted]
            rows.append({**row, "probe_context_len": context_len, "admitted_max": admitted,
                         "refused_min": min(refused, default=None), "admitted_tokens": admitted * context_len,
                         "preemptions": sum(s["preemptions"] for s in at_len), "probe_steps": len(at_len)})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("admitted_max", "refused_min", "probe_context_len", "preemptions", "num_gpu_blocks", "block_size",
                   "kv_cache_tokens", "predicted_kv_tokens", "max_model_len", "admitted_tokens"):
        frame[column] = frame[column].astype("Int64")
    return frame


def skipped(run_dir: Path) -> pd.DataFrame:
    """Probe lengths that were not run, with the reason (``probe_skipped.jsonl`` of every dtype)."""
    root = Path(run_dir) / "raw" / "capacity"
    rows = [r for path in sorted(root.glob("*/probe_skipped.jsonl")) for r in read_jsonl(path)] if root.exists() else []
    return pd.DataFrame(rows, columns=["kv_cache_dtype", "context_len", "reason"])
