"""KV-cache planning probe, run *inside* a vLLM subprocess (PYTHONPATH = a pristine or patched tree).

For each case (model config dir x kv_cache_dtype) it runs the real vLLM 0.26.0 path as far as a
CPU allows and prints one JSON line: a list with one result per case.

    EngineArgs(...).create_engine_config()              real (skip list: boundary, sliding, YOCO)
    Platform.update_block_size_for_backend(vllm_config) real (phases 1-3 of the block planner)
    per-layer KV specs                                  real Attention.get_kv_cache_spec (see below)
    get_kv_cache_configs(vllm_config, [specs], [mem])   real (unify, groups, num_blocks, the
                                                        "GPU KV cache size" / max-concurrency report)

What is *not* real, and why:
* The model is not constructed: a 31B model cannot be built on a 24 GB CPU machine. Each decoder
  layer is described by a small `_ProbeAttentionLayer` carrying exactly the attributes that
  `Attention.__init__` derives from the HF config (sliding window, head size, KV heads, the
  per-layer dtype after `kv_cache_dtype_skip_layers`, KV-sharing target as in gemma4.py).
  `Attention.get_kv_cache_spec` itself is vLLM's code, called on that layer. Mamba (GDN) layers
  get `MambaSpec` built as `MambaBase.get_kv_cache_spec` does, with the model class's own
  `get_mamba_state_shape_from_config` / `get_mamba_state_dtype_from_config`.
* Backends are chosen as on a CUDA GPU without FA4 (sm_120 / Ampere): TurboQuant layers get
  TURBOQUANT, every other attention layer TRITON_ATTN. Only their block-size rules and
  `indexes_kv_by_block_stride` are used, no kernel runs.
* The platform is vLLM's real `CudaPlatform` with the device capability / memory / name given as
  inputs; two CUDA-only native modules (`vllm._C_stable_libtorch`, `vllm.vllm_flash_attn`) are
  replaced by empty modules so `vllm.platforms.cuda` imports without a GPU driver.
* vLLM inspects the model class in a subprocess that imports the model's module; the multimodal
  modules (gemma4_mm, qwen3_5 via qwen3_vl) import transformers' image processors, which import
  torchvision, and PyPI has no CPU torchvision for torch 2.13. So Gemma 4 runs as vLLM's text-only
  `Gemma4ForCausalLM` (same decoder layers and KV layout) and Qwen3.6 as `Qwen3NextForCausalLM`,
  whose `get_mamba_state_shape_from_config` / `get_mamba_state_dtype_from_config` are the same
  GatedDeltaNet formulas as `Qwen3_5ForConditionalGeneration`'s (both read the same text config).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
import types

GIB = 2**30


def _install_cuda_platform(capability: tuple[int, int], total_memory: int, name: str) -> None:
    # Imported while the platform is still "unspecified": these modules query CUDA-only custom ops
    # at import time when they believe they are on CUDA.
    import vllm.model_executor.model_loader  # noqa: F401

    sys.modules.setdefault("vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    flash_attn = types.ModuleType("vllm.vllm_flash_attn")

    def _no_kernel(*_args, **_kwargs):
        raise RuntimeError("no CUDA kernels on this CPU-only test machine")

    for attr in ("compile_flash_attn_varlen_func_from_specs", "flash_attn_varlen_func",
                 "get_scheduler_metadata", "fa_version_unsupported_reason"):
        setattr(flash_attn, attr, _no_kernel)
    flash_attn.is_fa_version_supported = lambda *_a, **_k: False
    flash_attn.FA2_AVAILABLE = flash_attn.FA3_AVAILABLE = False
    sys.modules["vllm.vllm_flash_attn"] = flash_attn

    import vllm.platforms as platforms
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class ProbeCudaPlatform(CudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(*capability)

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return total_memory

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return name

    platforms._current_platform = ProbeCudaPlatform()


def _make_layer_class():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    class _ProbeAttentionLayer(AttentionLayerBase):
        """The attributes Attention.get_kv_cache_spec reads, as Attention.__init__ sets them."""

        get_kv_cache_spec = Attention.get_kv_cache_spec

        def __init__(self, **attrs):
            self.__dict__.update(attrs)

        def get_attn_backend(self):
            return self.attn_backend

    return _ProbeAttentionLayer


def _layer_plan(vllm_config) -> list[dict]:
    """Per decoder layer: kind, window, head size, KV heads, dtype, KV-sharing source."""
    text = vllm_config.model_config.hf_text_config
    skip = vllm_config.cache_config.kv_cache_dtype_skip_layers
    cache_dtype = vllm_config.cache_config.cache_dtype
    layer_types = list(text.layer_types)
    num_layers = text.num_hidden_layers
    first_shared = num_layers - (getattr(text, "num_kv_shared_layers", 0) or 0)
    plan = []
    for idx, layer_type in enumerate(layer_types):
        if layer_type == "linear_attention":
            plan.append({"idx": idx, "kind": "mamba"})
            continue
        sliding = layer_type == "sliding_attention"
        if not sliding and getattr(text, "global_head_dim", None):  # Gemma 4 full layers
            head_size = text.global_head_dim
            kv_heads = (text.num_global_key_value_heads
                        if getattr(text, "attention_k_eq_v", False) and text.num_global_key_value_heads
                        else text.num_key_value_heads)
        else:
            head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            kv_heads = text.num_key_value_heads
        skipped = str(idx) in skip or (sliding and "sliding_window" in skip)
        source = None
        if idx >= first_shared:  # same rule as model_executor/models/gemma4.py
            before = layer_types[:first_shared]
            source = len(before) - 1 - before[::-1].index(layer_type)
        plan.append({
            "idx": idx, "kind": "sliding" if sliding else "full",
            "window": text.sliding_window if sliding else None,
            "head_size": head_size, "kv_heads": kv_heads,
            "dtype": "auto" if (skipped or cache_dtype == "auto") else cache_dtype,
            "kv_source": source,
        })
    return plan


def _page_bytes_per_token(spec) -> int:
    from dataclasses import replace

    return replace(spec, block_size=1, page_size_padded=None).real_page_size_bytes


def set_case_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set a case's environment variables; returns what to give restore_env afterwards."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def probe_case(case: dict) -> dict:
    from vllm.engine.arg_utils import EngineArgs

    saved_env = set_case_env(case.get("env", {}))
    model_dir = tempfile.mkdtemp(prefix="tq-probe-")
    __import__("atexit").register(__import__("shutil").rmtree, model_dir, True)
    shutil.copy(os.path.join(case["config_dir"], "config.json"), model_dir)
    result: dict = {"model": case["name"], "dtype": case["kv_cache_dtype"],
                    "label": case.get("label") or f"{case['name']}/{case['kv_cache_dtype']}"}
    stage = "create_engine_config"
    try:
        kwargs = dict(
            model=model_dir, load_format="dummy", skip_tokenizer_init=True,
            max_model_len=case.get("max_model_len", 32768), kv_cache_dtype=case["kv_cache_dtype"],
            gpu_memory_utilization=0.90, max_num_seqs=8, enforce_eager=True,
            max_num_batched_tokens=case.get("max_num_batched_tokens", 16384),
            kv_cache_dtype_skip_layers=case.get("skip_layers", []),
        )
        kwargs.update(case.get("engine_args", {}))
        if case.get("architecture"):
            kwargs["hf_overrides"] = {"architectures": [case["architecture"]]}
        vllm_config = EngineArgs(**kwargs).create_engine_config()
        cache = vllm_config.cache_config
        result.update(
            skip_layers=list(cache.kv_cache_dtype_skip_layers),
            max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            max_in_flight_tokens=vllm_config.max_in_flight_tokens,
            async_scheduling=vllm_config.scheduler_config.async_scheduling,
        )
        if case.get("force_skip_layers") is not None:
            # Planner-only cases on the pristine tree, whose arg_utils cannot build this list.
            cache.kv_cache_dtype_skip_layers = list(case["force_skip_layers"])

        stage = "layer specs"
        from vllm.config.vllm import set_current_vllm_config
        from vllm.platforms import current_platform
        from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
        from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend
        from vllm.v1.attention.backend import AttentionType
        from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

        layer_cls = _make_layer_class()
        plan = _layer_plan(vllm_config)
        prefix = "model.layers"
        forward_context = vllm_config.compilation_config.static_forward_context
        layers = {}
        for entry in plan:
            if entry["kind"] == "mamba":
                continue
            backend = (TurboQuantAttentionBackend if entry["dtype"].startswith("turboquant_")
                       else TritonAttentionBackend)
            name = f"{prefix}.{entry['idx']}.self_attn.attn"
            layers[name] = layer_cls(
                attn_type=AttentionType.DECODER, attn_backend=backend,
                kv_cache_dtype=entry["dtype"],
                kv_cache_torch_dtype=kv_cache_dtype_str_to_dtype(entry["dtype"], vllm_config.model_config),
                sliding_window=entry["window"], num_kv_heads=entry["kv_heads"],
                head_size=entry["head_size"], head_size_v=entry["head_size"],
                kv_sharing_target_layer_name=(f"{prefix}.{entry['kv_source']}.self_attn.attn"
                                              if entry["kv_source"] is not None else None),
            )
        forward_context.update(layers)

        stage = "update_block_size_for_backend"
        current_platform.update_block_size_for_backend(vllm_config)
        result["block_size"] = cache.block_size

        stage = "layer specs"
        specs = {}
        with set_current_vllm_config(vllm_config):
            for name, layer in layers.items():
                if layer.kv_sharing_target_layer_name:
                    continue  # as the runner does: shared layers own no KV cache
                spec = layer.get_kv_cache_spec(vllm_config)
                if isinstance(spec, AttentionSpec):
                    from dataclasses import replace
                    spec = replace(spec, indexes_kv_by_block_stride=layer.attn_backend.indexes_kv_by_block_stride())
                specs[name] = spec
            mamba_layers = [e for e in plan if e["kind"] == "mamba"]
            if mamba_layers:
                from vllm.model_executor.models import ModelRegistry
                from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

                model_cls, _ = ModelRegistry.resolve_model_cls(
                    vllm_config.model_config.architecture, model_config=vllm_config.model_config)
                for entry in mamba_layers:
                    specs[f"{prefix}.{entry['idx']}.linear_attn"] = MambaSpec(
                        shapes=tuple(model_cls.get_mamba_state_shape_from_config(vllm_config)),
                        dtypes=model_cls.get_mamba_state_dtype_from_config(vllm_config),
                        block_size=cache.mamba_block_size,
                        page_size_padded=cache.mamba_page_size_padded,
                        mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
                        mamba_cache_mode=cache.mamba_cache_mode,
                    )
            specs = dict(sorted(specs.items(), key=lambda kv: int(kv[0].split(".")[2])))

            stage = "get_kv_cache_configs"
            from vllm.v1.core import kv_cache_utils

            reports: list[str] = []
            original_info_once = kv_cache_utils.logger.info_once
            kv_cache_utils.logger.info_once = lambda msg, *args, **kw: reports.append(msg % args)
            try:
                memory = int(case["kv_memory_bytes"])
                (kv_config,) = kv_cache_utils.get_kv_cache_configs(vllm_config, [specs], [memory])
            finally:
                kv_cache_utils.logger.info_once = original_info_once

        groups = []
        layer_pages = {}
        for group in kv_config.kv_cache_groups:
            spec = group.kv_cache_spec
            groups.append({
                "type": type(spec).__name__, "layers": [int(n.split(".")[2]) for n in group.layer_names],
                "block_size": spec.block_size, "page_size": spec.page_size_bytes,
            })
            for layer_name in group.layer_names:
                layer_pages[layer_name] = spec
        real_bytes = sum(
            (s.real_page_size_bytes if isinstance(s, AttentionSpec)
             else __import__("dataclasses").replace(s, page_size_padded=None).page_size_bytes)
            for s in layer_pages.values())
        padded_bytes = sum(s.page_size_bytes for s in layer_pages.values())
        bytes_per_token = {}
        for name, spec in layer_pages.items():
            if isinstance(spec, AttentionSpec):
                bytes_per_token[name.split(".")[2]] = _page_bytes_per_token(spec)
        tokens = next((r for r in reports if r.startswith("GPU KV cache size")), "")
        concurrency = next((r for r in reports if r.startswith("Maximum concurrency")), "")
        result.update(
            ok=True, groups=groups, num_blocks=kv_config.num_blocks,
            padding_pct=100.0 * (padded_bytes - real_bytes) / padded_bytes,
            bytes_per_token_per_layer=bytes_per_token,
            report_tokens=int(tokens.split(":")[1].split("tokens")[0].replace(",", "")) if tokens else None,
            report_concurrency=float(concurrency.rsplit(":", 1)[1].strip().rstrip("x")) if concurrency else None,
            reports=reports,
        )
    except Exception as exc:  # the expected failures of the pristine tree are results too
        result.update(ok=False, stage=stage, error_type=type(exc).__name__, error=str(exc),
                      traceback=traceback.format_exc()[-3000:])
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        restore_env(saved_env)
    return result


def main(cases: list[dict], capability=(12, 0), total_memory=141 * GIB, name="NVIDIA H200") -> None:
    _install_cuda_platform(tuple(capability), total_memory, name)
    results = [probe_case(case) for case in cases]
    print(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Host side (the pytest process): case lists and one cached probe run per tree.

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODELS = {
    # name: (architecture run on CPU, KV memory of the unpatched H200 baseline in GiB, extra args)
    # Gemma 4 31B: 65.03 GiB (tests/gpu/results/2026-11-21-h200.jsonl); E4B and Qwen: the memory that reproduces the measured
    # baseline (2,041,346 tokens / 62.30x and 1,109,742 tokens / 33.87x) with the pristine planner.
    "gemma-4-31b-it": ("Gemma4ForCausalLM", 65.03, {}),
    "gemma-4-e4b-it": ("Gemma4ForCausalLM", 109.1, {}),
    # what Qwen3_5ForConditionalGenerationConfig.verify_and_update_config sets from the HF config
    "qwen3.6-27b": ("Qwen3NextForCausalLM", 72.96, {"mamba_ssm_cache_dtype": "float32"}),
}
DTYPES = ["auto", "turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]


def case(model: str, kv_cache_dtype: str, boundary_layers: int | None = None, **extra) -> dict:
    """One probe case; `boundary_layers` is EngineArgs.turboquant_boundary_layers (patch 0011)."""
    architecture, memory_gib, engine_args = MODELS[model]
    engine_args = dict(engine_args)
    if boundary_layers is not None:
        engine_args["turboquant_boundary_layers"] = boundary_layers
    return {
        "name": model, "config_dir": os.path.join(REPO, "configs", "hf", model),
        "architecture": architecture, "kv_cache_dtype": kv_cache_dtype,
        "kv_memory_bytes": int(memory_gib * GIB), "engine_args": engine_args, **extra,
    }


def all_model_cases() -> list[dict]:
    return [case(model, dtype) for model in MODELS for dtype in DTYPES]


_RESULTS: dict[tuple[str, str], list[dict]] = {}


def run_probe(run_in_vllm, tree, cases: list[dict], timeout: float = 1800) -> list[dict]:
    """Run `cases` in one vLLM subprocess on `tree`; cached per (tree, cases) for the session."""
    key = (str(tree), json.dumps(cases, sort_keys=True))
    if key not in _RESULTS:
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                f"import vllm_kv_probe\nvllm_kv_probe.main({cases!r})")
        cache_root = os.path.join(REPO, "build", "vllm-kv-probe-cache")
        run = run_in_vllm(tree, code, timeout=timeout,
                          env={"VLLM_CACHE_ROOT": cache_root, "VLLM_LOGGING_LEVEL": "WARNING"})
        _RESULTS[key] = run.json()
    return _RESULTS[key]


def by_label(results: list[dict]) -> dict[str, dict]:
    return {r["label"]: r for r in results}


# Skip lists of the patched create_engine_config with --turboquant-boundary-layers unset (2, patch 0011:
# counted on cache-owning full-attention layers). Gemma 4 31B: full layers 5, 11, 53, 59; E4B: 2 capped
# to 1 of its 4 cache-owning full layers (5, 23), plus 23's YOCO readers 29, 35, 41 (0008).
GEMMA31_SKIPS = ["5", "11", "53", "59", "sliding_window"]
E4B_YOCO_SKIPS = ["5", "23", "29", "35", "41", "sliding_window"]
QWEN_BOUNDARY = ["3", "7", "59", "63"]

# One probe run per tree serves every test file (the subprocess start dominates the cost).
PRISTINE_CASES = [
    *(case(model, "auto") for model in MODELS),
    case("gemma-4-31b-it", "turboquant_4bit_nc", skip_layers=["sliding_window"],
         label="31b/manual-sliding-skip"),
    case("qwen3.6-27b", "turboquant_4bit_nc"),
    case("gemma-4-e4b-it", "turboquant_4bit_nc"),
    # Planner-only: the skip lists the patched arg_utils builds, forced onto the pristine planner.
    case("gemma-4-31b-it", "turboquant_4bit_nc", force_skip_layers=GEMMA31_SKIPS, label="31b/forced"),
    case("gemma-4-e4b-it", "turboquant_4bit_nc", force_skip_layers=["0", "1", "40", "41", "sliding_window"],
         label="e4b/forced-boundary"),
    case("gemma-4-e4b-it", "turboquant_4bit_nc", force_skip_layers=E4B_YOCO_SKIPS, label="e4b/forced-yoco"),
    case("qwen3.6-27b", "turboquant_4bit_nc", force_skip_layers=QWEN_BOUNDARY, label="qwen/forced"),
]
PATCHED_CASES = [
    *all_model_cases(),
    case("gemma-4-31b-it", "turboquant_4bit_nc", skip_layers=["sliding_window", "7"],
         label="31b/manual-sliding-skip"),
    case("qwen3.6-27b", "turboquant_4bit_nc", boundary_layers=1, label="qwen/boundary-1"),
    case("qwen3.6-27b", "turboquant_4bit_nc", boundary_layers=0, label="qwen/boundary-0"),
    case("qwen3.6-27b", "turboquant_4bit_nc", boundary_layers=-1, label="qwen/boundary-bad"),
    case("qwen3.6-27b", "turboquant_4bit_nc", env={"TQ_BOUNDARY_LAYERS": "two"}, label="qwen/boundary-env-bad"),
    case("gemma-4-e4b-it", "turboquant_4bit_nc", boundary_layers=0, label="e4b/boundary-0"),
    case("gemma-4-e4b-it", "turboquant_4bit_nc", boundary_layers=0, skip_layers=["29"],
         label="e4b/user-skips-29"),
    case("gemma-4-31b-it", "turboquant_4bit_nc", boundary_layers=1, label="31b/boundary-1"),
]


def pristine_results(run_in_vllm, tree) -> dict[str, dict]:
    return by_label(run_probe(run_in_vllm, tree, PRISTINE_CASES))


def patched_results(run_in_vllm, tree) -> dict[str, dict]:
    return by_label(run_probe(run_in_vllm, tree, PATCHED_CASES))
