"""Gate 5 / P7 (0009): TurboQuant-aware page planner.

Real vLLM planner code on the full-size configs: Platform.update_block_size_for_backend (phases
1-3), Attention.get_kv_cache_spec per layer, get_kv_cache_configs (unify, grouping, num_blocks).
The model is not constructed (see vllm_kv_probe.py); skip lists come from the real
create_engine_config of each tree.
"""
import pytest
from conftest import run_in_vllm

import vllm_kv_probe as probe

TQ_DTYPES = [d for d in probe.DTYPES if d != "auto"]
# (model, bf16 bytes/token of a full-attention layer) for the compression ratio
BF16_FULL = {"gemma-4-31b-it": 8192, "gemma-4-e4b-it": 4096, "qwen3.6-27b": 4096}
NOT_DIVISIBLE = "page size is not divisible by the maximum page size and cannot be padded"


@pytest.mark.parametrize("label,error_type,message", [
    # the first TurboQuant layer of the forced list (0011: full layers 5, 11, 53, 59 stay bf16)
    ("31b/forced", "NotImplementedError", f"Layer model.layers.17.self_attn.attn: {NOT_DIVISIBLE}"),
    ("e4b/forced-boundary", "NotImplementedError", NOT_DIVISIBLE),
    ("e4b/forced-yoco", "AssertionError", ""),
    ("qwen/forced", "NotImplementedError", NOT_DIVISIBLE),
])
def test_pristine_planner_fails(pristine_tree, label, error_type, message):
    result = probe.pristine_results(run_in_vllm, pristine_tree)[label]
    assert not result["ok"] and result["stage"] == "get_kv_cache_configs", result
    assert result["error_type"] == error_type and message in result["error"]
    if error_type == "AssertionError":
        assert "unify_kv_cache_spec_page_size" in result["traceback"]


@pytest.mark.parametrize("model", list(probe.MODELS))
@pytest.mark.parametrize("dtype", TQ_DTYPES)
def test_patched_planner_pages(patched_tree, model, dtype):
    result = probe.patched_results(run_in_vllm, patched_tree)[f"{model}/{dtype}"]
    assert result["ok"], result.get("traceback")
    pages = {g["page_size"] for g in result["groups"]}
    assert len(pages) == 1
    assert result["padding_pct"] <= 2.0
    tq_groups = [g for g in result["groups"] if g["type"] == "TQFullAttentionSpec"]
    assert tq_groups
    # TurboQuant pages are never padded: page == block * bytes/token of a TurboQuant layer
    tq_layer = str(tq_groups[0]["layers"][0])
    tq_bytes = result["bytes_per_token_per_layer"][tq_layer]
    assert tq_groups[0]["page_size"] == tq_groups[0]["block_size"] * tq_bytes
    assert all(g["block_size"] % 16 == 0 for g in result["groups"] if g["type"] != "MambaSpec")
    if dtype == "turboquant_4bit_nc":
        assert BF16_FULL[model] / tq_bytes >= 3.9


def test_patched_expected_layouts(patched_tree):
    """The designs in patch 0009's header (its Results paragraph), for turboquant_4bit_nc."""
    results = probe.patched_results(run_in_vllm, patched_tree)

    def blocks(label):
        return {g["type"]: g["block_size"] for g in results[label]["groups"]}

    gemma31 = results["gemma-4-31b-it/turboquant_4bit_nc"]
    assert blocks("gemma-4-31b-it/turboquant_4bit_nc") == {
        "TQFullAttentionSpec": 128, "FullAttentionSpec": 32, "SlidingWindowSpec": 16}
    assert gemma31["groups"][0]["page_size"] == 265216  # bf16 262144 padded by 1.2%
    assert gemma31["bytes_per_token_per_layer"]["17"] == 2072  # 5 is a bf16 boundary layer (0011)
    assert blocks("gemma-4-e4b-it/turboquant_4bit_nc")["TQFullAttentionSpec"] == 64
    assert results["gemma-4-e4b-it/turboquant_4bit_nc"]["bytes_per_token_per_layer"]["11"] == 1036
    qwen = results["qwen3.6-27b/turboquant_4bit_nc"]
    assert blocks("qwen3.6-27b/turboquant_4bit_nc")["TQFullAttentionSpec"] == 3072
    assert qwen["bytes_per_token_per_layer"]["11"] == 1048


def test_auto_dtype_unchanged(pristine_tree, patched_tree):
    pristine = probe.pristine_results(run_in_vllm, pristine_tree)
    patched = probe.patched_results(run_in_vllm, patched_tree)
    for model in probe.MODELS:
        before, after = pristine[f"{model}/auto"], patched[f"{model}/auto"]
        assert before["ok"] and after["ok"]
        assert before["groups"] == after["groups"] and before["num_blocks"] == after["num_blocks"]
