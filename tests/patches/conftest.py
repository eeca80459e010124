"""Shared fixtures for the vLLM patch tests (run by `make patches-check`).

`make patches-check` unpacks the pinned vLLM 0.26.0 wheel twice: `pristine` (as released) and
`patched` (after patches/apply), and builds `.venv-vllm` (CPU torch + vLLM's dependencies, but no
vllm). A test runs real vLLM code from either tree in a subprocess:

    from conftest import run_in_vllm   # or take the `vllm_runner` fixture

    def test_version(patched_tree):
        code = "import json, vllm; print(json.dumps({'version': vllm.__version__}))"
        assert run_in_vllm(patched_tree, code).json()["version"] == "0.26.0"

Environment (set by make): TQ_VLLM_PRISTINE, TQ_VLLM_PATCHED, TQ_VLLM_SERIES (the series
applied), TQ_VLLM_OLD_TREE (a vLLM 0.25.1 dist-info for the version-refusal test), TQ_VLLM_PYTHON
(defaults to .venv-vllm/bin/python).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOW_TO_BUILD = "run `make patches-check` (it builds the vLLM trees and .venv-vllm, then runs these tests)"

# Keep a CPU-only vLLM import quiet and offline: vLLM's INFO chatter (e.g. "Triton is installed but
# 0 active driver(s)") is dropped but its warnings stay visible in stderr; no usage stats, no hub.
# Plugins are left alone (.venv-vllm has none): tests about plugin loading set VLLM_PLUGINS themselves.
QUIET_VLLM_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# CUDA_VISIBLE_DEVICES is deliberately not set: an empty value makes vLLM keep Triton enabled with
# no driver ("distributed environment" case in vllm/triton_utils/importing.py).


def _tree_from_env(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set; {HOW_TO_BUILD}", pytrace=False)
    path = Path(value)
    if not (path / "vllm").is_dir():
        pytest.fail(f"{var}={value} has no vllm/ directory; {HOW_TO_BUILD}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def pristine_tree() -> Path:
    """The unpacked, unmodified vLLM 0.26.0 wheel (treat as read-only)."""
    return _tree_from_env("TQ_VLLM_PRISTINE")


@pytest.fixture(scope="session")
def patched_tree() -> Path:
    """The same wheel with the whole series applied by patches/apply (treat as read-only)."""
    return _tree_from_env("TQ_VLLM_PATCHED")


def vllm_python() -> Path:
    python = Path(os.environ.get("TQ_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"no python at {python}; {HOW_TO_BUILD}", pytrace=False)
    return python


@dataclasses.dataclass
class VllmRun:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        """The last stdout line parsed as JSON (print exactly one JSON line last)."""
        lines = self.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            raise AssertionError(f"last stdout line is not JSON (exit {self.returncode})\n"
                                 f"stdout tail:\n{self.stdout[-2000:]}\nstderr tail:\n{self.stderr[-4000:]}")


def run_in_vllm(tree: Path, code: str, timeout: float = 300, env: dict[str, str] | None = None) -> VllmRun:
    """Run Python `code` with .venv-vllm's python and PYTHONPATH=tree, so `import vllm` is that tree.

    `env` entries override the quiet defaults above. Nothing is raised on a non-zero exit: assert on
    `returncode` (unpatched behaviour is often an expected failure).
    """
    full_env = {**os.environ, **QUIET_VLLM_ENV, "PYTHONPATH": str(tree), **(env or {})}
    # -P: do not put the working directory on sys.path, so only `tree` can provide vllm.
    completed = subprocess.run([str(vllm_python()), "-P", "-c", code], env=full_env,
                               capture_output=True, text=True, timeout=timeout)
    return VllmRun(completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture(scope="session")
def vllm_runner():
    """run_in_vllm as a fixture, for tests that prefer not to import from conftest."""
    return run_in_vllm
