"""Capacity table from raw records: ``raw/capacity/<kv_cache_dtype>/{server,planner,probe}.jsonl``.

``admitted_max`` is recomputed from the probe steps (largest admitted N at the probe length),
``refused_min`` is the smallest refused N above it, ``preemptions`` the preemptions the probe
caused over all its steps (the refused steps should hold them all).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tqbench.records import read_jsonl

COLUMNS = ["kv_cache_dtype", "kv_cache_tokens", "max_concurrency", "max_model_len", "num_gpu_blocks", "block_size",
           "predicted_kv_tokens", "predicted_max_concurrency", "probe_context_len", "admitted_max", "preemptions",
           "refused_min", "probe_steps", "kv_cache_tokens_source", "planner_note"]


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
        if steps:
            context_len = steps[-1]["context_len"]
            at_len = [s for s in steps if s["context_len"] == context_len]
            admitted = max((s["n"] for s in at_len if s["admitted"]), default=0)
            refused = [s["n"] for s in at_len if not s["admitted"] and s["n"] > admitted]
            row.update(probe_context_len=context_len, admitted_max=admitted, refused_min=min(refused, default=None),
                       preemptions=sum(s["preemptions"] for s in at_len))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("admitted_max", "refused_min", "probe_context_len", "preemptions", "num_gpu_blocks", "block_size",
                   "kv_cache_tokens", "predicted_kv_tokens", "max_model_len"):
        frame[column] = frame[column].astype("Int64")
    return frame
