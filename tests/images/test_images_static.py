"""Static checks of the images: hadolint, shellcheck, the Dockerfile contract the compose files rely on,
and the lock files."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import COMMON, REPO, run

IMAGES = {"rtx5060ti": "12.0", "rtx3090": "8.6", "arc-b70": None}  # image -> TORCH_CUDA_ARCH_LIST
DOCKERFILES = {name: REPO / "images" / name / "Dockerfile" for name in IMAGES}
# the recipe, and the buildah build scripts (images/build*.sh, images/standin/)
SCRIPTS = sorted([*COMMON.glob("*.sh"), *(REPO / "images").glob("*.sh"), *(REPO / "images" / "standin").glob("*.sh")])
TQ_DTYPES = {"turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not on PATH; run the tests through `make images-check`, which installs it"
    return path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the final stage, continuation lines joined, comments dropped."""
    logical, current = [], []
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            logical.append(" ".join(part for part in current if part))
            current = []
    pairs = [(item.partition(" ")[0].upper(), item.partition(" ")[2].strip()) for item in logical]
    last_from = max(i for i, (op, _) in enumerate(pairs) if op == "FROM")
    return pairs[last_from:]


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_passes(image):
    result = run([tool("hadolint"), DOCKERFILES[image]], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path):
    """The linter must fail a Dockerfile with classic mistakes, or the test above proves nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp && make\n")
    result = run([tool("hadolint"), bad], check=False)
    assert result.returncode != 0
    assert {"DL3007", "DL3003"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO / "images")))
def test_shellcheck_passes(script):
    result = run([tool("shellcheck"), "-x", script.relative_to(REPO)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_contract(image):
    ops = instructions(DOCKERFILES[image])
    text = DOCKERFILES[image].read_text()
    assert ("ENTRYPOINT", '["vllm", "serve"]') in ops
    assert ("EXPOSE", "8000") in ops
    user = [args for op, args in ops if op == "USER"]
    assert user and user[-1] not in ("root", "0"), "the runtime user must not be root"
    assert "--home-dir /home/vllm" in text and "useradd" in text and " vllm" in text
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "VLLM_PLUGINS=lora_filesystem_resolver,lora_hf_hub_resolver" in env
    assert "HF_HOME=/home/vllm/.cache/huggingface" in env and "PATH=/opt/venv/bin:" in env
    runs = [args for op, args in ops if op == "RUN"]
    order = [next(i for i, r in enumerate(runs) if step in r)
             for step in ("install-vllm.sh", "apply-patches.sh", "verify.py")]
    assert order == sorted(order), "install, then patch, then verify, all at build time"
    assert not [a for op, a in ops if op in ("ENTRYPOINT", "CMD") and "apply" in a], "never patch at boot"
    labels = " ".join(args for op, args in ops if op == "LABEL")
    assert "org.opencontainers.image.version" in labels and "io.tqstack.patch-series.sha256" in labels
    assert not re.search(r"(?i)(token|password|secret)\s*=", env), "no secrets baked into ENV"
    base = re.search(r"^ARG (?:CUDA_BASE_IMAGE|UBUNTU_IMAGE)=(\S+)$", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), f"base image {base} must be pinned by tag"


@pytest.mark.parametrize("image", [name for name, arch in IMAGES.items() if arch])
def test_cuda_images_pin_cuda13_base_and_arch(image):
    text = DOCKERFILES[image].read_text()
    assert re.search(r"^ARG CUDA_BASE_IMAGE=nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04$", text, re.M)
    assert f'ARG TORCH_CUDA_ARCH_LIST="{IMAGES[image]}"' in text
    assert "requirements-cuda.lock" in text


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_keeps_what_the_dockerfile_copies(image):
    """BuildKit reads images/<hw>/Dockerfile.dockerignore; every COPY source must survive it."""
    ignore = (REPO / "images" / image / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for op, args in instructions(DOCKERFILES[image]):
        if op == "COPY" and "--from=" not in args:
            source = args.split()[0].rstrip("/")
            assert source in kept and (REPO / source).exists(), f"COPY {source} is excluded or missing"


def lock_pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.M))
    entries = re.findall(r"^[A-Za-z0-9_.\-]+==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert len(entries) == len(pins), f"{path.name}: every pin must carry --hash lines"
    unpinned = [line for line in text.splitlines() if line and not line.startswith((" ", "#")) and "==" not in line]
    assert not unpinned, f"{path.name}: unpinned requirements {unpinned}"
    return pins


def test_cuda_lock_pins_the_stack_and_excludes_the_plugin():
    path = COMMON / "requirements-cuda.lock"
    pins = lock_pins(path)
    assert pins["vllm"] == "0.26.0" and pins["transformers"] == "5.14.1" and pins["torch"] == "2.11.0"
    assert "ninja" in pins and pins["nvidia-cuda-runtime"].startswith("13.0.")
    assert "turboquant-vllm" not in pins
    assert path.stat().st_size < 1_000_000


def test_xpu_lock_is_the_pypi_part_of_the_xpu_stack():
    path = COMMON / "requirements-xpu.lock"
    pins = lock_pins(path)
    assert pins["transformers"] == "5.14.1" and pins["numba"] == "0.65.0" and "ninja" in pins
    assert not {"torch", "vllm", "turboquant-vllm", "triton"} & set(pins), "those come from the XPU index / sdist"
    assert not [name for name in pins if name.startswith("nvidia-")]
    assert path.stat().st_size < 1_000_000


def test_verify_expects_exactly_the_served_dtypes():
    sys.path.insert(0, str(COMMON))
    try:
        import verify
    finally:
        sys.path.remove(str(COMMON))
    assert verify.EXPECTED_TQ_DTYPES == TQ_DTYPES and verify.EXPECTED_VLLM_VERSION == "0.26.0"
