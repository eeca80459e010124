"""P6 (0007) and 0011: boundary protection for hybrids, set with --turboquant-boundary-layers.

Real TurboQuantConfig.get_boundary_skip_layers through EngineArgs.create_engine_config on the
full-size Qwen3.6-27B config (48 GatedDeltaNet + 16 full-attention layers at 3, 7, ..., 63).
0011 replaced 0007's TQ_BOUNDARY_LAYERS environment variable (now a deprecated fallback) by the
engine option and counts TurboQuant-eligible (cache-owning full-attention) layers for every model;
test_boundary_layers_option.py covers the option through the CLI.
"""
from conftest import run_in_vllm

import vllm_kv_probe as probe

TQ_DTYPES = [d for d in probe.DTYPES if d != "auto"]


def test_pristine_hybrid_has_no_boundary_protection(pristine_tree):
    result = probe.pristine_results(run_in_vllm, pristine_tree)["qwen3.6-27b/turboquant_4bit_nc"]
    assert result["skip_layers"] == []


def test_hybrid_boundary_layers(patched_tree):
    results = probe.patched_results(run_in_vllm, patched_tree)
    for dtype in TQ_DTYPES:
        result = results[f"qwen3.6-27b/{dtype}"]
        assert result["ok"], result.get("traceback")
        assert result["skip_layers"] == probe.QWEN_BOUNDARY, dtype
        per_layer = result["bytes_per_token_per_layer"]
        # boundary layers stay bf16 (4 KV heads x 256, K and V), the other 12 are TurboQuant
        assert [int(i) for i, b in per_layer.items() if b == 4096] == [3, 7, 59, 63], dtype
        assert sum(b < 4096 for b in per_layer.values()) == 12, dtype


def test_boundary_option(patched_tree):
    results = probe.patched_results(run_in_vllm, patched_tree)
    assert results["qwen/boundary-1"]["skip_layers"] == ["3", "63"]
    assert results["qwen/boundary-0"]["skip_layers"] == []
    bad = results["qwen/boundary-bad"]
    assert not bad["ok"] and bad["stage"] == "create_engine_config"
    assert "--turboquant-boundary-layers" in bad["error"] and "non-negative integer, got -1" in bad["error"]


def test_boundary_env_var(patched_tree):
    # 0007's variable survives only as a deprecated fallback of 0011's option
    results = probe.patched_results(run_in_vllm, patched_tree)
    env_bad = results["qwen/boundary-env-bad"]
    assert not env_bad["ok"] and env_bad["error_type"] == "ValueError"
    assert "TQ_BOUNDARY_LAYERS='two'" in env_bad["error"] and "non-negative integer" in env_bad["error"]
    assert "--turboquant-boundary-layers" in env_bad["error"]


def test_interleaved_boundary_counts_full_attention_layers(patched_tree):
    # 0011: Gemma 4 E4B (dense in vLLM's sense, sliding + full) no longer skips sliding layers 0, 1, 40
    # and YOCO reader 41 by index; it protects cache-owning full layers 5 and 23 (2 capped to 1 of 4).
    result = probe.patched_results(run_in_vllm, patched_tree)["gemma-4-e4b-it/turboquant_4bit_nc"]
    assert {"5", "23"} <= set(result["skip_layers"])
    assert not {"0", "1", "40"} & set(result["skip_layers"])
    assert probe.patched_results(run_in_vllm, patched_tree)["31b/boundary-1"]["skip_layers"] == [
        "5", "59", "sliding_window"]
