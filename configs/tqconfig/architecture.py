"""Architecture facts the capacity planner needs, read from a Hugging Face config.json.

Handles the three layouts tqstack serves: Gemma 4 (sliding + full attention with a different head size on
full layers, K=V full layers, YOCO KV sharing), Qwen3.5/3.6 (Gated DeltaNet + full attention) and plain
dense decoders. Both Gemma 4 spellings of the full-layer shape are accepted: the hub keys
(`global_head_dim`, `num_global_key_value_heads`) and transformers 5.x `per_layer_config`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

LayerKind = Literal["full_attention", "sliding_attention", "linear_attention"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class AttentionLayer:
    index: int
    kind: LayerKind  # full_attention or sliding_attention
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    # Index of the layer whose KV cache this layer reads (YOCO); None if it owns its cache.
    kv_source: int | None = None

    @property
    def owns_kv(self) -> bool:
        return self.kv_source is None


@dataclass(frozen=True)
class GatedDeltaNetState:
    """Per-layer recurrent state of a Gated DeltaNet (linear attention) layer."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    ssm_dtype_bytes: int  # fp32 by default (mamba_ssm_dtype)
    conv_dtype_bytes: int = 2  # bf16

    def bytes_per_gpu(self, tensor_parallel_size: int) -> int:
        value_heads = self.num_value_heads // tensor_parallel_size
        key_heads = self.num_key_heads // tensor_parallel_size
        ssm = value_heads * self.key_head_dim * self.value_head_dim * self.ssm_dtype_bytes
        conv_channels = 2 * key_heads * self.key_head_dim + value_heads * self.value_head_dim
        conv = conv_channels * (self.conv_kernel - 1) * self.conv_dtype_bytes
        return ssm + conv


@dataclass(frozen=True)
class Architecture:
    source: str
    model_type: str
    num_layers: int
    layer_kinds: tuple[LayerKind, ...]
    attention_layers: tuple[AttentionLayer, ...]
    gdn_state: GatedDeltaNetState | None
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    k_eq_v: bool
    num_kv_shared_layers: int

    @property
    def is_hybrid(self) -> bool:
        return self.gdn_state is not None

    @cached_property
    def linear_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind == "linear_attention")

    @cached_property
    def full_attention_indices(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.attention_layers if layer.kind == "full_attention")

    def layer(self, index: int) -> AttentionLayer:
        for layer in self.attention_layers:
            if layer.index == index:
                return layer
        raise KeyError(index)


def _layer_kinds(text: dict, num_layers: int) -> tuple[LayerKind, ...]:
    layer_types = text.get("layer_types")
    if layer_types is None and text.get("full_attention_interval"):
        interval = text["full_attention_interval"]
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
        ]
    if layer_types is None:
        layer_types = ["full_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
    kinds: list[LayerKind] = []
    for i, kind in enumerate(layer_types):
        if kind in ("full_attention", "attention"):
            kinds.append("full_attention")
        elif kind in ("sliding_attention", "sliding_window"):
            kinds.append("sliding_attention")
        elif kind in ("linear_attention", "mamba"):
            kinds.append("linear_attention")
        else:
            raise ValueError(f"layer_types[{i}] = {kind!r} is not one of full_attention, sliding_attention, linear_attention")
    return tuple(kinds)


def _kv_sources(kinds: tuple[LayerKind, ...], num_kv_shared_layers: int) -> dict[int, int]:
    """Gemma 4 YOCO: the last `num_kv_shared_layers` layers read the cache of the last earlier layer of the
    same attention type (as vLLM's gemma4.py resolves `kv_sharing_target_layer_name`)."""
    if num_kv_shared_layers <= 0:
        return {}
    first_shared = len(kinds) - num_kv_shared_layers
    sources: dict[int, int] = {}
    for index in range(first_shared, len(kinds)):
        kind = kinds[index]
        owners = [i for i in range(first_shared) if kinds[i] == kind]
        if not owners:
            raise ValueError(f"layer {index} ({kind}) shares KV but no earlier {kind} layer owns a cache")
        sources[index] = owners[-1]
    return sources


def load_architecture(config_path: Path) -> Architecture:
    data = json.loads(Path(config_path).read_text())
    text = data.get("text_config") or data
    num_layers = int(text["num_hidden_layers"])
    kinds = _layer_kinds(text, num_layers)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    full_head_dim = int(text.get("global_head_dim") or head_dim)
    full_kv_heads = kv_heads
    if k_eq_v and text.get("num_global_key_value_heads"):
        full_kv_heads = int(text["num_global_key_value_heads"])
    per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
    window = text.get("sliding_window")
    shared = int(text.get("num_kv_shared_layers") or 0)
    sources = _kv_sources(kinds, shared)

    layers: list[AttentionLayer] = []
    for index, kind in enumerate(kinds):
        if kind == "linear_attention":
            continue
        if kind == "full_attention":
            heads, dim = full_kv_heads, full_head_dim
        else:
            heads, dim = kv_heads, head_dim
        override = per_layer.get(index, {})
        heads = int(override.get("num_key_value_heads", heads))
        dim = int(override.get("head_dim", dim))
        layers.append(
            AttentionLayer(
                index=index,
                kind=kind,
                num_kv_heads=heads,
                head_dim=dim,
                sliding_window=int(window) if kind == "sliding_attention" else None,
                kv_source=sources.get(index),
            )
        )

    gdn = None
    if "linear_attention" in kinds:
        gdn = GatedDeltaNetState(
            num_key_heads=int(text["linear_num_key_heads"]),
            num_value_heads=int(text["linear_num_value_heads"]),
            key_head_dim=int(text["linear_key_head_dim"]),
            value_head_dim=int(text["linear_value_head_dim"]),
            conv_kernel=int(text["linear_conv_kernel_dim"]),
            ssm_dtype_bytes=_DTYPE_BYTES[text.get("mamba_ssm_dtype", "float32")],
        )

    return Architecture(
        source=str(config_path),
        model_type=str(text.get("model_type", data.get("model_type", ""))),
        num_layers=num_layers,
        layer_kinds=kinds,
        attention_layers=tuple(layers),
        gdn_state=gdn,
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        max_position_embeddings=int(text["max_position_embeddings"]),
        k_eq_v=k_eq_v,
        num_kv_shared_layers=shared,
    )
