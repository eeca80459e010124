"""Capacity planner against hand-computed references (vLLM 0.26.0 TurboQuantConfig, patch 0009's page
planner, and the unpatched H200 baseline in tests/gpu/results/2026-11-21-h200.jsonl)."""
from __future__ import annotations

import json
import math

import pytest

import tqconfig
from tqconfig.architecture import load_architecture
from tqconfig.loader import architecture_for
from tqconfig.planner import GIB, full_attention_bytes_per_token, sliding_bytes_per_token
from tqconfig.schema import Hardware

# vLLM 0.26 TurboQuantConfig.slot_size_aligned, executed on the wheel.
SLOT_TABLE = {
    "turboquant_k8v4": (388, 772),
    "turboquant_4bit_nc": (262, 518),
    "turboquant_k3v4_nc": (230, 454),
    "turboquant_3bit_nc": (198, 390),
}


@pytest.mark.parametrize("dtype", list(SLOT_TABLE))
def test_turboquant_slot_bytes_match_vllm_table(dtype):
    assert (tqconfig.tq_slot_bytes(dtype, 256), tqconfig.tq_slot_bytes(dtype, 512)) == SLOT_TABLE[dtype]


def test_slot_bytes_rejects_non_turboquant_dtype():
    with pytest.raises(tqconfig.PlanInputError, match="kv_cache_dtype.*turboquant_k8v4"):
        tqconfig.tq_slot_bytes("fp8", 256)


# Whole-model growing KV bytes/token with every full-attention layer at that dtype.
GROWING_REFERENCE = {
    "qwen3.6-27b": {"auto": 65_536, "fp8": 32_768, "turboquant_k8v4": 24_832, "turboquant_4bit_nc": 16_768,
                    "turboquant_k3v4_nc": 14_720, "turboquant_3bit_nc": 12_672},
    "gemma4-31b": {"auto": 81_920, "fp8": 40_960, "turboquant_k8v4": 30_880, "turboquant_4bit_nc": 20_720,
                   "turboquant_k3v4_nc": 18_160, "turboquant_3bit_nc": 15_600},
    # E4B: only layers 0-23 own a cache; 4 full layers x 2 heads x 512 (16 KiB at bf16)
    "gemma4-e4b": {"auto": 16_384, "turboquant_4bit_nc": 4 * 2 * 518},
}


@pytest.mark.parametrize("model,dtype,expected",
                         [(m, d, v) for m, table in GROWING_REFERENCE.items() for d, v in table.items()])
def test_growing_bytes_per_token_match_hand_computation(model, dtype, expected):
    arch = architecture_for(tqconfig.load_model(model))
    assert full_attention_bytes_per_token(arch, dtype) == expected


def test_sliding_bytes_per_token_match_hand_computation():
    assert sliding_bytes_per_token(architecture_for(tqconfig.load_model("gemma4-31b"))) == 819_200  # 50x16x256x2x2
    assert sliding_bytes_per_token(architecture_for(tqconfig.load_model("gemma4-e4b"))) == 40_960  # 20x2x256x2x2


def _plan(stack: str, **kw) -> tqconfig.CapacityPlan:
    return tqconfig.load_stack(stack).plan(**kw)


def test_gemma31b_layer_selection_keeps_boundary_and_sliding_bf16():
    plan = _plan("rtx5060ti-x4-gemma4-31b")  # turboquant_boundary_layers: 1
    assert plan.turboquant_layers == [11, 17, 23, 29, 35, 41, 47, 53]
    # 0011 counts full-attention layers: 5 and 59 (vLLM's index boundary 0, 1, 58, 59 hit only 59)
    assert plan.bf16_full_attention_layers == [5, 59]
    assert len(plan.sliding_layers) == 50
    assert all("sliding-window" in layer.reason for layer in plan.layers if layer.kind == "sliding_attention")
    assert "boundary" in next(layer.reason for layer in plan.layers if layer.index == 59)
    assert "boundary" in next(layer.reason for layer in plan.layers if layer.index == 5)
    # 8 x (4 heads x 518) + 2 x (4 heads x 2 x 512 x 2): "2072 vs 8192 per layer"
    assert plan.growing_bytes_per_token_all_gpus_unpadded == 8 * 2072 + 2 * 8192


@pytest.mark.parametrize("n,bf16", [(0, []), (1, [5, 59]), (2, [5, 11, 53, 59]), (3, [5, 11, 53, 59])])
def test_gemma31b_boundary_counts_full_attention_layers(n, bf16):
    plan = _plan("rtx5060ti-x4-gemma4-31b", turboquant_boundary_layers=n)
    assert plan.bf16_full_attention_layers == bf16  # 3 is capped: at most half of the 10 full layers
    assert plan.turboquant_boundary_layers == n
    assert len(plan.turboquant_layers) == 10 - len(bf16)


def test_boundary_setting_is_validated():
    with pytest.raises(tqconfig.PlanInputError, match="turboquant_boundary_layers.*non-negative"):
        _plan("rtx5060ti-x4-gemma4-31b", turboquant_boundary_layers=-1)


def test_gemma3_270m_style_config_protects_first_and_last_full_layers():
    from conftest import REPO
    from tqconfig.planner import boundary_protected_layers

    arch = load_architecture(REPO / "tests/patches/fixtures/gemma-3-270m/config.json")
    assert [boundary_protected_layers(arch, n) for n in (0, 1, 2)] == [[], [5, 17], [5, 17]]
    # one full layer (tiny Gemma 4): never protected, it stays TurboQuant at any setting
    tiny = load_architecture(REPO / "tests/fixtures/tiny-configs/tiny_gemma4/config.json")
    assert [boundary_protected_layers(tiny, n) for n in (0, 1, 2)] == [[], [], []]


def test_qwen_hybrid_boundary_protects_first_and_last_two_full_attention_layers():
    plan = _plan("rtx3090-x1-qwen3.6-27b")  # turboquant_boundary_layers: 2
    assert plan.bf16_full_attention_layers == [3, 7, 59, 63]  # tqstack P6
    assert plan.turboquant_layers == list(range(11, 56, 4))
    assert len(plan.linear_attention_layers) == 48
    assert plan.growing_bytes_per_token_all_gpus_unpadded == 12 * 1048 + 4 * 4096
    # Gated DeltaNet state: 48 layers x (48x128x128x4 fp32 + 10240 x 3 x 2 bf16 conv) = 48 x 3,207,168
    assert plan.gdn_state_bytes_per_sequence >= 48 * 3_207_168
    assert plan.gdn_state_bytes_per_sequence < 48 * 3_207_168 * 1.01


def test_qwen_pages_follow_p7_block_3072():
    plan = _plan("rtx3090-x1-qwen3.6-27b")
    tq_layer = next(layer for layer in plan.layers if layer.index == 11)
    bf16_layer = next(layer for layer in plan.layers if layer.index == 3)
    assert (tq_layer.block_size, tq_layer.page_bytes) == (3072, 1048 * 3072)  # patch 0009 (P7): Qwen3.6 TurboQuant block 3072
    assert bf16_layer.block_size == 768 and bf16_layer.padded_page_bytes == 1048 * 3072


def test_e4b_yoco_cluster_is_skipped_together():
    plan = _plan("rtx3090-x1-gemma4-e4b")  # turboquant_boundary_layers: 1 -> cache-owning full layers 5, 23
    assert plan.turboquant_layers == [11, 17]
    assert plan.bf16_full_attention_layers == [5, 23]
    assert plan.shared_kv_layers == list(range(24, 42))
    layer23 = next(layer for layer in plan.layers if layer.index == 23)
    assert "boundary" in layer23.reason
    # 23's readers follow it (P8)
    assert all("YOCO" in layer.reason and "layer 23" in layer.reason
               for layer in plan.layers if layer.index in (29, 35, 41))
    tq_layer = next(layer for layer in plan.layers if layer.index == 11)
    assert tq_layer.block_size == 64  # P7 + P8 simulation: TurboQuant block 64, 1036 B/token
    # without boundary protection every cache-owning full layer (and so 23's readers) is TurboQuant
    assert _plan("rtx3090-x1-gemma4-e4b", turboquant_boundary_layers=0).turboquant_layers == [5, 11, 17, 23]


def test_unpatched_report_matches_gemma31b_h200_baseline():
    """tests/gpu/results/2026-11-21-h200.jsonl: unpatched vLLM 0.26, Gemma 4 31B bf16, 65.03 GiB KV -> 77,457 tokens, 2.36x @ 32,768."""
    h200 = Hardware(name="h200", description="test rig", vendor="nvidia", arch="sm_90", gpu_name="H200",
                    gpu_count=1, gpu_memory_gib=139.8, interconnect="single", image="x", dockerfile="x",
                    supported_kv_cache_dtypes=("auto",),
                    defaults={"gpu_memory_utilization": 0.9, "runtime_overhead_gib": 1.0})
    plan = tqconfig.plan_capacity(tqconfig.load_model("gemma4-31b"), h200, kv_cache_dtype="auto",
                                  max_model_len=32_768, gpu_memory_utilization=0.9, tensor_parallel_size=1,
                                  max_num_seqs=8, max_num_batched_tokens=8192,
                                  kv_cache_memory_bytes=int(65.03 * GIB))
    assert plan.reported_bytes_per_token == 901_120  # 10x4x512x4 + 50x16x256x4: every layer at full context
    assert plan.reported_kv_cache_tokens == pytest.approx(77_457, rel=1e-3)
    assert plan.reported_max_concurrency == pytest.approx(2.36, abs=0.01)
    # window-bounded (patched) sizing: 5 groups of 10 sliding layers hold cdiv(1023 + 8192, 16) + 1 blocks,
    # the full-attention group cdiv(32768, 32) blocks; one block id = 10 layers x 262,144 B pages
    blocks_per_request = 5 * (math.ceil((1023 + 8192) / 16) + 1) + 32_768 // 32
    num_blocks = int(65.03 * GIB) // (10 * 262_144)
    assert plan.max_concurrency == pytest.approx(num_blocks / blocks_per_request)
    assert plan.max_concurrency > 2.5 * plan.reported_max_concurrency


def test_sliding_window_bytes_are_bounded_by_window_plus_chunk():
    plan = _plan("rtx5060ti-x4-gemma4-31b")
    # per GPU: 50 layers x (cdiv(1023 + 2048, 16) + 1 blocks) x padded page
    blocks = math.ceil((1024 - 1 + 2048) / 16) + 1
    assert plan.sliding_bytes_per_sequence == 50 * blocks * plan.page_bytes
    assert plan.page_padding_fraction < 0.02  # patch 0009: bf16 pages padded ~1%


@pytest.mark.parametrize("stack", tqconfig.list_stacks())
def test_every_stack_fits_its_card(stack):
    plan = _plan(stack)
    assert plan.fits, plan.reasons
    assert plan.max_concurrency >= 1.0
    assert plan.kv_cache_tokens >= plan.max_model_len


def test_rtx3090_single_card_serves_qwen_at_96k_or_more_with_turboquant():
    s = tqconfig.load_stack("rtx3090-x1-qwen3.6-27b")
    assert s.serving.kv_cache_dtype.startswith("turboquant_") and s.serving.max_model_len >= 96 * 1024
    assert s.plan().fits


def test_turboquant_is_what_makes_native_context_fit_on_5060ti_gemma():
    s = tqconfig.load_stack("rtx5060ti-x4-gemma4-31b")
    assert s.serving.max_model_len == 262_144
    assert s.plan().fits
    bf16 = s.plan(kv_cache_dtype="auto")
    assert not bf16.fits and "needs" in bf16.reasons[0]


def test_not_fitting_is_reported_with_reason():
    plan = _plan("rtx3090-x1-qwen3.6-27b", kv_cache_dtype="auto", max_model_len=262_144)
    assert not plan.fits
    assert any("262,144-token request needs" in r for r in plan.reasons)


def test_context_beyond_model_positions_does_not_fit():
    plan = _plan("rtx3090-x1-gemma4-e4b", max_model_len=262_144)
    assert not plan.fits and any("131,072 positions" in r for r in plan.reasons)


def test_turboquant_k8v4_refused_on_rtx3090_by_planner():
    with pytest.raises(tqconfig.KvCacheDtypeRefused, match=r"turboquant_k8v4.*refused on rtx3090-x1.*sm_86"):
        _plan("rtx3090-x1-qwen3.6-27b", kv_cache_dtype="turboquant_k8v4")


@pytest.mark.parametrize("stack,factor", [
    ("rtx5060ti-x4-gemma4-31b", 2), ("rtx3090-x2-qwen3.6-27b", 2),
    # E4B at its stack setting (boundary 1) compresses 2 of its 4 cache-owning full layers (0011)
    ("rtx3090-x1-gemma4-e4b", 1.5),
])
def test_turboquant_holds_at_least_twice_the_bf16_tokens(stack, factor):
    # not the textbook 3.9x: boundary layers, sliding windows, DeltaNet state and page padding stay
    bf16 = _plan(stack, kv_cache_dtype="auto").kv_cache_tokens
    assert _plan(stack, kv_cache_dtype="turboquant_4bit_nc").kv_cache_tokens > factor * bf16
    unprotected = _plan(stack, kv_cache_dtype="turboquant_4bit_nc", turboquant_boundary_layers=0)
    assert unprotected.kv_cache_tokens > 2 * bf16


def test_per_layer_config_spelling_gives_same_architecture(tmp_path):
    """transformers 5.x writes Gemma 4 full-layer shapes as per_layer_config instead of global_* keys."""
    source = tqconfig.load_model("gemma4-31b")
    original = json.loads((architecture_for(source).source and open(architecture_for(source).source).read()))
    text = original["text_config"]
    full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    text["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 4} for i in full}
    for key in ("global_head_dim", "num_global_key_value_heads"):
        text.pop(key)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(original))
    converted = load_architecture(path)
    assert full_attention_bytes_per_token(converted, "auto") == 81_920
    assert converted.attention_layers == architecture_for(source).attention_layers


@pytest.mark.parametrize("name", ["tiny_gemma4", "tiny_qwen3_5", "tiny_qwen3"])
def test_tiny_fixture_configs_parse(name):
    from conftest import REPO

    arch = load_architecture(REPO / "tests/fixtures/tiny-configs" / name / "config.json")
    assert arch.attention_layers and arch.num_layers == len(arch.layer_kinds)
    assert arch.is_hybrid == (name == "tiny_qwen3_5")


def test_turboquant_anchor_memory_is_reported_per_gpu():
    """Anchors: a [num_blocks, KV heads, 3, head_dim] table in the model dtype per KV-cache tensor holding a
    TurboQuant layer (vLLM's group_size tensors are shared across groups), beside the KV cache and outside vLLM's
    memory profile: it must fit the headroom (1 - gpu_memory_utilization)."""
    plan = _plan("rtx5060ti-x4-gemma4-31b")
    tq = [p for p in plan.layers if p.kv_dtype == plan.kv_cache_dtype]
    per_table = plan.num_blocks * 1 * 3 * 512 * 2  # one KV head per GPU at TP=4, head_dim 512
    assert len(tq) == 8 and plan.group_size == 2
    assert plan.turboquant_anchor_bytes == 2 * per_table  # 8 TurboQuant layers on vLLM's 2 shared tensors
    assert plan.turboquant_anchor_bytes < (1 - plan.gpu_memory_utilization) * plan.gpu_memory_bytes
    assert plan.fits and any("TurboQuant anchors 0.21 GiB" in r for r in plan.reasons)
    assert _plan("rtx5060ti-x4-gemma4-31b", kv_cache_dtype="auto").turboquant_anchor_bytes == 0


def _memory_left(plan: tqconfig.CapacityPlan) -> int:
    """budget - weights - activations - overhead: the KV memory before the TurboQuant recent window."""
    return plan.memory_budget_bytes - plan.weight_bytes - plan.activation_bytes - plan.runtime_overhead_bytes


@pytest.mark.parametrize("stack,expected", [
    # 8 TurboQuant layers (boundary 1) x 1 KV head per GPU (TP=4) x (4 x 512 + 8) B x max_num_seqs 4 x 128 tokens
    ("rtx5060ti-x4-gemma4-31b", 8 * 1 * (4 * 512 + 8) * 4 * 128),
    # 12 TurboQuant layers (boundary 2) x 4 KV heads (TP=1) x (4 x 256 + 8) B x max_num_seqs 4 x 128 tokens
    ("rtx3090-x1-qwen3.6-27b", 12 * 4 * (4 * 256 + 8) * 4 * 128),
    # TP=4: 4 KV heads / 4 GPUs, max_num_seqs 16
    ("rtx5060ti-x4-qwen3.6-27b", 12 * 1 * (4 * 256 + 8) * 16 * 128),
])
def test_turboquant_recent_window_comes_out_of_the_kv_cache(stack, expected):
    """Patch 0014's recent window (the newest 128 tokens of every running request, fp16 key + value and two int32
    tags per entry) is allocated with the model, inside vLLM's memory profile: the KV cache shrinks by it."""
    from tqconfig.planner import TURBOQUANT_RECENT_TOKENS

    assert TURBOQUANT_RECENT_TOKENS == 128
    plan = _plan(stack)
    tq = [p for p in plan.layers if p.kv_dtype == plan.kv_cache_dtype]
    assert plan.turboquant_recent_window_bytes == expected == sum(
        plan.max_num_seqs * 128 * p.kv_heads_per_gpu * (4 * p.head_dim + 8) for p in tq)
    assert plan.kv_cache_memory_bytes == _memory_left(plan) - expected
    assert plan.num_blocks == plan.kv_cache_memory_bytes // (plan.page_bytes * plan.group_size)
    gib = f"{expected / GIB:.2f} GiB per GPU, inside vLLM's memory profile"
    assert any(r.startswith("TurboQuant recent window (the newest 128 tokens") and gib in r for r in plan.reasons)
    bf16 = _plan(stack, kv_cache_dtype="auto")
    assert bf16.turboquant_recent_window_bytes == 0 and bf16.kv_cache_memory_bytes == _memory_left(bf16)
    assert bf16.kv_cache_memory_bytes - plan.kv_cache_memory_bytes == expected  # same budget, weights, activations
    assert not any("recent window" in r for r in bf16.reasons)


def test_recent_window_skips_yoco_readers_and_follows_boundary_setting():
    # E4B without boundary protection: cache owners 5, 11, 17, 23 are TurboQuant, 23's readers 29, 35, 41 too
    # but they hold no cache (and no window); 2 KV heads, head_dim 512, max_num_seqs 8
    plan = _plan("rtx3090-x1-gemma4-e4b", turboquant_boundary_layers=0)
    assert plan.turboquant_layers == [5, 11, 17, 23]
    assert plan.turboquant_recent_window_bytes == 4 * 2 * (4 * 512 + 8) * 8 * 128
    assert _plan("rtx3090-x1-gemma4-e4b").turboquant_recent_window_bytes == 2 * 2 * (4 * 512 + 8) * 8 * 128


def test_recent_window_with_given_kv_memory_and_in_the_no_memory_message():
    given = _plan("rtx3090-x1-qwen3.6-27b", kv_cache_memory_bytes=4 * GIB)
    assert given.kv_cache_memory_bytes == 4 * GIB and given.turboquant_recent_window_bytes == 12 * 4 * 1032 * 4 * 128
    assert any("recent window" in r and "on top of the given KV-cache memory" in r for r in given.reasons)
    starved = _plan("rtx3090-x1-qwen3.6-27b", gpu_memory_utilization=0.5)
    assert not starved.fits and starved.kv_cache_memory_bytes == 0
    assert any(r.startswith("no memory left for KV cache") and "TurboQuant recent window 0.02 - " in r
               for r in starved.reasons)
