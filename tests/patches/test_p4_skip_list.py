"""P4 (0006): string-safe skip-list merge and automatic 'sliding_window' skip for TurboQuant.

Runs vLLM's own EngineArgs.create_engine_config on the full-size Gemma 4 31B config, on the
pristine and the patched tree (see vllm_kv_probe.py for what the probe runs and what it stands in
for).
"""
from conftest import run_in_vllm

import vllm_kv_probe as probe

TQ_DTYPES = [d for d in probe.DTYPES if d != "auto"]


def test_pristine_sort_crashes_on_sliding_window(pristine_tree):
    result = probe.pristine_results(run_in_vllm, pristine_tree)["31b/manual-sliding-skip"]
    assert not result["ok"] and result["stage"] == "create_engine_config"
    assert result["error_type"] == "ValueError"
    assert "invalid literal for int() with base 10: 'sliding_window'" in result["error"]


def test_pristine_does_not_skip_sliding_layers(pristine_tree):
    # Without P4 Gemma 4's 50 sliding layers would be TurboQuant (no sliding-window kernel).
    result = probe.pristine_results(run_in_vllm, pristine_tree)["gemma-4-e4b-it/turboquant_4bit_nc"]
    assert result["skip_layers"] == ["0", "1", "40", "41"]


def test_patched_skip_list_keeps_names_and_sorts_indices(patched_tree):
    result = probe.patched_results(run_in_vllm, patched_tree)["31b/manual-sliding-skip"]
    assert result["ok"], result.get("traceback")
    # boundary (0011: full layers 5, 11, 53, 59) + the user's 7 + the attention type name
    assert result["skip_layers"] == ["5", "7", "11", "53", "59", "sliding_window"]


def test_patched_auto_skips_sliding_layers_for_every_turboquant_dtype(patched_tree):
    results = probe.patched_results(run_in_vllm, patched_tree)
    for dtype in TQ_DTYPES:
        assert results[f"gemma-4-31b-it/{dtype}"]["skip_layers"] == probe.GEMMA31_SKIPS, dtype
        # Qwen3.6 has no sliding layers: nothing added
        assert "sliding_window" not in results[f"qwen3.6-27b/{dtype}"]["skip_layers"], dtype
    assert results["gemma-4-31b-it/auto"]["skip_layers"] == []


def test_patched_sliding_layers_stay_bf16(patched_tree):
    """bytes/token/layer of a 31B sliding layer (16 KV heads x 256, K and V, bf16) under TurboQuant."""
    result = probe.patched_results(run_in_vllm, patched_tree)["gemma-4-31b-it/turboquant_4bit_nc"]
    per_layer = result["bytes_per_token_per_layer"]
    assert all(per_layer[str(i)] == 16384 for i in range(60) if i % 6 != 5)
