"""Shared types passed between the runner and the benchmark parts (latency, quality, capacity)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server (vLLM) under test."""

    base_url: str  # e.g. "http://127.0.0.1:8000" (no trailing /v1)
    model: str  # served model name, sent as "model" in requests
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class CellContext:
    """Everything one (kv_cache_dtype, part) cell of the benchmark matrix needs.

    A part writes its raw results incrementally under ``raw_dir`` (JSON lines, via
    ``tqbench.records``) and marks the cell finished with ``records.mark_done`` so that
    a rerun skips it.
    """

    endpoint: Endpoint
    kv_cache_dtype: str
    part: str  # "capacity" | "quality" | "latency"
    run_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)  # this part's settings from the bench config
    seed: int = 0
    server_log: Path | None = None  # log of the server the runner started, if any
    stack: Any = None  # tqconfig stack object when the runner launched one from configs/

    @property
    def raw_dir(self) -> Path:
        path = self.run_dir / "raw" / self.part / self.kv_cache_dtype
        path.mkdir(parents=True, exist_ok=True)
        return path
