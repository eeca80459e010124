"""Matplotlib figures of a run (PNG, headless).

Every panel has a y-axis label with its unit and says whether lower or higher is better; n (the
samples behind a bar) is in the tick labels; one legend per figure sits below the panels, never on
the data. A panel is drawn only when it says something new: a latency metric within 2 % of an
earlier panel in the same unit on every bar (TPOT and token ITL when every chunk carries one token),
or a quality metric equal to another of its task for every dtype (GSM8K strict and flexible when
they agree), is left out, and the figure says so.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SAME_RTOL = 0.02  # two panels within 2 % on every bar say the same thing


def _label(text: str, width: int = 13) -> str:
    """The exact name (underscores kept), wrapped after underscores so tick labels stay narrow."""
    lines: list[str] = []
    for piece in re.findall(r"[^_]+_?|_", str(text)):
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(lines) or str(text)


def _thousands(ax) -> None:
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:g}"))


def _same(a: pd.Series, b: pd.Series, rtol: float = SAME_RTOL) -> bool:
    a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    both = ~(np.isnan(a) | np.isnan(b))
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a[both], b[both], rtol=rtol, atol=0))


def _grouped_bars(ax, frame: pd.DataFrame, group: str, hue: str, value: str, hues: list[str],
                  tick_labels: dict[str, str] | None = None) -> list:
    groups = list(dict.fromkeys(frame[group]))
    width = 0.8 / max(1, len(hues))
    handles = []
    for i, name in enumerate(hues):
        part = frame[frame[hue] == name].drop_duplicates(group).set_index(group).reindex(groups)
        x = np.arange(len(groups)) + i * width - 0.4 + width / 2
        handles.append(ax.bar(x, part[value].to_numpy(dtype=float), width, label=str(name), color=f"C{i}"))
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([(tick_labels or {}).get(g, _label(g)) for g in groups], rotation=0, ha="center", fontsize=7)
    return handles


def _finish(fig, axes, handles, hues: list[str], title: str, note: str = "") -> None:
    fig.suptitle(title)
    if len(hues) > 1:
        fig.legend(handles, hues, loc="lower center", ncol=min(len(hues), 6), fontsize=8, title="KV dtype",
                   bbox_to_anchor=(0.5, 0.0))
    if note:
        fig.text(0.01, 0.005 if len(hues) <= 1 else 0.11, note, fontsize=7, ha="left", va="bottom")
    bottom = (0.12 if len(hues) > 1 else 0.02) + (0.04 if note else 0)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))


def capacity_plot(frame: pd.DataFrame, path: Path) -> None:
    per_dtype = frame.drop_duplicates("kv_cache_dtype")
    probed = frame[frame["probe_context_len"].notna()] if "probe_context_len" in frame else frame.iloc[0:0]
    ncols = 2 if len(probed) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(per_dtype))
    colors = [f"C{i}" for i in range(len(per_dtype))]
    predicted = per_dtype["predicted_kv_tokens"].notna().any()
    width = 0.4 if predicted else 0.6
    ax.bar(x - (0.2 if predicted else 0), per_dtype["kv_cache_tokens"].astype(float), width, color=colors,
           label="server (measured)")
    if predicted:
        ax.bar(x + 0.2, per_dtype["predicted_kv_tokens"].astype(float), 0.4, color=colors, alpha=0.45, hatch="//",
               label="planner (predicted, hatched)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=2, frameon=False)
    ax.set_xticks(x)
    ax.set_xticklabels([_label(d) for d in per_dtype["kv_cache_dtype"]], rotation=0, ha="center", fontsize=8)
    ax.set_ylabel("KV cache capacity (tokens)")
    _thousands(ax)
    ax.set_title("KV cache tokens — higher is better", fontsize=10)
    if len(probed):
        ax = axes[0][1]
        dtypes = list(dict.fromkeys(probed["kv_cache_dtype"]))
        probed = probed.assign(length=probed["probe_context_len"].map(lambda n: f"L={int(n):,}"))
        _grouped_bars(ax, probed, "length", "kv_cache_dtype", "admitted_max", dtypes)
        ax.set_ylabel("admitted concurrent requests (N)")
        ax.set_title("Admission probe per prompt length L — higher is better", fontsize=10)
        if len(dtypes) > 1:
            ax.legend(fontsize=7, title="KV dtype", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("1. KV-cache capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LATENCY_PANELS = [  # (column, y label, title)
    ("output_throughput", "output tokens/s", "Output throughput — higher is better"),
    ("tpot_ms_mean", "ms per output token", "Mean TPOT — lower is better"),
    ("itl_token_ms_mean", "ms per output token", "Mean token ITL — lower is better"),
    ("decode_tpot_ms_p50", "ms per output token", "p50 decode TPOT (no prefill in flight) — lower is better"),
    ("ttft_ms_p90", "ms", "p90 TTFT — lower is better"),
]


def latency_panels(frame: pd.DataFrame) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Panels that differ from every earlier panel in the same unit, and the names of those left out."""
    kept, dropped = [], []
    for column, unit, title in LATENCY_PANELS:
        if column not in frame or frame[column].isna().all():
            continue
        twin = next((t for c, u, t in kept if u == unit and _same(frame[c], frame[column])), None)
        if twin is not None:
            dropped.append(f"{title.split(' —')[0]} (within 2 % of {twin.split(' —')[0]} on every bar)")
            continue
        kept.append((column, unit, title))
    return kept, dropped


def latency_plot(frame: pd.DataFrame, path: Path) -> None:
    panels, dropped = latency_panels(frame)
    hues = list(dict.fromkeys(frame["kv_cache_dtype"]))
    ticks = {}
    for scenario, part in frame.groupby("scenario", sort=False):
        counts = sorted({int(n) for n in part["completed"]})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        ticks[scenario] = f"{_label(scenario)}\nn={n}"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4), squeeze=False)
    handles = []
    for ax, (column, unit, title) in zip(axes[0], panels):
        handles = _grouped_bars(ax, frame, "scenario", "kv_cache_dtype", column, hues, ticks)
        ax.set_title(textwrap.fill(title, 34), fontsize=9)
        ax.set_ylabel(unit)
        _thousands(ax)
    note = ("Not drawn: " + "; ".join(dropped) + ".") if dropped else ""
    note += (" " if note else "") + "n = measured requests per bar."
    _finish(fig, axes, handles, hues if len(hues) > 1 else [], "3. Performance per scenario", note)
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUALITY_UNITS = {  # metric -> (y label, better)
    "ppl": ("perplexity (exp mean NLL per token)", "lower is better"),
}


def quality_panels(frame: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str]]:
    metrics = list(dict.fromkeys(zip(frame["task"], frame["metric"])))
    kept, dropped = [], []
    for task, metric in metrics:
        values = frame[(frame["task"] == task) & (frame["metric"] == metric)].set_index("kv_cache_dtype")["value"]
        twin = next(((t, m) for t, m in kept if t == task and _same(
            frame[(frame["task"] == t) & (frame["metric"] == m)].set_index("kv_cache_dtype")["value"]
            .reindex(values.index), values, rtol=1e-9)), None)
        if twin is not None:
            dropped.append(f"{task} {metric} (equal to {twin[1]} for every KV dtype)")
            continue
        kept.append((task, metric))
    return kept, dropped


def quality_plot(frame: pd.DataFrame, path: Path) -> None:
    panels, dropped = quality_panels(frame)
    hues = list(dict.fromkeys(frame["kv_cache_dtype"].astype(str)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 4.0), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        part = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        ylabel, better = QUALITY_UNITS.get(metric, (f"{metric.replace('_', ' ')} (fraction, 0–1)", "higher is better"))
        n = sorted({int(v) for v in part["n"].dropna()})
        n_text = "" if not n else f", n={n[0]}" if len(n) == 1 else f", n={n[0]}–{n[-1]}"
        ax.bar([_label(d) for d in part["kv_cache_dtype"].astype(str)], part["value"].astype(float),
               yerr=part["stderr"].astype(float).fillna(0), capsize=4,
               color=[f"C{hues.index(str(d))}" for d in part["kv_cache_dtype"]])
        ax.set_title(f"{task} {metric}{n_text}\n{better}", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelsize=8)
    note = ("Not drawn: " + "; ".join(dropped) + ". ") if dropped else ""
    note += "Error bars: ± standard error."
    fig.suptitle("2. Quality per KV dtype")
    fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
