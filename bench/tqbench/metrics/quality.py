"""Quality table from raw records: ``raw/quality/<kv_cache_dtype>/{gsm8k,niah,perplexity}.jsonl``.

Accuracies carry lm-eval's standard error of a mean of 0/1 scores, sqrt(p(1-p)/(n-1)), and a 95 %
normal interval clipped to [0, 1]. Perplexity's interval comes from the spread of per-window mean
NLL (token-weighted), mapped through exp().
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tqbench.records import read_jsonl

COLUMNS = ["kv_cache_dtype", "task", "metric", "value", "stderr", "ci_low", "ci_high", "n"]
GRID_COLUMNS = ["kv_cache_dtype", "context_length", "depth", "passed", "total", "pass_rate"]
Z95 = 1.959963984540054


def _dtype_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "raw" / "quality"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def proportion_row(dtype: str, task: str, metric: str, outcomes: list[bool]) -> dict:
    n = len(outcomes)
    if n == 0:
        return {"kv_cache_dtype": dtype, "task": task, "metric": metric, "value": math.nan, "stderr": math.nan,
                "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    p = sum(outcomes) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    low, high = (max(0.0, p - Z95 * stderr), min(1.0, p + Z95 * stderr)) if n > 1 else (math.nan, math.nan)
    return {"kv_cache_dtype": dtype, "task": task, "metric": metric, "value": p, "stderr": stderr,
            "ci_low": low, "ci_high": high, "n": n}


def perplexity_row(dtype: str, records: list[dict]) -> dict:
    tokens = np.array([r["scored_tokens"] for r in records], dtype=float)
    nll = np.array([r["nll_sum"] for r in records], dtype=float)
    mean_nll = nll.sum() / tokens.sum()
    ppl = math.exp(mean_nll)
    if len(records) > 1:
        # Weighted standard error of the per-window mean NLL (windows are the independent samples).
        per_window = nll / tokens
        weights = tokens / tokens.sum()
        variance = np.sum(weights * (per_window - mean_nll) ** 2) * len(records) / (len(records) - 1)
        se_nll = math.sqrt(variance / len(records))
        low, high = math.exp(mean_nll - Z95 * se_nll), math.exp(mean_nll + Z95 * se_nll)
        stderr = ppl * se_nll  # delta method
    else:
        stderr = low = high = math.nan
    return {"kv_cache_dtype": dtype, "task": "perplexity", "metric": "ppl", "value": ppl, "stderr": stderr,
            "ci_low": low, "ci_high": high, "n": int(tokens.sum())}


def summarize(run_dir: Path) -> pd.DataFrame:
    """One row per (kv_cache_dtype, task, metric); ``n`` = questions, probes, or scored tokens (perplexity)."""
    rows = []
    for cell in _dtype_dirs(run_dir):
        dtype = cell.name
        gsm8k = [r for r in read_jsonl(cell / "gsm8k.jsonl") if "error" not in r]
        if gsm8k:
            rows.append(proportion_row(dtype, "gsm8k", "exact_match_strict", [r["exact_match_strict"] for r in gsm8k]))
            rows.append(proportion_row(dtype, "gsm8k", "exact_match_flexible",
                                       [r["exact_match_flexible"] for r in gsm8k]))
        niah = [r for r in read_jsonl(cell / "niah.jsonl") if "passed" in r]
        if niah:
            rows.append(proportion_row(dtype, "niah", "pass_rate", [r["passed"] for r in niah]))
        ppl = list(read_jsonl(cell / "perplexity.jsonl"))
        if ppl:
            rows.append(perplexity_row(dtype, ppl))
    return pd.DataFrame(rows, columns=COLUMNS)


def summarize_niah_grid(run_dir: Path) -> pd.DataFrame:
    """NIAH pass counts per (kv_cache_dtype, context_length, depth); skipped probes are left out."""
    records = [dict(r, kv_cache_dtype=cell.name) for cell in _dtype_dirs(run_dir)
               for r in read_jsonl(cell / "niah.jsonl") if "passed" in r]
    if not records:
        return pd.DataFrame(columns=GRID_COLUMNS)
    frame = pd.DataFrame(records)
    grid = (frame.groupby(["kv_cache_dtype", "context_length", "depth"])["passed"]
            .agg(passed="sum", total="count").reset_index())
    grid["passed"] = grid["passed"].astype(int)
    grid["pass_rate"] = grid["passed"] / grid["total"]
    return grid[GRID_COLUMNS]
