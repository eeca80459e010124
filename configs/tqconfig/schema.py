"""Typed profiles: hardware (a rig), model (a checkpoint) and stack (rig x model x serving settings).

The YAML files under configs/hardware, configs/models and configs/stacks are validated against these
models; unknown keys are rejected so a typo never silently falls back to a default.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Every KV-cache dtype tqstack serves. "auto" = the checkpoint dtype (bf16 for these models).
TURBOQUANT_DTYPES = (
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", *TURBOQUANT_DTYPES)
KvCacheDtype = Literal[
    "auto",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
]

NAME_PATTERN = r"^[a-z0-9][a-z0-9.\-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryDefaults(Strict):
    gpu_memory_utilization: float = Field(gt=0.0, le=0.98)
    # CUDA/XPU context, NCCL/oneCCL buffers and CUDA-graph pools per GPU: vLLM takes these out of the
    # gpu_memory_utilization budget before sizing the KV cache. Measured-ballpark, not exact.
    runtime_overhead_gib: float = Field(ge=0.0, le=8.0)


class Hardware(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str
    vendor: Literal["nvidia", "intel"]
    arch: str = Field(description="CUDA compute capability (sm_86, sm_120) or Intel GPU family (xe2)")
    gpu_name: str
    gpu_count: int = Field(ge=1, le=8)
    # Total memory of one GPU as the runtime reports it (torch.cuda.mem_get_info / xpu), in GiB.
    gpu_memory_gib: float = Field(gt=0.0, le=256.0)
    interconnect: Literal["single", "pcie", "pcie-no-p2p", "nvlink"]
    image: str
    dockerfile: str
    supported_kv_cache_dtypes: tuple[KvCacheDtype, ...]
    # dtype -> why it cannot run on this rig (shown verbatim in the refusal).
    refused_kv_cache_dtypes: dict[KvCacheDtype, str] = Field(default_factory=dict)
    defaults: MemoryDefaults
    environment: dict[str, str] = Field(default_factory=dict)
    serve_args: tuple[str, ...] = ()

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, value: str) -> str:
        if not re.fullmatch(r"sm_\d{2,3}|xe2", value):
            raise ValueError(f"{value!r} is not a known arch; use sm_<NN> (e.g. sm_86, sm_120) or xe2")
        return value

    @model_validator(mode="after")
    def _refused_not_supported(self) -> "Hardware":
        both = set(self.refused_kv_cache_dtypes) & set(self.supported_kv_cache_dtypes)
        if both:
            raise ValueError(f"kv dtypes {sorted(both)} are listed both as supported and as refused")
        return self

    @property
    def total_memory_gib(self) -> float:
        return self.gpu_memory_gib * self.gpu_count


class Weights(Strict):
    format: str = Field(description="checkpoint dtype / quantization, e.g. bf16, fp8-block, int4-autoround")
    # Approximate on-GPU sizes in GiB, from parameter counts x bytes/param (see `note`). The planner splits
    # `sharded_gib` across tensor-parallel ranks and loads `replicated_gib` on every rank.
    sharded_gib: float = Field(gt=0.0)
    replicated_gib: float = Field(ge=0.0, default=0.0)
    # Vision/audio towers, skipped when the stack serves language only (--language-model-only).
    multimodal_gib: float = Field(ge=0.0, default=0.0)
    approximate: bool = True
    note: str = ""


class ChatSettings(Strict):
    reasoning_parser: str | None = None
    # Sent as --default-chat-template-kwargs; benchmarks run with thinking off.
    default_chat_template_kwargs: dict[str, bool | int | str] = Field(default_factory=dict)


class ModelProfile(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str
    hf_id: str = Field(pattern=r"^[\w.\-]+/[\w.\-]+$")
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")
    served_model_name: str
    tokenizer: str
    # Directory under configs/hf/ holding the architecture config.json the planner reads.
    hf_config: str
    weights: Weights
    chat: ChatSettings = ChatSettings()
    serve_args: tuple[str, ...] = ()


class Serving(Strict):
    kv_cache_dtype: KvCacheDtype
    # --turboquant-boundary-layers (tqstack patch 0011): the first/last N TurboQuant-eligible layers
    # (cache-owning full-attention layers) stay bf16; 0 disables. Unset = the engine default, 2.
    turboquant_boundary_layers: int | None = Field(default=None, ge=0, le=64)
    max_model_len: int = Field(ge=256, le=1_048_576)
    tensor_parallel_size: int = Field(ge=1, le=8)
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=0.98)
    max_num_seqs: int = Field(ge=1, le=1024)
    max_num_batched_tokens: int = Field(ge=16, le=131_072)
    enable_prefix_caching: bool | None = None
    language_model_only: bool = False
    extra_args: tuple[str, ...] = ()


class StackProfile(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str
    hardware: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=NAME_PATTERN)
    serving: Serving
    environment: dict[str, str] = Field(default_factory=dict)
