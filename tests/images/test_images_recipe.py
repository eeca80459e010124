"""The image recipe, natively: install-vllm.sh (CPU mode) -> apply-patches.sh -> verify.py.

verify.py must pass on the result and fail, with a message naming the problem, for each broken
condition the image build has to catch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import COMMON, PATCHES, PINS, force_install_plugin, run, venv_env, verify

pytestmark = pytest.mark.slow


def site_packages(venv: Path) -> Path:
    purelib = run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(purelib.stdout.strip())


def test_install_removes_preinstalled_plugin_and_keeps_it_out(recipe, turboquant_wheel):
    venv = recipe["venv"]
    assert recipe["plugin_before"].returncode == 0, "the fixture should start with turboquant-vllm installed"
    assert "Version: 1.5.0" in recipe["plugin_before"].stdout
    assert run([venv / "bin" / "python", "-m", "pip", "show", "turboquant-vllm"], check=False).returncode != 0
    # The venv's pip.conf constraint makes a plain reinstall impossible.
    again = run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
                 turboquant_wheel], check=False)
    assert again.returncode != 0
    assert "turboquant-vllm" in again.stdout + again.stderr
    assert "ResolutionImpossible" in again.stdout + again.stderr


def test_install_gives_pinned_vllm_and_ninja_in_venv(recipe):
    venv = recipe["venv"]
    assert f"installed vllm {PINS['VLLM_VERSION']}" in recipe["install"].stdout
    assert (venv / "bin" / "ninja").is_file()
    assert run([venv / "bin" / "ninja", "--version"]).stdout.strip()
    versions = run([venv / "bin" / "python", "-c",
                    "import importlib.metadata as m; print(m.version('transformers'), m.version('torch'))"])
    assert versions.stdout.split() == ["5.14.1", "2.13.0+cpu"]  # lock's transformers; CPU-mode torch


def test_patch_series_applied_and_reapply_is_a_no_op(recipe):
    venv = recipe["venv"]
    marker = site_packages(venv) / "vllm" / "_tqstack_patches.json"
    assert marker.is_file()
    again = run(["bash", COMMON / "apply-patches.sh", venv, PATCHES])
    assert "applied to" in again.stdout


def test_verify_passes_on_the_recipe_result(recipe):
    result = verify(recipe["venv"])
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("vllm version", "patch series", "plugins", "ninja", "turboquant dtypes"):
        assert f"ok   {check}" in result.stdout
    assert "turboquant_3bit_nc" in result.stdout


def test_verify_fails_while_turboquant_vllm_is_installed(recipe, turboquant_wheel):
    venv = recipe["venv"]
    force_install_plugin(venv, turboquant_wheel)
    try:
        result = verify(venv)
    finally:
        run([venv / "bin" / "python", "-m", "pip", "uninstall", "-y", "-q", "turboquant-vllm"])
    assert result.returncode == 1
    assert "FAIL plugins: turboquant-vllm 1.5.0 is installed" in result.stdout
    assert "entry point tq4_backend = turboquant_vllm.vllm:register_tq4_backend" in result.stdout


def test_verify_fails_when_patches_are_reversed(recipe):
    venv = recipe["venv"]
    series = PATCHES / f"vllm-{PINS['VLLM_VERSION']}"
    site = site_packages(venv)
    run([venv / "bin" / "python", PATCHES / "apply", "--series", series, "--reverse", site])
    try:
        result = verify(venv)
    finally:
        run(["bash", COMMON / "apply-patches.sh", venv, PATCHES])
    assert result.returncode == 1
    assert "FAIL patch series: patch series not applied" in result.stdout
    assert "ok   vllm version" in result.stdout  # only the patch check fails


def test_verify_fails_without_ninja_on_path(recipe, tmp_path):
    venv = recipe["venv"]
    empty_bin = tmp_path / "bin"  # /usr/bin may hold a system ninja; give PATH nothing at all
    empty_bin.mkdir()
    result = verify(venv, env=venv_env(venv, PATH=str(empty_bin)))
    assert result.returncode == 1
    assert "FAIL ninja: ninja is not on PATH" in result.stdout
    assert "ok   patch series" in result.stdout


def test_verify_fails_on_another_vllm_version(recipe):
    """Rewrite the installed metadata and _version.py as a 0.25.1 install would have them."""
    venv = recipe["venv"]
    site = site_packages(venv)
    metadata = site / f"vllm-{PINS['VLLM_VERSION']}.dist-info" / "METADATA"
    version_py = site / "vllm" / "_version.py"
    saved = {path: path.read_bytes() for path in (metadata, version_py)}
    for path, data in saved.items():
        path.write_bytes(data.replace(PINS["VLLM_VERSION"].encode(), b"0.25.1"))
    try:
        result = verify(venv)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    assert result.returncode == 1
    assert "FAIL vllm version: vLLM version is 0.25.1 (metadata) / 0.25.1 (vllm/_version.py)" in result.stdout
    assert "vllm==0.26.0 only" in result.stdout


@pytest.mark.parametrize("plugins, message", [
    (None, "VLLM_PLUGINS is not set"),
    ("lora_filesystem_resolver,tq4_backend", "VLLM_PLUGINS allows tq4_backend"),
])
def test_verify_requires_the_plugin_allowlist(recipe, plugins, message):
    venv = recipe["venv"]
    env = venv_env(venv)
    if plugins is None:
        del env["VLLM_PLUGINS"]
    else:
        env["VLLM_PLUGINS"] = plugins
    result = verify(venv, env=env)
    assert result.returncode == 1
    assert f"FAIL plugins: {message}" in result.stdout


def test_verify_accepts_an_empty_allowlist(recipe):
    assert verify(recipe["venv"], env=venv_env(recipe["venv"], VLLM_PLUGINS="")).returncode == 0


def test_install_rejects_bad_arguments(tmp_path):
    result = run(["bash", COMMON / "install-vllm.sh", "--venv", tmp_path / "v", "--lock",
                  COMMON / "requirements-cuda.lock", "--torch-source", "rocm"], check=False)
    assert result.returncode == 2
    assert "--torch-source 'rocm' is not valid (valid: lock, cpu)" in result.stderr
    assert not (tmp_path / "v").exists()
