"""Import vLLM's pure-Triton TurboQuant kernel files without the rest of vLLM.

A GPU host may have torch and Triton but no vLLM. The kernel files only need
`vllm.triton_utils` (triton, tl) and `vllm.platforms.current_platform`; this module
registers those two stand-ins and loads the real kernel sources from a directory
staged by stage_sources.sh (a copy of the patched tree's files, same relative paths).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

KERNEL_FILES = [
    "vllm/v1/attention/ops/triton_decode_attention.py",
    "vllm/v1/attention/ops/triton_turboquant_decode.py",
    "vllm/v1/attention/ops/triton_turboquant_store.py",
    "vllm/v1/attention/ops/tqstack_turboquant.py",
    "vllm/model_executor/layers/quantization/turboquant/centroids.py",
]


def _package(name: str) -> types.ModuleType:
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = []  # a namespace-like package
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(_package(parent), child, mod)
    return sys.modules[name]


def install(sources: Path) -> None:
    import torch
    import triton
    import triton.language as tl

    utils = _package("vllm.triton_utils")
    utils.triton, utils.tl = triton, tl
    platforms = _package("vllm.platforms")

    class _Platform:
        def is_cuda_alike(self) -> bool:
            return torch.cuda.is_available()

        def is_cuda(self) -> bool:
            return torch.cuda.is_available()

        def is_rocm(self) -> bool:
            return False

    platforms.current_platform = _Platform()
    for rel in KERNEL_FILES:
        path = sources / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run tests/gpu/kernels/stage_sources.sh first")
        name = rel[: -len(".py")].replace("/", ".")
        _package(name.rpartition(".")[0])
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(sys.modules[name.rpartition(".")[0]], name.rpartition(".")[2], mod)
