"""P1 (patch 0002): the V1 GPU model runner reshapes TurboQuant KV caches with their real preset.

vLLM 0.26.0's `GPUModelRunner._reshape_kv_cache_tensors` passed "auto" for TQFullAttentionSpec
layers (their kv_quant_mode reads NONE), and TurboQuant's get_kv_cache_shape rejected it (#50709).

The test calls that runner method itself on CPU tensors. The runner is not built (its __init__
needs a GPU); the method reads only kv_cache_config, attn_groups, runner_only_attn_layers and
cache_config, which are set as the runner's KV-cache initialisation would. Each case has one
TurboQuant layer (TQFullAttentionSpec exactly as Attention.get_kv_cache_spec builds it, backend
TURBOQUANT) and one boundary skip layer (bf16 FullAttentionSpec, backend TRITON_ATTN).
"""
from __future__ import annotations

import pytest

from conftest import run_in_vllm

PRESETS = ["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]
# Slot bytes per head per token (from TQ_PRESETS on 0.26.0).
SLOT_BYTES = {
    ("turboquant_k8v4", 256): 388, ("turboquant_k8v4", 512): 772,
    ("turboquant_4bit_nc", 256): 262, ("turboquant_4bit_nc", 512): 518,
    ("turboquant_k3v4_nc", 256): 230, ("turboquant_k3v4_nc", 512): 454,
    ("turboquant_3bit_nc", 256): 198, ("turboquant_3bit_nc", 512): 390,
}
NUM_BLOCKS, BLOCK_SIZE, KV_HEADS = 3, 16, 4

RESHAPE = r'''
import json, torch
from vllm.config import CacheConfig, DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                        KVCacheTensor, TQFullAttentionSpec)
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.utils import AttentionGroup

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS = %(num_blocks)d, %(block_size)d, %(kv_heads)d
out = {}
for preset in %(presets)r:
    for head_size in (256, 512):
        tq_spec = TQFullAttentionSpec(
            block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=head_size,
            head_size_v=head_size, dtype=torch.uint8,
            tq_slot_size=TurboQuantConfig.from_cache_dtype(preset, head_size).slot_size_aligned)
        skip_spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS,
                                      head_size=head_size, dtype=torch.bfloat16)
        layers = {"model.layers.5.self_attn.attn": tq_spec, "model.layers.59.self_attn.attn": skip_spec}
        runner = GPUModelRunner.__new__(GPUModelRunner)
        runner.cache_config = CacheConfig(cache_dtype=preset)
        runner.runner_only_attn_layers = set()
        runner.kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[KVCacheTensor(size=NUM_BLOCKS * spec.page_size_bytes, shared_by=[name])
                              for name, spec in layers.items()],
            kv_cache_groups=[KVCacheGroupSpec([name], spec) for name, spec in layers.items()])
        backends = [TurboQuantAttentionBackend, TritonAttentionBackend]
        runner.attn_groups = [[AttentionGroup(backend, [name], spec, group_id)]
                              for group_id, (backend, (name, spec))
                              in enumerate(zip(backends, layers.items()))]
        raw = {name: torch.zeros(NUM_BLOCKS * spec.page_size_bytes, dtype=torch.int8)
               for name, spec in layers.items()}
        key = f"{preset}/{head_size}"
        try:
            config = VllmConfig(cache_config=runner.cache_config, device_config=DeviceConfig("cpu"))
            with set_current_vllm_config(config):
                caches = runner._reshape_kv_cache_tensors(raw, [BLOCK_SIZE, BLOCK_SIZE])
            out[key] = {"turboquant": [list(caches["model.layers.5.self_attn.attn"].shape),
                                       str(caches["model.layers.5.self_attn.attn"].dtype)],
                        "skip": [list(caches["model.layers.59.self_attn.attn"].shape),
                                 str(caches["model.layers.59.self_attn.attn"].dtype)]}
        except Exception as exc:
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
'''


def _reshape(tree):
    code = RESHAPE % {"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "kv_heads": KV_HEADS,
                      "presets": PRESETS}
    run = run_in_vllm(tree, code, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.json()


def test_patched_runner_reshapes_turboquant_layers(patched_tree):
    result = _reshape(patched_tree)
    for preset in PRESETS:
        for head_size in (256, 512):
            case = result[f"{preset}/{head_size}"]
            assert "error" not in case, case
            # (num_blocks, num_kv_heads, block_size, slot bytes) of packed uint8 K+V
            assert case["turboquant"] == [
                [NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, SLOT_BYTES[(preset, head_size)]], "torch.uint8"]
            # The boundary skip layer keeps TRITON_ATTN's unquantized bf16 layout
            # (blocks, heads, tokens, K|V)
            assert case["skip"] == [[NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * head_size],
                                    "torch.bfloat16"]


def test_pristine_runner_passes_auto(pristine_tree):
    result = _reshape(pristine_tree)
    for preset in PRESETS:
        for head_size in (256, 512):
            assert result[f"{preset}/{head_size}"]["error"].startswith(
                "ValueError: Unknown TurboQuant cache dtype: 'auto'. Valid presets: "), preset
