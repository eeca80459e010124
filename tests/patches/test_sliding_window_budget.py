"""0010: the KV-cache report bounds sliding-window layers by their window.

Real get_kv_cache_configs on the full-size configs with the KV memory of the unpatched H200
baseline (tests/gpu/results/2026-11-21-h200.jsonl), max_model_len 32768, max_num_batched_tokens 16384,
async scheduling (so max_in_flight_tokens = 32768). Reports are the "GPU KV cache size" / "Maximum concurrency"
lines vLLM logs.
"""
import pytest
from conftest import run_in_vllm

import vllm_kv_probe as probe


def test_pristine_report_is_full_context(pristine_tree):
    """Reproduces the H200 baseline numbers: sliding layers charged for the whole context."""
    results = probe.pristine_results(run_in_vllm, pristine_tree)
    gemma31 = results["gemma-4-31b-it/auto"]
    assert gemma31["max_in_flight_tokens"] == 32768
    assert gemma31["report_concurrency"] == 2.36
    assert gemma31["report_tokens"] == pytest.approx(77457, rel=2e-4)
    # every layer per token: 10 full x 8192 + 50 sliding x 16384 bytes
    assert 65.03 * 2**30 / gemma31["report_tokens"] == pytest.approx(901500, rel=2e-4)
    assert results["gemma-4-e4b-it/auto"]["report_concurrency"] == 62.30
    assert results["gemma-4-e4b-it/auto"]["report_tokens"] == pytest.approx(2041346, rel=2e-4)
    assert results["qwen3.6-27b/auto"]["report_tokens"] == pytest.approx(1109742, rel=2e-4)


def test_patched_report_counts_window(patched_tree, pristine_tree):
    patched = probe.patched_results(run_in_vllm, patched_tree)
    pristine = probe.pristine_results(run_in_vllm, pristine_tree)
    gemma31 = patched["gemma-4-31b-it/auto"]
    # same pool, different report: one 32K prefill peak (11,269 blocks) + resident requests
    # (1024 full + 5 x 66 sliding blocks) in a 26,636-block pool
    assert gemma31["num_blocks"] == pristine["gemma-4-31b-it/auto"]["num_blocks"] == 26636
    assert gemma31["report_concurrency"] == pytest.approx(1 + (26636 - 11269) / 1354, abs=0.01)
    tq = patched["gemma-4-31b-it/turboquant_4bit_nc"]
    # default boundary 2 (0011): 4 of the 10 full layers stay bf16 (before 0011 only 59 did: > 2x)
    assert tq["report_concurrency"] > 1.3 * gemma31["report_concurrency"]
    assert patched["31b/boundary-1"]["report_concurrency"] > tq["report_concurrency"]
    # no sliding layers: the report is unchanged
    assert patched["qwen3.6-27b/auto"]["report_tokens"] == pristine["qwen3.6-27b/auto"]["report_tokens"]
    for model in ("gemma-4-31b-it", "gemma-4-e4b-it"):
        assert patched[f"{model}/auto"]["report_concurrency"] > pristine[f"{model}/auto"]["report_concurrency"]
