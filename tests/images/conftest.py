"""Fixtures for `make images-check`: the image recipe (images/common/) run natively in CPU mode.

The Dockerfiles run install-vllm.sh, apply-patches.sh and verify.py; so do these tests, on a temp
venv, with one switch (install-vllm.sh --torch-source cpu): torch is the local CPU wheel instead of the
lock's CUDA torch 2.11.0, the lock's GPU-only packages are skipped, and vLLM 0.26.0 comes from the
cached PyPI wheel (still checked against the lock's hashes). Everything else is the image's lock.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "images" / "common"
# The repository's patches/ (override with TQ_IMAGES_PATCHES_DIR to try a work-in-progress copy).
PATCHES = Path(os.environ.get("TQ_IMAGES_PATCHES_DIR", REPO / "patches"))
CACHE = Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache" / "tqstack"))
PINS = dict(line.split("=", 1) for line in (COMMON / "pins.env").read_text().splitlines()
            if line and not line.startswith("#"))
TURBOQUANT_VLLM = "turboquant-vllm==1.5.0"
PLUGIN_ALLOWLIST = "lora_filesystem_resolver,lora_hf_hub_resolver"


def run(cmd, *, env=None, check=True, cwd=REPO, timeout=1200) -> subprocess.CompletedProcess:
    """Run a command, capture its output, and show it in the assertion message if it fails."""
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def pip_download(spec: str, dest: Path) -> Path:
    """A wheel for the images' interpreter (CPython 3.12, manylinux x86_64), cached under ~/.cache/tqstack."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "-d", dest, spec])
        found = sorted(dest.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
    assert found, f"pip download {spec} left no wheel in {dest}"
    return found[0]


@pytest.fixture(scope="session")
def vllm_wheel_dir() -> Path:
    wheels = CACHE / "wheels"
    pip_download(f"vllm=={PINS['VLLM_VERSION']}", wheels)
    return wheels


@pytest.fixture(scope="session")
def turboquant_wheel() -> Path:
    """The real third-party plugin wheel (Requires-Python >= 3.12, so forced onto 3.11 when installed)."""
    return pip_download(TURBOQUANT_VLLM, CACHE / "wheels")


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    """What the image sets: the venv first on PATH and the plugin allowlist."""
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VLLM_PLUGINS=PLUGIN_ALLOWLIST,
               VIRTUAL_ENV=str(venv))
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def force_install_plugin(venv: Path, wheel: Path) -> None:
    """Install turboquant-vllm past the venv's constraint, as a determined user might
    (PIP_CONFIG_FILE=/dev/null makes pip skip every config file, the venv's pip.conf included)."""
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--ignore-requires-python", wheel],
        env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))


@pytest.fixture(scope="session")
def recipe(tmp_path_factory, vllm_wheel_dir, turboquant_wheel):
    """A venv that went through the image recipe, starting with turboquant-vllm already installed."""
    venv = tmp_path_factory.mktemp("recipe") / "venv"
    run([sys.executable, "-m", "venv", venv])
    force_install_plugin(venv, turboquant_wheel)
    before = run([venv / "bin" / "python", "-m", "pip", "show", "turboquant-vllm"], check=False)
    install = run(["bash", COMMON / "install-vllm.sh", "--venv", venv, "--lock", COMMON / "requirements-cuda.lock",
                   "--torch-source", "cpu", "--vllm-wheel-dir", vllm_wheel_dir], timeout=1800)
    apply = run(["bash", COMMON / "apply-patches.sh", venv, PATCHES])
    return {"venv": venv, "plugin_before": before, "install": install, "apply": apply}


def verify(venv: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([venv / "bin" / "python", COMMON / "verify.py", "--patches-dir", PATCHES],
               env=env if env is not None else venv_env(venv), check=False, timeout=600)
