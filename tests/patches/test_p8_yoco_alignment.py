"""P8 (0008): YOCO KV-sharing clusters of Gemma 4 E4B are skipped as a whole.

Since 0011 the boundary itself protects full layer 23 (the last cache-owning full layer), so 0008
pulls in its readers; before 0011 it was reader 41 (index boundary 0, 1, 40, 41) pulling in 23.

E4B: 42 layers, num_kv_shared_layers=18; layers 24-41 read the cache of the last non-shared layer
of their type, so full layers 29, 35, 41 read layer 23. Real create_engine_config on the full-size
config; the shared layers own no KV spec (as in the runner).
"""
from conftest import run_in_vllm

import vllm_kv_probe as probe

TQ_DTYPES = [d for d in probe.DTYPES if d != "auto"]


def test_pristine_e4b_breaks_a_cluster(pristine_tree):
    # boundary skips 41 (a reader of 23) but not 23: a bf16 layer would read a TurboQuant cache
    skips = probe.pristine_results(run_in_vllm, pristine_tree)["gemma-4-e4b-it/turboquant_4bit_nc"]["skip_layers"]
    assert "41" in skips and "23" not in skips


def test_e4b_skip_list_is_cluster_aligned(patched_tree):
    results = probe.patched_results(run_in_vllm, patched_tree)
    for dtype in TQ_DTYPES:
        result = results[f"gemma-4-e4b-it/{dtype}"]
        assert result["ok"], result.get("traceback")
        assert result["skip_layers"] == probe.E4B_YOCO_SKIPS, dtype
        per_layer = result["bytes_per_token_per_layer"]
        # cache-owning full layers: 11, 17 TurboQuant; 5 and 23 bf16 boundary (0011; 2 KV heads x 512,
        # K and V), 23 with its readers 29, 35, 41
        assert per_layer["23"] == per_layer["5"] == 4096, dtype
        assert all(per_layer[i] < 4096 for i in ("11", "17")), dtype
        assert not {"29", "35", "41"} & set(per_layer), "shared layers must own no KV cache"


def test_any_member_pulls_in_its_cluster(patched_tree):
    results = probe.patched_results(run_in_vllm, patched_tree)
    assert results["e4b/boundary-0"]["skip_layers"] == ["sliding_window"]
    assert results["e4b/user-skips-29"]["skip_layers"] == ["23", "29", "35", "41", "sliding_window"]
