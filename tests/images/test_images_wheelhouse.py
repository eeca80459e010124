"""make wheelhouse: argument validation, a dry resolution of each lock for its image platform, and a
real (partial) wheelhouse installed offline. The full wheelhouse is GBs and is not built here."""
from __future__ import annotations

import shutil
import sys

import pytest
from conftest import COMMON, REPO, run

WHEELHOUSE = COMMON / "wheelhouse.sh"


@pytest.mark.parametrize("args, message", [
    ([], "IMAGE is required (valid: rtx5060ti, rtx3090, arc-b70)"),
    (["rtx4090", "out"], "IMAGE='rtx4090' is not a tqstack image (valid: rtx5060ti, rtx3090, arc-b70)"),
    (["rtx3090"], "OUT_DIR is required"),
    (["rtx3090", "out", "--fast"], "unknown option '--fast'"),
    (["rtx3090", "out", "--only", "not-a-locked-package"], "--only not-a-locked-package: not in requirements-cuda.lock"),
])
def test_wheelhouse_rejects_bad_arguments(args, message, tmp_path):
    result = run(["bash", WHEELHOUSE, *args], check=False, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_make_wheelhouse_validates_image():
    result = run(["make", "--no-print-directory", "wheelhouse", "IMAGE=h100"], check=False)
    assert result.returncode != 0
    assert "IMAGE='h100' is not valid; use IMAGE=<one of: rtx5060ti rtx3090 arc-b70>" in result.stderr


@pytest.mark.parametrize("image", ["rtx5060ti", "arc-b70"])
def test_lock_resolves_for_the_image_platform(image, tmp_path):
    assert shutil.which("uv"), "uv is not on PATH; run through `make images-check`"
    result = run(["bash", WHEELHOUSE, image, tmp_path / "out", "--dry-run"], timeout=600)
    assert "dry run ok" in result.stdout
    assert not (tmp_path / "out").exists(), "a dry run downloads nothing"


def test_partial_wheelhouse_downloads_hash_checked_wheels_and_installs_offline(tmp_path):
    out = tmp_path / "wheelhouse"
    result = run(["bash", WHEELHOUSE, "rtx3090", out, "--only", "ninja,six"], timeout=600)
    wheels = sorted(path.name for path in out.glob("*.whl"))
    assert [name.split("-")[0] for name in wheels] == ["ninja", "six"], wheels
    assert "manylinux" in wheels[0] and "x86_64" in wheels[0]  # the image's platform, not this machine's
    assert "install offline with" in result.stdout
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    install = run(["bash", out / "install.sh", venv], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert "Successfully installed" in install.stdout
    assert run([venv / "bin" / "ninja", "--version"]).stdout.startswith("1.13.2")
    assert (REPO / "images" / "common" / "requirements-cuda.lock").read_text().count("ninja==1.13.2") == 1
