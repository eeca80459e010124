"""KV-cache capacity planner: how a stack's GPU memory splits into weights, overhead and KV cache, and how
many tokens / concurrent max-length requests that KV cache holds — without importing vLLM.

It mirrors the patched vLLM 0.26.0 (tqstack patch series) decisions:
- which layers get TurboQuant: sliding-window layers never (P4), boundary layers stay bf16 (patch 0011,
  `--turboquant-boundary-layers N`: the first/last N TurboQuant-eligible layers, i.e. cache-owning
  full-attention layers, at most half of them rounded up), and a YOCO cluster (a cache owner plus the
  layers reading it) is skipped together if any member is (P8);
- per-token slot bytes of TurboQuant (`TurboQuantConfig.slot_size_aligned`);
- page sizes: TurboQuant blocks grow until their page covers every other page, the others are padded up
  to it (P7); without TurboQuant, vLLM's own block scaling / hybrid block alignment;
- KV-cache groups and the shared block pool (`_get_kv_cache_groups_uniform_page_size`);
- per-request admission: full layers cdiv(len, block), sliding layers (window - 1 + in-flight tokens)
  blocks + 1 (bounded, patch 0010), Gated DeltaNet one state page (two with prefix caching, "align");
- TurboQuant side memory: the recent window (patch 0014) is allocated with the model, so it comes out of
  the KV-cache memory like weights; the anchors (patch 0012) sit beside the KV cache, in the headroom.
Next to it, the number an unpatched vLLM reports (sliding layers budgeted at full context).
Memory overheads (activations, CUDA graphs, NCCL, context) are estimates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from .architecture import Architecture
from .errors import KvCacheDtypeRefused, PlanInputError
from .schema import KV_CACHE_DTYPES, TURBOQUANT_DTYPES, Hardware, ModelProfile

GIB = 1024**3
KERNEL_BLOCK = 16  # smallest attention block vLLM uses on these backends (FA / Triton: multiple of 16)
# --turboquant-boundary-layers when a stack does not set it (patch 0011: CacheConfig default, unset = 2)
BOUNDARY_LAYERS = 2
# the engine's exact recent window per request in TurboQuant layers (patch 0014: TURBOQUANT_RECENT_TOKENS)
TURBOQUANT_RECENT_TOKENS = 128

# (key bits, value bits) of vLLM 0.26 TQ_PRESETS; 8 key bits = FP8 keys.
_TQ_BITS = {
    "turboquant_k8v4": (8, 4),
    "turboquant_4bit_nc": (4, 4),
    "turboquant_k3v4_nc": (3, 4),
    "turboquant_3bit_nc": (3, 3),
}


def tq_slot_bytes(kv_cache_dtype: str, head_dim: int) -> int:
    """Packed bytes per KV head per token (key + value) of a TurboQuant preset, rounded up to even."""
    if kv_cache_dtype not in _TQ_BITS:
        raise PlanInputError("kv_cache_dtype", kv_cache_dtype, f"one of {', '.join(TURBOQUANT_DTYPES)}")
    key_bits, value_bits = _TQ_BITS[kv_cache_dtype]
    key = head_dim if key_bits == 8 else math.ceil(head_dim * key_bits / 8) + 2  # + fp16 norm
    value = math.ceil(head_dim * value_bits / 8) + 4  # + fp16 scale and zero
    slot = key + value
    return slot + slot % 2


def plain_bytes_per_head(kv_cache_dtype: str, head_dim: int) -> int:
    """K and V bytes per head per token for an unquantized / fp8 cache (vLLM stores V even when K=V)."""
    element = 1 if kv_cache_dtype.startswith("fp8") else 2
    return 2 * head_dim * element


def full_attention_bytes_per_token(arch: Architecture, kv_cache_dtype: str) -> int:
    """Whole-model KV bytes per token of the cache-owning full-attention layers, every one of them at
    `kv_cache_dtype` (no boundary protection, no padding): the textbook number to compare dtypes with."""
    total = 0
    for layer in arch.attention_layers:
        if layer.kind == "full_attention" and layer.owns_kv:
            per_head = (tq_slot_bytes(kv_cache_dtype, layer.head_dim) if kv_cache_dtype in TURBOQUANT_DTYPES
                        else plain_bytes_per_head(kv_cache_dtype, layer.head_dim))
            total += layer.num_kv_heads * per_head
    return total


def sliding_bytes_per_token(arch: Architecture, kv_cache_dtype: str = "auto") -> int:
    """Whole-model KV bytes per token of the cache-owning sliding-window layers (kept bf16/fp8)."""
    return sum(layer.num_kv_heads * plain_bytes_per_head(kv_cache_dtype, layer.head_dim)
               for layer in arch.attention_layers if layer.kind == "sliding_attention" and layer.owns_kv)


def turboquant_eligible_layers(arch: Architecture) -> list[int]:
    """Layers TurboQuant compresses unless skipped: cache-owning full-attention layers (patch 0011's
    `get_turboquant_eligible_layer_indices`: not sliding-window, not Gated DeltaNet, not YOCO readers)."""
    return [layer.index for layer in arch.attention_layers if layer.kind == "full_attention" and layer.owns_kv]


def boundary_protected_layers(arch: Architecture, boundary_layers: int) -> list[int]:
    """The first and last `boundary_layers` eligible layers (patch 0011), at most half of the eligible
    layers rounded up: `boundary_layers` per side is capped at (eligible + 1) // 4."""
    if boundary_layers < 0:
        raise PlanInputError("turboquant_boundary_layers", boundary_layers, "a non-negative integer (0 disables)")
    eligible = turboquant_eligible_layers(arch)
    per_side = min(boundary_layers, (len(eligible) + 1) // 4)
    if per_side <= 0:
        return []
    return eligible[:per_side] + eligible[len(eligible) - per_side:]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class LayerPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    kind: str  # full_attention | sliding_attention | linear_attention
    kv_dtype: str  # the layer's own cache dtype: a turboquant preset, "bf16", "fp8", or "shared"
    reason: str
    kv_heads_per_gpu: int = 0
    head_dim: int = 0
    bytes_per_token: int = 0  # per GPU, unpadded
    block_size: int = 0
    page_bytes: int = 0  # per GPU, unpadded
    padded_page_bytes: int = 0


class CapacityPlan(BaseModel):
    """Capacity of one (model, hardware, serving settings) point. Byte figures are per GPU unless named
    `*_all_gpus`; tokens and concurrency are per server."""

    model_config = ConfigDict(frozen=True)

    model: str
    hardware: str
    kv_cache_dtype: str
    turboquant_boundary_layers: int  # --turboquant-boundary-layers (used with turboquant_* dtypes only)
    max_model_len: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_num_seqs: int | None
    max_num_batched_tokens: int

    gpu_memory_bytes: int
    memory_budget_bytes: int
    weight_bytes: int
    activation_bytes: int
    runtime_overhead_bytes: int
    kv_cache_memory_bytes: int
    kv_cache_memory_given: bool

    layers: list[LayerPlan]
    turboquant_layers: list[int]
    bf16_full_attention_layers: list[int]
    sliding_layers: list[int]
    shared_kv_layers: list[int]
    linear_attention_layers: list[int]

    growing_bytes_per_token: float  # full-attention layers, with page padding and group padding
    growing_bytes_per_token_all_gpus_unpadded: int
    sliding_bytes_per_sequence: int
    gdn_state_bytes_per_sequence: int
    fixed_bytes_per_sequence: int  # sliding windows + Gated DeltaNet state
    page_bytes: int
    group_size: int
    num_kv_cache_groups: int
    num_blocks: int
    # tqstack's TurboQuant anchors (patch 0012: exact sink key/value and key centre per request): one table
    # per KV-cache tensor holding a TurboQuant layer, num_blocks x KV heads x 3 x head_dim x 2 bytes (an upper
    # bound: min(TurboQuant layers, group_size) tables). vLLM's memory profile does not count it, so it comes
    # out of the (1 - gpu_memory_utilization) headroom.
    turboquant_anchor_bytes: int = 0
    # tqstack's TurboQuant recent window (patch 0014: the newest TURBOQUANT_RECENT_TOKENS tokens of every running
    # request kept exact): per cache-owning TurboQuant layer, max_num_seqs x TURBOQUANT_RECENT_TOKENS x KV heads x
    # (fp16 key + fp16 value + two int32 tags = 4 x head_dim + 8) bytes. Allocated when the model is built, so
    # vLLM's memory profile counts it like weights: it is subtracted from kv_cache_memory_bytes (unless given).
    turboquant_recent_window_bytes: int = 0
    page_padding_fraction: float  # bytes lost to padding / bytes allocated per max-length request
    bytes_per_sequence: int  # one max_model_len request

    max_concurrency: float
    kv_cache_tokens: int  # as vLLM logs "GPU KV cache size" = max_concurrency x max_model_len
    reported_bytes_per_token: float  # unpatched vLLM: sliding layers budgeted at full context
    reported_max_concurrency: float
    reported_kv_cache_tokens: int

    fits: bool
    reasons: list[str]

    def summary(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"{self.model} on {self.hardware} ({self.kv_cache_dtype}, {self.max_model_len:,} tokens, "
            f"TP={self.tensor_parallel_size}): {verdict}; {self.kv_cache_memory_bytes / GIB:.2f} GiB KV per GPU, "
            f"{self.kv_cache_tokens:,} tokens, max concurrency {self.max_concurrency:.2f}x"
        )


@dataclass
class _Spec:
    """One KV-cache spec type (layers sharing it form vLLM KV-cache groups)."""

    key: tuple
    kind: str
    bytes_per_token: int  # 0 for state (GDN) specs
    state_bytes: int
    block_size: int
    page_bytes: int
    window: int | None
    layers: list[int]


def _layer_decisions(arch: Architecture, kv_cache_dtype: str,
                     boundary_layers: int = BOUNDARY_LAYERS) -> dict[int, tuple[str, str]]:
    """Cache dtype and reason for each attention layer index."""
    decisions: dict[int, tuple[str, str]] = {}
    plain = "fp8" if kv_cache_dtype.startswith("fp8") else "bf16"
    if kv_cache_dtype not in TURBOQUANT_DTYPES:
        for layer in arch.attention_layers:
            decisions[layer.index] = (plain, f"--kv-cache-dtype {kv_cache_dtype}")
        return decisions

    boundary = set(boundary_protected_layers(arch, boundary_layers))
    per_side = len(boundary) // 2
    boundary_why = (f"boundary protection: first/last {per_side} TurboQuant-eligible (cache-owning "
                    f"full-attention) layers (--turboquant-boundary-layers {boundary_layers}, tqstack P6 + 0011)")

    skipped: dict[int, str] = {}
    for layer in arch.attention_layers:
        if layer.kind == "sliding_attention":
            skipped[layer.index] = "sliding-window layer: TurboQuant has no sliding-window kernel (tqstack P4)"
        elif layer.index in boundary:
            skipped[layer.index] = boundary_why

    # YOCO: an owner and its readers must share one dtype, so one skipped member skips the cluster.
    clusters: dict[int, list[int]] = {}
    for layer in arch.attention_layers:
        owner = layer.kv_source if layer.kv_source is not None else layer.index
        clusters.setdefault(owner, []).append(layer.index)
    for owner, members in clusters.items():
        if len(members) > 1 and any(m in skipped for m in members):
            trigger = min(m for m in members if m in skipped)
            for member in members:
                skipped.setdefault(
                    member,
                    f"YOCO cluster {members} shares one cache; layer {trigger} is skipped (tqstack P8)",
                )

    for layer in arch.attention_layers:
        if layer.index in skipped:
            decisions[layer.index] = ("bf16", skipped[layer.index])
        else:
            decisions[layer.index] = (kv_cache_dtype, "TurboQuant")
    return decisions


def _largest_block_within(bytes_per_token: int, page: int, divides: int | None) -> int:
    """Largest multiple of KERNEL_BLOCK (dividing `divides` when given) whose page fits in `page`."""
    best = KERNEL_BLOCK
    block = KERNEL_BLOCK
    while block * bytes_per_token <= page:
        if divides is None or divides % block == 0:
            best = block
        block += KERNEL_BLOCK
    return best


def _plan_pages(specs: list[_Spec], turboquant: bool) -> int:
    """Choose block sizes and the common page size (in place). Returns the page size in bytes."""
    attention = [s for s in specs if s.bytes_per_token]
    states = [s for s in specs if s.state_bytes]
    state_page = max((s.state_bytes for s in states), default=0)
    tq_specs = [s for s in attention if s.key[1] in TURBOQUANT_DTYPES]

    if turboquant and tq_specs:
        # P7 (patch 0009, the page planner): the TurboQuant block grows (multiples of 16) until its page covers every other
        # page at the kernel block; other layers take the largest multiple-of-16 block that divides it and fits
        # in the page, and are padded up to it.
        target = max([s.bytes_per_token * KERNEL_BLOCK for s in attention] + [state_page])
        tq_bpt = max(s.bytes_per_token for s in tq_specs)
        tq_block = _round_up(math.ceil(target / tq_bpt), KERNEL_BLOCK)
        page = tq_bpt * tq_block
        for spec in attention:
            if spec in tq_specs:
                spec.block_size = tq_block
            else:
                spec.block_size = _largest_block_within(spec.bytes_per_token, page, tq_block)
    elif states:
        # vLLM hybrid alignment: attention block grows until its page covers the state page.
        attn_bpt = max(s.bytes_per_token for s in attention)
        block = _round_up(math.ceil(state_page / attn_bpt), KERNEL_BLOCK)
        page = attn_bpt * block
        for spec in attention:
            spec.block_size = _largest_block_within(spec.bytes_per_token, page, None)
    else:
        # vLLM unify_kv_cache_spec_page_size: scale smaller pages by block size, else pad.
        page = max(s.bytes_per_token * KERNEL_BLOCK for s in attention)
        for spec in attention:
            small = spec.bytes_per_token * KERNEL_BLOCK
            spec.block_size = KERNEL_BLOCK * (page // small) if page % small == 0 else KERNEL_BLOCK
    for spec in attention:
        spec.page_bytes = spec.bytes_per_token * spec.block_size
    for spec in states:
        spec.page_bytes = spec.state_bytes
        spec.block_size = 0
    return page


def _group_layout(specs: list[_Spec]) -> tuple[int, list[tuple[_Spec, int]]]:
    """vLLM groups each spec type into groups of `group_size` layers (padding the last one)."""
    counts = [len(s.layers) for s in specs]
    group_size = min(counts)
    if max(counts) < group_size * 1.5:
        group_size = max(counts)
    groups = [(spec, math.ceil(len(spec.layers) / group_size)) for spec in specs]
    return group_size, groups


def _blocks_per_request(spec: _Spec, length: int, in_flight: int, state_pages: int, bounded: bool) -> int:
    if spec.state_bytes:
        return state_pages
    if spec.window is not None and bounded:
        return math.ceil(min(spec.window - 1 + in_flight, length) / spec.block_size) + 1
    return math.ceil(length / spec.block_size)


def _activation_bytes(arch: Architecture, tp: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """Peak of vLLM's profiling forward pass: residual/attention buffers and the MLP of one chunk, plus the
    fp32 logits and probabilities of the sampler warm-up. An estimate."""
    per_token = 4 * arch.hidden_size + 3 * arch.intermediate_size // tp
    forward = max_num_batched_tokens * per_token * 2
    sampler = max_num_seqs * arch.vocab_size * 4 * 2
    return forward + sampler


def plan_capacity(
    model: ModelProfile,
    hardware: Hardware,
    *,
    kv_cache_dtype: str,
    max_model_len: int,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    enable_prefix_caching: bool = False,
    language_model_only: bool = False,
    architecture: Architecture | None = None,
    turboquant_boundary_layers: int | None = None,
) -> CapacityPlan:
    """Predict the KV-cache capacity of `model` served on `hardware` with these settings (see module doc)."""
    from .loader import architecture_for  # local import: loader imports this module's errors

    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise PlanInputError("kv_cache_dtype", kv_cache_dtype, f"one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype in hardware.refused_kv_cache_dtypes:
        raise KvCacheDtypeRefused(hardware.name, kv_cache_dtype, hardware.refused_kv_cache_dtypes[kv_cache_dtype],
                                  hardware.supported_kv_cache_dtypes)
    if kv_cache_dtype not in hardware.supported_kv_cache_dtypes:
        raise KvCacheDtypeRefused(hardware.name, kv_cache_dtype, "not in the hardware profile's supported_kv_cache_dtypes",
                                  hardware.supported_kv_cache_dtypes)
    if not 0.0 < gpu_memory_utilization <= 0.98:
        raise PlanInputError("gpu_memory_utilization", gpu_memory_utilization, "a fraction in (0, 0.98]")
    if not 1 <= tensor_parallel_size <= hardware.gpu_count:
        raise PlanInputError("tensor_parallel_size", tensor_parallel_size,
                             f"1..{hardware.gpu_count} (GPUs in {hardware.name})")
    if max_model_len < 1:
        raise PlanInputError("max_model_len", max_model_len, "a positive token count")
    boundary_layers = BOUNDARY_LAYERS if turboquant_boundary_layers is None else turboquant_boundary_layers
    if isinstance(boundary_layers, bool) or not isinstance(boundary_layers, int) or boundary_layers < 0:
        raise PlanInputError("turboquant_boundary_layers", boundary_layers,
                             "a non-negative integer (0 disables boundary protection)")

    arch = architecture or architecture_for(model)
    tp = tensor_parallel_size
    seqs = max_num_seqs or 256
    batched = max_num_batched_tokens or 8192
    reasons: list[str] = []
    fits = True

    # --- memory split per GPU ---------------------------------------------------------------------------
    gpu_bytes = int(hardware.gpu_memory_gib * GIB)
    budget = int(gpu_bytes * gpu_memory_utilization)
    w = model.weights
    weight_bytes = int((w.sharded_gib / tp + w.replicated_gib + (0 if language_model_only else w.multimodal_gib)) * GIB)
    activation = _activation_bytes(arch, tp, batched, seqs)
    overhead = int(hardware.defaults.runtime_overhead_gib * GIB)
    given = kv_cache_memory_bytes is not None

    # --- per-layer dtypes and bytes -----------------------------------------------------------------------
    decisions = _layer_decisions(arch, kv_cache_dtype, boundary_layers)
    layer_plans: dict[int, LayerPlan] = {}
    spec_by_key: dict[tuple, _Spec] = {}
    unpadded_all_gpus = 0
    for layer in arch.attention_layers:
        dtype, why = decisions[layer.index]
        if not layer.owns_kv:
            layer_plans[layer.index] = LayerPlan(
                index=layer.index, kind=layer.kind, kv_dtype="shared",
                reason=f"reads layer {layer.kv_source}'s cache (YOCO, no cache of its own); {why}",
                head_dim=layer.head_dim)
            continue
        heads = max(1, layer.num_kv_heads // tp)
        per_head = tq_slot_bytes(dtype, layer.head_dim) if dtype in TURBOQUANT_DTYPES else plain_bytes_per_head(
            kv_cache_dtype if dtype == "fp8" else "auto", layer.head_dim)
        bpt = heads * per_head
        if layer.kind == "full_attention":
            unpadded_all_gpus += layer.num_kv_heads * per_head
        key = (layer.kind, dtype, bpt, layer.sliding_window)
        spec = spec_by_key.setdefault(key, _Spec(key, layer.kind, bpt, 0, 0, 0, layer.sliding_window, []))
        spec.layers.append(layer.index)
        layer_plans[layer.index] = LayerPlan(index=layer.index, kind=layer.kind, kv_dtype=dtype, reason=why,
                                             kv_heads_per_gpu=heads, head_dim=layer.head_dim, bytes_per_token=bpt)

    # TurboQuant recent window (patch 0014): every cache-owning TurboQuant layer (YOCO readers are "shared")
    # allocates it with the model, before vLLM profiles memory, so it leaves the KV cache like weights do.
    recent_window_bytes = sum(seqs * TURBOQUANT_RECENT_TOKENS * p.kv_heads_per_gpu * (4 * p.head_dim + 8)
                              for p in layer_plans.values() if p.kv_dtype in TURBOQUANT_DTYPES)
    kv_memory = (int(kv_cache_memory_bytes) if given
                 else budget - weight_bytes - recent_window_bytes - activation - overhead)

    state_pages = 2 if enable_prefix_caching else 1  # prefix caching puts hybrids in mamba "align" mode
    gdn_bytes = 0
    if arch.gdn_state is not None:
        for name, count in (("heads", arch.gdn_state.num_value_heads), ("key heads", arch.gdn_state.num_key_heads)):
            if count % tp:
                fits = False
                reasons.append(f"Gated DeltaNet {name} ({count}) are not divisible by tensor_parallel_size {tp}")
        gdn_bytes = arch.gdn_state.bytes_per_gpu(tp)
        spec = _Spec(("linear_attention", "state", 0, None), "linear_attention", 0, gdn_bytes, 0, 0, None,
                     list(arch.linear_layer_indices))
        spec_by_key[spec.key] = spec
        for index in arch.linear_layer_indices:
            layer_plans[index] = LayerPlan(index=index, kind="linear_attention",
                                           kv_dtype="fp32 state" if arch.gdn_state.ssm_dtype_bytes == 4 else "state",
                                           reason="Gated DeltaNet recurrent + conv state, one copy per sequence",
                                           bytes_per_token=0)

    specs = list(spec_by_key.values())
    turboquant = kv_cache_dtype in TURBOQUANT_DTYPES
    in_flight = batched  # one batch in flight (no pipeline parallelism)
    page = _plan_pages(specs, turboquant)
    for spec in specs:
        for index in spec.layers:
            layer_plans[index] = layer_plans[index].model_copy(
                update={"block_size": spec.block_size, "page_bytes": spec.page_bytes, "padded_page_bytes": page})
    group_size, groups = _group_layout(specs)
    num_groups = sum(n for _, n in groups)
    block_bytes = page * group_size
    num_blocks = max(kv_memory, 0) // block_bytes

    blocks = sum(n * _blocks_per_request(s, max_model_len, in_flight, state_pages, True) for s, n in groups)
    reported_blocks = sum(n * _blocks_per_request(s, max_model_len, in_flight, state_pages, False) for s, n in groups)
    bytes_per_sequence = blocks * block_bytes
    real_bytes = sum(
        len(s.layers) * (_blocks_per_request(s, max_model_len, in_flight, state_pages, True)
                         * (s.bytes_per_token * s.block_size if s.bytes_per_token else s.state_bytes))
        for s in specs)
    growing = sum(n * block_bytes / s.block_size for s, n in groups if s.kind == "full_attention")
    sliding = sum(n * _blocks_per_request(s, max_model_len, in_flight, state_pages, True) * block_bytes
                  for s, n in groups if s.kind == "sliding_attention")
    gdn_total = sum(n * state_pages * block_bytes for s, n in groups if s.kind == "linear_attention")

    max_concurrency = num_blocks / blocks if blocks else 0.0
    reported_concurrency = num_blocks / reported_blocks if reported_blocks else 0.0

    # --- verdict ----------------------------------------------------------------------------------------
    by_index = [layer_plans[i] for i in sorted(layer_plans)]
    tq_layers = [p.index for p in by_index if p.kv_dtype in TURBOQUANT_DTYPES]
    if max_model_len > arch.max_position_embeddings:
        fits = False
        reasons.append(f"max_model_len {max_model_len:,} exceeds the model's {arch.max_position_embeddings:,} positions")
    heads = [layer.num_kv_heads for layer in arch.attention_layers]
    if any(h % tp and tp % h for h in heads):
        fits = False
        reasons.append(f"KV heads {sorted(set(heads))} cannot be split over tensor_parallel_size {tp}")
    if not given and kv_memory <= 0:
        fits = False
        recent = f"TurboQuant recent window {recent_window_bytes / GIB:.2f} - " if recent_window_bytes else ""
        reasons.append(
            f"no memory left for KV cache: budget {budget / GIB:.2f} GiB - weights {weight_bytes / GIB:.2f} - "
            f"{recent}activations {activation / GIB:.2f} - overhead {overhead / GIB:.2f} GiB per GPU")
    elif max_concurrency < 1.0:
        fits = False
        reasons.append(
            f"one {max_model_len:,}-token request needs {bytes_per_sequence / GIB:.2f} GiB of KV per GPU but only "
            f"{max(kv_memory, 0) / GIB:.2f} GiB is left (max concurrency {max_concurrency:.2f}x)")
    else:
        reasons.append(
            f"{max(kv_memory, 0) / GIB:.2f} GiB KV per GPU holds {max_concurrency:.2f} concurrent "
            f"{max_model_len:,}-token requests")
    if turboquant:
        reasons.append(
            f"TurboQuant on {len(tq_layers)} of {sum(1 for p in by_index if p.kind == 'full_attention' and p.kv_dtype != 'shared')} "
            "cache-owning full-attention layers")
    # Anchors: one table per KV-cache tensor that holds a TurboQuant layer (layers of different groups share
    # a tensor, and their block ids never collide, so they share its table), with a row per block of the shared
    # pool (any block can hold a request's position 0). vLLM's profile does not see them: they must fit the
    # headroom. vLLM has group_size tensors; the TurboQuant layers occupy at most that many of them.
    tq_plans = [p for p in by_index if p.kv_dtype in TURBOQUANT_DTYPES]
    anchor_bytes = (min(len(tq_plans), group_size) * num_blocks
                    * max(p.kv_heads_per_gpu * 3 * p.head_dim * 2 for p in tq_plans)) if tq_plans else 0
    headroom = gpu_bytes - budget
    if anchor_bytes:
        reasons.append(
            f"TurboQuant anchors {anchor_bytes / GIB:.2f} GiB per GPU beside the KV cache, outside vLLM's memory "
            f"profile (headroom {headroom / GIB:.2f} GiB)")
        if not given and anchor_bytes > headroom:
            fits = False
            reasons.append("TurboQuant anchors exceed the headroom left by gpu_memory_utilization: lower it")
    if recent_window_bytes:
        reasons.append(
            f"TurboQuant recent window (the newest {TURBOQUANT_RECENT_TOKENS} tokens of each of max_num_seqs = {seqs} "
            f"requests kept exact) {recent_window_bytes / GIB:.2f} GiB per GPU, "
            + ("on top of the given KV-cache memory" if given else "inside vLLM's memory profile"))
    padding_fraction = 1.0 - real_bytes / bytes_per_sequence if bytes_per_sequence else 0.0

    return CapacityPlan(
        model=model.name,
        hardware=hardware.name,
        kv_cache_dtype=kv_cache_dtype,
        turboquant_boundary_layers=boundary_layers,
        max_model_len=max_model_len,
        tensor_parallel_size=tp,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched,
        gpu_memory_bytes=gpu_bytes,
        memory_budget_bytes=budget,
        weight_bytes=weight_bytes,
        activation_bytes=activation,
        runtime_overhead_bytes=overhead,
        kv_cache_memory_bytes=max(kv_memory, 0),
        kv_cache_memory_given=given,
        layers=by_index,
        turboquant_layers=tq_layers,
        bf16_full_attention_layers=[p.index for p in by_index if p.kind == "full_attention" and p.kv_dtype in ("bf16", "fp8")],
        sliding_layers=[p.index for p in by_index if p.kind == "sliding_attention" and p.kv_dtype != "shared"],
        shared_kv_layers=[p.index for p in by_index if p.kv_dtype == "shared"],
        linear_attention_layers=list(arch.linear_layer_indices),
        growing_bytes_per_token=growing,
        growing_bytes_per_token_all_gpus_unpadded=unpadded_all_gpus,
        sliding_bytes_per_sequence=int(sliding),
        gdn_state_bytes_per_sequence=int(gdn_total),
        fixed_bytes_per_sequence=int(sliding + gdn_total),
        page_bytes=page,
        group_size=group_size,
        num_kv_cache_groups=num_groups,
        num_blocks=num_blocks,
        turboquant_anchor_bytes=anchor_bytes,
        turboquant_recent_window_bytes=recent_window_bytes,
        page_padding_fraction=padding_fraction,
        bytes_per_sequence=bytes_per_sequence,
        max_concurrency=max_concurrency,
        kv_cache_tokens=int(max_concurrency * max_model_len),
        reported_bytes_per_token=reported_blocks * block_bytes / max_model_len,
        reported_max_concurrency=reported_concurrency,
        reported_kv_cache_tokens=int(reported_concurrency * max_model_len),
        fits=fits,
        reasons=reasons,
    )
