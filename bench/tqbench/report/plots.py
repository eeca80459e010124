"""Matplotlib figures of a run (PNG, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _grouped_bars(ax, frame: pd.DataFrame, group: str, hue: str, value: str, err: str | None = None) -> None:
    groups = list(dict.fromkeys(frame[group]))
    hues = list(dict.fromkeys(frame[hue]))
    width = 0.8 / max(1, len(hues))
    for i, name in enumerate(hues):
        part = frame[frame[hue] == name].set_index(group).reindex(groups)
        x = np.arange(len(groups)) + i * width - 0.4 + width / 2
        errors = part[err].to_numpy(dtype=float) if err and err in part else None
        ax.bar(x, part[value].to_numpy(dtype=float), width, yerr=errors, label=str(name), capsize=3)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)


def capacity_plot(frame: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(frame))
    ax.bar(x - 0.2, frame["kv_cache_tokens"].astype(float), 0.4, label="server (measured)")
    if "predicted_kv_tokens" in frame and frame["predicted_kv_tokens"].notna().any():
        ax.bar(x + 0.2, frame["predicted_kv_tokens"].astype(float), 0.4, label="planner (predicted)", hatch="//")
    ax.set_xticks(x)
    ax.set_xticklabels(frame["kv_cache_dtype"], rotation=20, ha="right")
    ax.set_ylabel("KV cache tokens")
    ax.set_title("1. KV-cache capacity per KV dtype")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_plot(frame: pd.DataFrame, path: Path) -> None:
    panels = [("output_throughput", "output tok/s (higher is better)"), ("tpot_ms_mean", "mean TPOT ms"),
              ("ttft_ms_p90", "p90 TTFT ms"), ("itl_token_ms_mean", "mean token ITL ms")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (column, title) in zip(axes, panels):
        _grouped_bars(ax, frame, "scenario", "kv_cache_dtype", column)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("3. Performance per scenario")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quality_plot(frame: pd.DataFrame, path: Path) -> None:
    metrics = list(dict.fromkeys(zip(frame["task"], frame["metric"])))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.8), squeeze=False)
    for ax, (task, metric) in zip(axes[0], metrics):
        part = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        ax.bar(part["kv_cache_dtype"].astype(str), part["value"].astype(float),
               yerr=part["stderr"].astype(float).fillna(0), capsize=4)
        ax.set_title(f"{task} {metric}", fontsize=10)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle("2. Quality per KV dtype (± stderr)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
