"""Unit checks of the buildah build tooling (images/build.sh's helpers) that need no build:
the compose facts the in-image checks test, the Dockerfiles' cache directories, and the arc-b70 PyPI-only
derivation. The build itself runs in `make images-build-check` (images/build-check.sh)."""
from __future__ import annotations

import importlib.util
import re
import sys

import pytest
from conftest import REPO, run

IMAGES = ("rtx5060ti", "rtx3090", "arc-b70")


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_image = load(REPO / "images" / "check_image.py")


@pytest.mark.parametrize("image", IMAGES)
def test_compose_facts_find_the_mounted_caches_and_the_healthcheck(image):
    dirs, healthchecks, files = check_image.compose_facts(REPO / "compose", f"tqstack/vllm:0.26.0-{image}")
    assert files, f"no compose file runs tqstack/vllm:0.26.0-{image}"
    assert {"/home/vllm/.cache/huggingface", "/home/vllm/.cache/vllm", "/home/vllm/.cache/triton"} <= set(dirs)
    assert all(d.startswith("/home/vllm") for d in dirs), dirs
    assert healthchecks and all(test[:2] == ["CMD", "python3"] for test in healthchecks), healthchecks


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_creates_every_mounted_cache_dir_for_the_user(image):
    """A named volume starts as a copy of the image's directory (owner included); a directory the image
    lacks is created root-owned, and the vllm user could not write its compile or Triton cache."""
    dirs, _, _ = check_image.compose_facts(REPO / "compose", f"tqstack/vllm:0.26.0-{image}")
    text = (REPO / "images" / image / "Dockerfile").read_text().replace("\\\n", " ")
    created = set()
    for match in re.finditer(r"install -d -o vllm -g vllm ((?:/\S+\s+)+)", text):
        created |= set(match.group(1).split())
    assert set(dirs) <= created, f"not created owned by vllm: {sorted(set(dirs) - created)}"


def test_pypi_only_derivation_keeps_everything_but_the_unreachable_downloads(tmp_path):
    script = REPO / "images" / "standin" / "pypi_only.py"
    result = run([sys.executable, script, REPO / "images" / "arc-b70" / "Dockerfile"])
    derived = result.stdout
    left_out = [line for line in result.stderr.splitlines() if line.startswith("left out:")]
    assert len(left_out) == 7, result.stderr
    runs = [line for line in derived.splitlines() if line.startswith("RUN")]
    assert not [r for r in runs if "github.com" in r or "repos.intel.com" in r or "download.pytorch.org" in r]
    for kept in ('ENTRYPOINT ["vllm", "serve"]', "USER ${VLLM_UID}", "COPY images/common/", "COPY patches/",
                 "useradd --create-home", "requirements-xpu.lock", "sha256sum --check", "COPY --from=rust-build"):
        assert kept in derived, kept
    # a Dockerfile that lacks a marker is refused, so the derivation cannot silently build less
    (tmp_path / "Dockerfile").write_text("FROM ubuntu:24.04\nRUN echo hi\n")
    refused = run([sys.executable, script, tmp_path / "Dockerfile"], check=False)
    assert refused.returncode == 2 and "markers not found" in refused.stderr
