"""Gate 2 (patch 0004): per-layer attention backend routing for TurboQuant's mixed KV dtypes.

A TurboQuant model has turboquant_* layers and unquantized ("auto") boundary/sliding skip layers.
Stock 0.26.0 validates one forced backend against every layer and dies on the first mismatch:
Gemma4Config forces TRITON_ATTN where FA4 is missing (sm_86, sm_120), which cannot store
turboquant_* layers; `--attention-backend TURBOQUANT` cannot store the "auto" layers.

Each case below builds the real VllmConfig from the committed full-size HF config
(EngineArgs.create_engine_config, so Gemma4Config runs) and constructs every decoder layer's real
`Attention` the way gemma4.py / qwen3_next.py do, on vLLM's real CudaPlatform with a given device
capability. No GPU kernel runs. What is simulated, and why, is in CUDA_HOST_PREAMBLE.
The skip list is the one the series produces (boundary layers, and `sliding_window` for Gemma 4),
set after the config is built so the pristine tree gets the same layer dtypes.
"""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_in_vllm

GEMMA4_31B = REPO / "configs" / "hf" / "gemma-4-31b-it"
QWEN36_27B = REPO / "configs" / "hf" / "qwen3.6-27b"
CAPABILITIES = ["8.6", "9.0", "12.0"]  # RTX 3090, H100/H200, RTX 5060 Ti

# Runs inside the vLLM subprocess. Defines use_cuda_capability(), build_config() and
# build_layers(); shared with test_gate1_mm_prefix.py.
CUDA_HOST_PREAMBLE = r'''
import importlib, json, os, shutil, sys, tempfile, traceback, types
import torch

# transformers' Gemma 4 / Qwen3-VL image processors import torchvision at module level, and vLLM
# imports them when it inspects the model class (in a subprocess too, hence PYTHONPATH). PyPI has
# no CPU torchvision for torch 2.13 (the CUDA build cannot load here), so a placeholder package
# with just the names transformers touches at import time stands in. No image is processed.
_TORCHVISION_PLACEHOLDER = {
    "torchvision/__init__.py": '__version__ = "0.28.0"\n',
    "torchvision/io.py": (
        "import enum\n"
        "class ImageReadMode(enum.Enum):\n"
        "    UNCHANGED = 0\n    GRAY = 1\n    GRAY_ALPHA = 2\n    RGB = 3\n    RGB_ALPHA = 4\n"
        "def decode_image(*args, **kwargs):\n"
        "    raise NotImplementedError('torchvision placeholder')\n"),
    "torchvision/transforms/__init__.py": (
        "import enum\n"
        "class InterpolationMode(enum.Enum):\n"
        "    NEAREST = 'nearest'\n    NEAREST_EXACT = 'nearest-exact'\n"
        "    BILINEAR = 'bilinear'\n    BICUBIC = 'bicubic'\n    BOX = 'box'\n"
        "    HAMMING = 'hamming'\n    LANCZOS = 'lanczos'\n"),
    "torchvision/transforms/functional.py": (
        "def pil_to_tensor(*args, **kwargs):\n"
        "    raise NotImplementedError('torchvision placeholder')\n"),
    "torchvision/transforms/v2/__init__.py": "",
    "torchvision/transforms/v2/functional.py": (
        "from torchvision.transforms import InterpolationMode  # noqa: F401\n"),
}


def _torchvision_placeholder():
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    root = tempfile.mkdtemp(prefix="tq-torchvision-")
    __import__("atexit").register(__import__("shutil").rmtree, root, True)
    for relpath, text in _TORCHVISION_PLACEHOLDER.items():
        os.makedirs(os.path.dirname(os.path.join(root, relpath)), exist_ok=True)
        with open(os.path.join(root, relpath), "w") as f:
            f.write(text)
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))

_torchvision_placeholder()

# These modules probe CUDA-only custom ops (torch.ops._C) at import time when they believe they are
# on CUDA, so they are imported while the platform is still this machine's own.
import vllm.engine.arg_utils  # noqa: E402,F401
import vllm.model_executor.model_loader  # noqa: E402,F401
import vllm.model_executor.models.registry  # noqa: E402,F401


def use_cuda_capability(major, minor):
    """Make vLLM's real CudaPlatform current with the given device capability.

    The wheel's compiled CUDA extensions cannot load on a CPU torch; they are registered as present
    (empty modules) so vLLM's Python sees what it sees on a GPU host with this wheel: FA2/FA3
    shipped, FA4 "available" because cute/interface.py exists (FA4 support then follows the
    capability, as in vllm_flash_attn), FlashInfer not installed (as on the test GPU host).
    """
    for name in ("vllm._C_stable_libtorch", "vllm.vllm_flash_attn._vllm_fa2_C",
                 "vllm.vllm_flash_attn._vllm_fa3_C"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import vllm.platforms as platforms
    from vllm.platforms.cuda import NonNvmlCudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class CapabilityCudaPlatform(NonNvmlCudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id=0):
            return DeviceCapability(major, minor)

        @classmethod
        def get_device_name(cls, device_id=0):
            return f"cuda sm_{major}{minor}"

    old, new = platforms.current_platform, CapabilityCudaPlatform()
    platforms.current_platform = new
    # Modules that did `from vllm.platforms import current_platform` hold the old object.
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm") and vars(module).get("current_platform") is old:
            module.current_platform = new
    import vllm.v1.attention.backends.fa_utils as fa_utils  # picks flash_attn by platform
    importlib.reload(fa_utils)
    from vllm.v1.attention.selector import _cached_get_attn_backend
    _cached_get_attn_backend.cache_clear()


def build_config(model_dir, kv_cache_dtype, skip_layers, attention_backend=None):
    from vllm.engine.arg_utils import EngineArgs
    workdir = tempfile.mkdtemp(prefix="tq-model-")
    __import__("atexit").register(__import__("shutil").rmtree, workdir, True)
    shutil.copy(os.path.join(model_dir, "config.json"), workdir)
    args = EngineArgs(model=workdir, load_format="dummy", skip_tokenizer_init=True,
                      kv_cache_dtype=kv_cache_dtype, max_model_len=4096, enforce_eager=True,
                      attention_backend=attention_backend)
    config = args.create_engine_config()
    config.cache_config.kv_cache_dtype_skip_layers = list(skip_layers)
    return config


def build_layers(config):
    """Construct each decoder layer's Attention as gemma4.py / qwen3_next.py do.

    Returns {layer index: {"type", "use_mm_prefix", "kv_cache_dtype", "backend"}} or, where
    construction fails, {"type", "error"}.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention

    text = config.model_config.hf_text_config
    is_gemma4 = getattr(text, "global_head_dim", None) is not None
    result = {}
    torch.set_default_dtype(config.model_config.dtype)
    with set_current_vllm_config(config):
        for index, layer_type in enumerate(text.layer_types):
            if layer_type == "linear_attention":
                continue  # Gated DeltaNet (Mamba-style) layer: no attention backend
            sliding = layer_type == "sliding_attention"
            if is_gemma4 and not sliding:
                head_size, kv_heads = text.global_head_dim, text.num_global_key_value_heads
            else:
                head_size, kv_heads = text.head_dim, text.num_key_value_heads
            prefix = (f"model.language_model.layers.{index}.self_attn.attn"
                      if is_gemma4 else f"model.layers.{index}.self_attn.attn")
            try:
                layer = Attention(text.num_attention_heads, head_size, head_size ** -0.5,
                                  num_kv_heads=kv_heads, cache_config=config.cache_config,
                                  per_layer_sliding_window=text.sliding_window if sliding else None,
                                  mm_prefix_clamp_sliding_window=is_gemma4 and sliding,
                                  prefix=prefix)
                result[index] = {"type": layer_type, "use_mm_prefix": layer.use_mm_prefix,
                                 "kv_cache_dtype": layer.kv_cache_dtype,
                                 "backend": layer.attn_backend.get_name()}
            except Exception as exc:
                result[index] = {"type": layer_type, "error": f"{type(exc).__name__}: {exc}"}
    torch.set_default_dtype(torch.float32)
    return result
'''

GEMMA4_SKIP = ["0", "1", "58", "59", "sliding_window"]  # boundary 0,1,58,59 + sliding layers
QWEN36_SKIP = ["3", "7", "59", "63"]  # first/last two full-attention layers (hybrid boundary)
# (label, model, user --attention-backend, skip list)
SCENARIOS = [
    ("gemma4_default", "gemma", None, GEMMA4_SKIP),
    ("gemma4_forced_turboquant", "gemma", "TURBOQUANT", GEMMA4_SKIP),
    ("gemma4_forced_flash_attn", "gemma", "FLASH_ATTN", GEMMA4_SKIP),
    ("qwen36_default", "qwen", None, QWEN36_SKIP),
    ("qwen36_forced_turboquant", "qwen", "TURBOQUANT", QWEN36_SKIP),
    ("qwen36_forced_triton", "qwen", "TRITON_ATTN", QWEN36_SKIP),
]
# Representative layers: Gemma 4 31B sliding+boundary 0, sliding 2, full TurboQuant 5,
# full boundary 59; Qwen3.6-27B full boundary 3, full TurboQuant 11.
KINDS = {
    "gemma": {"sliding_boundary": 0, "sliding": 2, "full_tq": 5, "full_boundary": 59},
    "qwen": {"full_boundary": 3, "full_tq": 11},
}

ROUTING_CODE = CUDA_HOST_PREAMBLE + r'''
MODELS = {"gemma": %(gemma)r, "qwen": %(qwen)r}
SCENARIOS = %(scenarios)r
KINDS = %(kinds)r
out = {}
for cap in %(caps)r:
    use_cuda_capability(*map(int, cap.split(".")))
    for label, model, backend, skip in SCENARIOS:
        try:
            config = build_config(MODELS[model], "turboquant_4bit_nc", skip, backend)
        except Exception as exc:
            out[f"{cap}/{label}"] = {"config_error": f"{type(exc).__name__}: {exc}"}
            continue
        forced = config.attention_config.backend
        layers = build_layers(config)
        row = {"config_backend": forced.name if forced is not None else None}
        for kind, index in KINDS[model].items():
            layer = layers[index]
            row[kind] = layer.get("backend") or layer["error"]
        row["all_layers_ok"] = all("error" not in layer for layer in layers.values())
        out[f"{cap}/{label}"] = row
print(json.dumps(out))
'''


def _route(tree):
    code = ROUTING_CODE % {"gemma": str(GEMMA4_31B), "qwen": str(QWEN36_27B),
                           "scenarios": SCENARIOS, "kinds": KINDS, "caps": CAPABILITIES}
    run = run_in_vllm(tree, code, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run, run.json()


@pytest.fixture(scope="module")
def patched_routing(patched_tree):
    return _route(patched_tree)


@pytest.fixture(scope="module")
def pristine_routing(pristine_tree):
    return _route(pristine_tree)


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_patched_routes_each_layer(patched_routing, cap):
    run, routing = patched_routing
    print(json.dumps({k: v for k, v in routing.items() if k.startswith(cap + "/")}, indent=1))
    expected_gemma = {"config_backend": "TRITON_ATTN", "sliding_boundary": "TRITON_ATTN",
                      "sliding": "TRITON_ATTN", "full_tq": "TURBOQUANT",
                      "full_boundary": "TRITON_ATTN", "all_layers_ok": True}
    # Gemma 4: one kernel (Triton) for every unquantized layer on every GPU, TurboQuant layers on
    # TURBOQUANT, with or without --attention-backend TURBOQUANT.
    assert routing[f"{cap}/gemma4_default"] == expected_gemma
    assert routing[f"{cap}/gemma4_forced_turboquant"] == expected_gemma
    # Qwen3.6 (no Gemma4Config): unforced layers take the priority search (FA2 first).
    assert routing[f"{cap}/qwen36_default"] == {
        "config_backend": None, "full_boundary": "FLASH_ATTN", "full_tq": "TURBOQUANT",
        "all_layers_ok": True}
    assert routing[f"{cap}/qwen36_forced_turboquant"] == {
        "config_backend": "TURBOQUANT", "full_boundary": "FLASH_ATTN", "full_tq": "TURBOQUANT",
        "all_layers_ok": True}
    assert routing[f"{cap}/qwen36_forced_triton"] == {
        "config_backend": "TRITON_ATTN", "full_boundary": "TRITON_ATTN", "full_tq": "TURBOQUANT",
        "all_layers_ok": True}


def test_patched_other_invalid_reasons_still_raise(patched_routing):
    """A forced backend that is invalid for a reason other than the dtype split still fails:
    FLASH_ATTN (FA2 under TurboQuant) cannot do Gemma 4's vision mm-prefix on sliding layers."""
    _, routing = patched_routing
    for cap in CAPABILITIES:
        row = routing[f"{cap}/gemma4_forced_flash_attn"]
        assert row["config_backend"] == "FLASH_ATTN"
        assert row["sliding"].startswith("ValueError: Selected backend AttentionBackendEnum.FLASH_ATTN "
                                         "is not valid for this configuration. Reason: [")
        assert "kv_cache_dtype not supported" not in row["sliding"]
        assert "requires FlashAttention v4" in row["sliding"]
        assert row["all_layers_ok"] is False


def test_patched_logs_the_fallback(patched_routing):
    run, _ = patched_routing
    log = run.stdout + run.stderr
    assert ("Selected backend TRITON_ATTN cannot serve layers with kv_cache_dtype "
            "turboquant_4bit_nc (kv_cache_dtype not supported)") in log
    assert ("Selected backend TURBOQUANT cannot serve layers with kv_cache_dtype auto "
            "(kv_cache_dtype not supported)") in log


def test_pristine_fails_with_recorded_errors(pristine_routing):
    _, routing = pristine_routing
    dtype_error = ("ValueError: Selected backend AttentionBackendEnum.TRITON_ATTN is not valid for "
                   "this configuration. Reason: ['kv_cache_dtype not supported']")
    # sm_86 / sm_120 (no FA4): Gemma4Config forces TRITON_ATTN, TurboQuant layers are refused.
    for cap in ("8.6", "12.0"):
        assert routing[f"{cap}/gemma4_default"]["full_tq"] == dtype_error
    # Hopper (FA4 present): nothing is forced, and gate 1 refuses TURBOQUANT instead.
    hopper = routing["9.0/gemma4_default"]["full_tq"]
    assert hopper.startswith("ValueError: No valid attention backend found")
    assert "TURBOQUANT: [partial multimodal token full attention not supported]" in hopper
    for cap in CAPABILITIES:
        assert routing[f"{cap}/qwen36_forced_turboquant"]["full_boundary"] == (
            "ValueError: Selected backend AttentionBackendEnum.TURBOQUANT is not valid for this "
            "configuration. Reason: ['kv_cache_dtype not supported']")
        assert routing[f"{cap}/qwen36_forced_triton"]["full_tq"] == dtype_error
        assert routing[f"{cap}/gemma4_forced_turboquant"]["sliding"].startswith(
            "ValueError: Selected backend AttentionBackendEnum.TURBOQUANT is not valid for this "
            "configuration. Reason: ['kv_cache_dtype not supported'")
        # Unforced Qwen already routes per layer in 0.26.0.
        assert routing[f"{cap}/qwen36_default"]["all_layers_ok"] is True
