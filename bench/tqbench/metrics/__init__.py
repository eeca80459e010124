"""Raw JSONL -> pandas DataFrames, one module per part.

``latency`` is the harness core's; ``quality`` and ``capacity`` belong to their parts and are
imported lazily, so a missing or broken part never prevents a report of the others.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd


def summarize_part(part: str, run_dir: Path, function: str = "summarize") -> tuple[pd.DataFrame | None, str | None]:
    """(frame, None) or (None, why there is no data) for ``tqbench.metrics.<part>.<function>``."""
    try:
        module = importlib.import_module(f"tqbench.metrics.{part}")
        frame = getattr(module, function)(Path(run_dir))
    except (ImportError, AttributeError) as exc:
        return None, f"the {part} metrics module is not available ({exc})"
    except Exception as exc:  # a broken part must not block the report of the others
        return None, f"summarising {part} failed: {type(exc).__name__}: {exc}"
    if frame is None or len(frame) == 0:
        return None, f"no {part} data in this run"
    return frame, None
