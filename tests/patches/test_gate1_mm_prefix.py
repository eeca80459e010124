"""Gate 1 (patch 0003): `use_mm_prefix` is decided per layer.

Gemma 4 (`use_bidirectional_attention: "vision"`) applies the bidirectional image mask only on
sliding-attention layers (gemma4_mm clears mm_prefix_range for the others), but vLLM 0.26.0 set
`use_mm_prefix` on every layer, so a TurboQuant full-attention layer asked TURBOQUANT for
mm-prefix support and got "partial multimodal token full attention not supported".

Real `Attention` layers are constructed from the committed full-size Gemma 4 31B config, on
vLLM's CudaPlatform at sm_86 (see test_gate2_backend_routing.CUDA_HOST_PREAMBLE). The global
backend is left unforced here (attention_config.backend = None) so that the pristine failure is
gate 1's own and not gate 2's. A Gemma 3 config (all-layer prefix LM) checks that other models
keep the model-wide flag, and TURBOQUANT still does not claim mm-prefix support.
"""
from __future__ import annotations

import pytest

from conftest import run_in_vllm
from test_gate2_backend_routing import CUDA_HOST_PREAMBLE, GEMMA4_31B

MM_PREFIX_CODE = CUDA_HOST_PREAMBLE + r'''
from transformers import Gemma3Config
from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend

use_cuda_capability(8, 6)
out = {}
gemma4 = build_config(%(gemma4)r, "turboquant_4bit_nc", ["0", "1", "58", "59", "sliding_window"])
out["gemma4_config_is_mm_prefix_lm"] = gemma4.model_config.is_mm_prefix_lm
gemma4.attention_config.backend = None
out["gemma4"] = build_layers(gemma4)

gemma3_dir = tempfile.mkdtemp(prefix="tq-gemma3-")
__import__("atexit").register(__import__("shutil").rmtree, gemma3_dir, True)
gemma3 = Gemma3Config()
gemma3.architectures = ["Gemma3ForConditionalGeneration"]
gemma3.save_pretrained(gemma3_dir)
gemma3 = build_config(gemma3_dir, "auto", [])
out["gemma3_config_is_mm_prefix_lm"] = gemma3.model_config.is_mm_prefix_lm
out["gemma3"] = build_layers(gemma3)
out["turboquant_supports_mm_prefix"] = TurboQuantAttentionBackend.supports_mm_prefix()
print(json.dumps(out))
'''


def _layers(tree):
    run = run_in_vllm(tree, MM_PREFIX_CODE % {"gemma4": str(GEMMA4_31B)}, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.json()


@pytest.fixture(scope="module")
def patched_layers(patched_tree):
    return _layers(patched_tree)


@pytest.fixture(scope="module")
def pristine_layers(pristine_tree):
    return _layers(pristine_tree)


def test_gemma4_31b_full_layers_drop_mm_prefix_sliding_keep_it(patched_layers):
    layers = patched_layers["gemma4"]
    assert patched_layers["gemma4_config_is_mm_prefix_lm"] is True
    full = {i: layer for i, layer in layers.items() if layer["type"] == "full_attention"}
    sliding = {i: layer for i, layer in layers.items() if layer["type"] == "sliding_attention"}
    assert (len(full), len(sliding)) == (10, 50)
    assert all(layer["use_mm_prefix"] is False for layer in full.values()), full
    assert all(layer["use_mm_prefix"] is True for layer in sliding.values()), sliding
    # The vision-bidi sliding layers stay on a backend that implements the prefix-LM mask, and
    # TurboQuant full layers now construct (boundary 58/59 would be bf16 TRITON_ATTN).
    assert {layer["backend"] for layer in sliding.values()} == {"TRITON_ATTN"}
    assert {i: layer["backend"] for i, layer in full.items()} == {
        "5": "TURBOQUANT", "11": "TURBOQUANT", "17": "TURBOQUANT", "23": "TURBOQUANT",
        "29": "TURBOQUANT", "35": "TURBOQUANT", "41": "TURBOQUANT", "47": "TURBOQUANT",
        "53": "TURBOQUANT", "59": "TRITON_ATTN"}


def test_all_layer_prefix_lm_is_unchanged(patched_layers, pristine_layers):
    for result in (patched_layers, pristine_layers):
        assert result["gemma3_config_is_mm_prefix_lm"] is True
        layers = result["gemma3"]
        assert len(layers) == 26
        assert all(layer["use_mm_prefix"] is True for layer in layers.values()), layers
    # TurboQuant does not claim mm-prefix support (Gemma 3 full layers still cannot use it).
    assert patched_layers["turboquant_supports_mm_prefix"] is False


def test_pristine_sets_mm_prefix_everywhere_and_fails(pristine_layers):
    layers = pristine_layers["gemma4"]
    sliding = [layer for layer in layers.values() if layer["type"] == "sliding_attention"]
    assert all(layer["use_mm_prefix"] is True for layer in sliding)
    assert layers["59"]["use_mm_prefix"] is True  # bf16 boundary layer, still constructs
    for index in ("5", "11", "53"):
        error = layers[index]["error"]
        assert error.startswith("ValueError: No valid attention backend found for cuda"), error
        assert "use_mm_prefix=True" in error
        assert "TURBOQUANT: [partial multimodal token full attention not supported]" in error
