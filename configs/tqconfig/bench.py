"""Benchmark matrix configuration (``configs/bench/*.yaml``) as pydantic models.

A bench config says which KV-cache dtypes to compare, which parts to run (capacity, quality,
latency) and the settings of each part. ``load_bench_config`` turns a name or a path into a
validated ``BenchConfig`` and reports the first bad field in one sentence.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tqconfig.schema import TURBOQUANT_DTYPES

BENCH_CONFIG_DIR = Path(__file__).resolve().parents[1] / "bench"

# The kv-cache dtypes vLLM 0.26.0 accepts (vllm/config/cache.py CacheDType) that make sense to compare.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", *TURBOQUANT_DTYPES)
PARTS = ("capacity", "quality", "latency")
Part = Literal["capacity", "quality", "latency"]


class BenchConfigError(ValueError):
    """A bench config file or option is invalid; the message names the field and the valid values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scenario(_Strict):
    """One latency scenario, with the same meaning as the matching ``vllm bench serve`` flags."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input_len: int = Field(gt=0, description="prompt tokens per request (--random-input-len)")
    output_len: int = Field(gt=0, description="generated tokens per request, ignore_eos (--random-output-len)")
    num_prompts: int = Field(gt=0, description="measured requests (--num-prompts)")
    concurrency: int = Field(gt=0, description="max requests in flight (--max-concurrency)")
    request_rate: float = Field(
        default=math.inf, gt=0, description="open-loop arrivals per second; inf = closed loop (--request-rate)"
    )
    burstiness: float = Field(default=1.0, gt=0, description="gamma shape of inter-arrival times; 1 = Poisson")
    when_too_long: Literal["fail", "skip"] = Field(
        default="fail", description="input_len + output_len above the server's max_model_len: 'fail' the latency "
                                    "cell, or 'skip' the scenario with the reason in the report (long-context "
                                    "scenarios that only some stacks can serve)")

    @property
    def closed_loop(self) -> bool:
        return math.isinf(self.request_rate)

    def label(self) -> str:
        return f"{self.name} (ISL={self.input_len}, OSL={self.output_len}, N={self.num_prompts}, C={self.concurrency})"


class LatencySettings(_Strict):
    scenarios: list[Scenario] = Field(min_length=1)
    num_warmups: int = Field(default=2, ge=0, description="warm-up requests per scenario, excluded from metrics")
    workers: int = Field(default=0, ge=0, description="0 = one locust process; N = locust master + N workers")
    request_timeout_s: float = Field(default=600.0, gt=0)
    temperature: float = Field(default=0.0, ge=0)

    @field_validator("scenarios")
    @classmethod
    def _unique_names(cls, scenarios: list[Scenario]) -> list[Scenario]:
        names = [s.name for s in scenarios]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scenario names must be unique, repeated: {dupes}")
        return scenarios


class PartSettings(BaseModel):
    """Settings for the quality and capacity parts; their modules own the meaning of each key."""

    model_config = ConfigDict(extra="allow")


class ServerSettings(_Strict):
    health_timeout_s: float = Field(default=1800.0, gt=0, description="how long to wait for /health after launch")
    max_model_len: int | None = Field(default=None, gt=0)
    extra_args: list[str] = Field(default_factory=list, description="appended to the vllm serve argv")


class BenchConfig(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    kv_cache_dtypes: list[str] = Field(min_length=1)
    baseline: str | None = Field(default=None, description="dtype the ratio columns divide by; default: first")
    parts: list[Part] = Field(default_factory=lambda: list(PARTS), min_length=1)
    server: ServerSettings = Field(default_factory=ServerSettings)
    latency: LatencySettings | None = None
    quality: PartSettings = Field(default_factory=PartSettings)
    capacity: PartSettings = Field(default_factory=PartSettings)

    @field_validator("kv_cache_dtypes")
    @classmethod
    def _known_dtypes(cls, dtypes: list[str]) -> list[str]:
        for dtype in dtypes:
            if dtype not in KV_CACHE_DTYPES:
                raise ValueError(f"unknown kv cache dtype {dtype!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
        if len(set(dtypes)) != len(dtypes):
            raise ValueError("kv cache dtypes must not repeat")
        return dtypes

    @model_validator(mode="after")
    def _consistent(self) -> "BenchConfig":
        if self.baseline is not None and self.baseline not in self.kv_cache_dtypes:
            raise ValueError(f"baseline {self.baseline!r} must be one of kv_cache_dtypes {self.kv_cache_dtypes}")
        if "latency" in self.parts and self.latency is None:
            raise ValueError("parts includes 'latency' but the config has no 'latency:' section with scenarios")
        return self

    @property
    def baseline_dtype(self) -> str:
        return self.baseline or self.kv_cache_dtypes[0]

    def part_settings(self, part: str) -> dict[str, Any]:
        section = getattr(self, part)
        return section.model_dump() if section is not None else {}

    def select(self, *, kv_cache_dtypes: list[str] | None = None, parts: list[str] | None = None,
               scenarios: list[str] | None = None) -> "BenchConfig":
        """A copy restricted to the given dtypes / parts / scenario names (each validated)."""
        data = self.model_dump()
        if kv_cache_dtypes:
            data["kv_cache_dtypes"] = kv_cache_dtypes
            if data.get("baseline") not in kv_cache_dtypes:
                data["baseline"] = None
        if parts:
            data["parts"] = parts
        if scenarios:
            known = [s["name"] for s in (data.get("latency") or {}).get("scenarios", [])]
            unknown = [s for s in scenarios if s not in known]
            if unknown:
                raise BenchConfigError(f"scenarios: unknown {unknown}; this config has {known}")
            data["latency"]["scenarios"] = [s for s in data["latency"]["scenarios"] if s["name"] in scenarios]
        return _validate(data, source="command-line selection")


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: field '{where}': {err['msg']}{shown}"


def _validate(data: Any, source: str) -> BenchConfig:
    if not isinstance(data, dict):
        raise BenchConfigError(f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}")
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as exc:
        raise BenchConfigError(_format_error(exc, source)) from None


def available_bench_configs() -> list[str]:
    return sorted(p.stem for p in BENCH_CONFIG_DIR.glob("*.yaml"))


def load_bench_config(name_or_path: str | Path) -> BenchConfig:
    """Load ``configs/bench/<name>.yaml`` or an explicit YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BENCH_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise BenchConfigError(
            f"bench config {str(name_or_path)!r} not found; give a YAML path or one of {available_bench_configs()}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BenchConfigError(f"{path}: not valid YAML: {exc}") from None
    return _validate(data, source=str(path))
