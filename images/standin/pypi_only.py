#!/usr/bin/env python3
"""Derive the part of the arc-b70 Dockerfile that builds from PyPI and the Ubuntu archive alone.

Usage: pypi_only.py DOCKERFILE > DERIVED   (the left-out parts are listed on stderr)
The arc-b70 image needs downloads that are not on PyPI: oneAPI from Intel's apt repository, the GPU
user-mode driver and oneCCL from GitHub releases, protoc and a Rust toolchain for the vllm-rs frontend,
and the XPU builds of torch/triton/vllm-xpu-kernels from the PyTorch XPU index. Each RUN that needs one is
replaced by its PyPI part, or by an `echo` that says what was left out; every other instruction (the apt
steps, the user, COPY, ENV, USER, ENTRYPOINT) is kept as written. Fails if a marker is not found, so a
changed Dockerfile cannot silently build less.
"""
from __future__ import annotations

import sys
from pathlib import Path

# marker in a RUN instruction -> (replacement RUN arguments, what was left out)
RULES = [
    ("tools/install_protoc.sh",
     "python3 -m venv /opt/rust-py && /opt/rust-py/bin/pip install --no-cache-dir -r requirements/build/rust.txt",
     "protoc (tools/install_protoc.sh, GitHub release) and the Rust toolchain (build_rust.sh, rustup), "
     "so no vllm-rs frontend binary; the sdist download and requirements/build/rust.txt from PyPI are kept"),
    ("apt.repos.intel.com",
     None, "oneAPI 2025.3 (DPC++ compiler, MKL, oneDNN) from Intel's apt repository"),
    ("intel-graphics-compiler",
     None, "GPU user-mode driver .debs (IGC, compute-runtime, Level Zero) from GitHub releases"),
    ("intel-oneccl",
     None, "oneCCL 2021.15.9 offline installer from GitHub releases"),
    ("requirements-xpu-torch.txt",
     "python3.12 -m venv /opt/venv && /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps "
     "-r /opt/tqstack/images/common/requirements-xpu.lock && rm -rf /opt/vllm-src",
     "XPU torch 2.12.0+xpu, torchaudio, torchvision, triton-xpu 3.7.1, vllm_xpu_kernels 0.1.11.1 (PyTorch XPU "
     "index, GitHub), hence the VLLM_TARGET_DEVICE=xpu build of vLLM from the sdist and install-vllm.sh's "
     "vLLM check; the PyPI part, requirements-xpu.lock (hash-checked), is installed with --no-deps, since "
     "its torch-dependent pins (auto-round-lib, ...) would otherwise pull PyPI's CUDA torch"),
    ("apply-patches.sh", None, "apply-patches.sh (no vLLM installed without the XPU build)"),
    ("verify.py", None, "verify.py at build time (no vLLM installed without the XPU build)"),
]


def logical_lines(text: str) -> list[list[str]]:
    """Physical lines grouped into instructions (continuations joined); comments/blank lines alone."""
    groups, current = [], []
    for line in text.splitlines():
        current.append(line)
        stripped = line.strip()
        if not stripped.endswith("\\") or stripped.startswith("#"):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def main() -> int:
    text = Path(sys.argv[1]).read_text()
    out, used = [], set()
    for group in logical_lines(text):
        joined = "\n".join(group)
        first = group[0].lstrip()
        rule = next((r for r in RULES if first.upper().startswith("RUN") and r[0] in joined), None)
        if rule is None:
            out.append(joined)
            continue
        marker, replacement, left_out = rule
        used.add(marker)
        print(f"left out: {left_out}", file=sys.stderr)
        mount = "--mount=type=cache,target=/root/.cache/pip " if "--mount=type=cache" in joined else ""
        out.append(f"# pypi_only.py replaced a RUN here (marker {marker!r})")
        if replacement:
            out.append(f"RUN {mount}{replacement}")
        else:
            out.append(f"RUN echo {('left out (not on PyPI): ' + left_out)!r}")
    missing = [r[0] for r in RULES if r[0] not in used]
    if missing:
        print(f"pypi_only.py: markers not found in {sys.argv[1]}: {missing}; update RULES", file=sys.stderr)
        return 2
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
