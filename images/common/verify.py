#!/usr/bin/env python3
"""Fail an image build unless its vLLM install is the one tqstack supports.

Run with the image venv's python, after install-vllm.sh and apply-patches.sh:
    python verify.py --patches-dir /opt/tqstack/patches [--expect-series-sha256 HEX]
Checks (each failure is printed with what would be valid; exit 1 if any fails):
  * vLLM is 0.26.0 (installed distribution metadata and vllm/_version.py agree)
  * the tqstack patch series is applied (patches/apply --verify)
  * no turboquant-vllm distribution and no vllm.general_plugins entry point tq4_backend / turboquant_vllm*
  * VLLM_PLUGINS is set, and names only vLLM's own LoRA resolver plugins (or nothing)
  * ninja is on PATH and runs
  * the TurboQuant KV-cache dtypes accepted by the installed vLLM (CacheDType and TQ_PRESETS) are exactly
    the four tqstack serves
Stdlib only, apart from importing the installed vLLM for the dtype check.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import typing
from pathlib import Path

EXPECTED_VLLM_VERSION = "0.26.0"
EXPECTED_TQ_DTYPES = frozenset({"turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"})
ALLOWED_PLUGINS = frozenset({"lora_filesystem_resolver", "lora_hf_hub_resolver"})
FORBIDDEN_DISTRIBUTION = "turboquant-vllm"
PLUGIN_GROUP = "vllm.general_plugins"
PATCH_MARKER = "vllm/_tqstack_patches.json"


def site_packages() -> Path:
    """This interpreter's purelib: where the image installs vllm (--site overrides it)."""
    return Path(sysconfig.get_paths()["purelib"])


def check_version(site: Path) -> str | None:
    try:
        installed = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return f"vLLM is not installed in {sys.prefix} (expected vllm=={EXPECTED_VLLM_VERSION})"
    version_file = site / "vllm" / "_version.py"
    scope: dict = {}
    if version_file.is_file():
        exec(compile(version_file.read_text(), str(version_file), "exec"), scope)  # plain assignments only
    module_version = scope.get("__version__", "missing")
    if installed != EXPECTED_VLLM_VERSION or module_version != EXPECTED_VLLM_VERSION:
        return (f"vLLM version is {installed} (metadata) / {module_version} (vllm/_version.py); "
                f"tqstack's patches are for vllm=={EXPECTED_VLLM_VERSION} only")
    return None


def check_patches(site: Path, patches_dir: Path, expect_series_sha256: str | None) -> str | None:
    apply = patches_dir / "apply"
    series = patches_dir / f"vllm-{EXPECTED_VLLM_VERSION}"
    if not apply.is_file() or not (series / "series").is_file():
        return f"--patches-dir {patches_dir} must hold apply and vllm-{EXPECTED_VLLM_VERSION}/series"
    result = subprocess.run([sys.executable, str(apply), "--series", str(series), "--verify", str(site)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stdout + result.stderr).strip().splitlines()
        return ("patch series not applied (patches/apply --verify exited "
                f"{result.returncode}): {' | '.join(detail[:4])}; run images/common/apply-patches.sh")
    if expect_series_sha256:
        recorded = json.loads((site / PATCH_MARKER).read_text())["series_sha256"]
        if recorded != expect_series_sha256:
            return (f"applied series sha256 {recorded} differs from --expect-series-sha256 "
                    f"{expect_series_sha256} (the image label would be wrong)")
    return None


def check_plugins() -> list[str]:
    problems = []
    try:
        dist = importlib.metadata.distribution(FORBIDDEN_DISTRIBUTION)
        problems.append(f"{FORBIDDEN_DISTRIBUTION} {dist.version} is installed; it registers the tq4_backend "
                        f"plugin that breaks vLLM {EXPECTED_VLLM_VERSION} (pip uninstall -y {FORBIDDEN_DISTRIBUTION})")
    except importlib.metadata.PackageNotFoundError:
        pass
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        if entry_point.name == "tq4_backend" or entry_point.value.startswith("turboquant_vllm"):
            problems.append(f"{PLUGIN_GROUP} entry point {entry_point.name} = {entry_point.value} is registered; "
                            "remove the distribution that provides it")
    allowlist = os.environ.get("VLLM_PLUGINS")
    if allowlist is None:
        problems.append("VLLM_PLUGINS is not set, so vLLM would load every installed plugin; set it to "
                        f"{','.join(sorted(ALLOWED_PLUGINS))} or to empty")
    else:
        extra = {name.strip() for name in allowlist.split(",") if name.strip()} - ALLOWED_PLUGINS
        if extra:
            problems.append(f"VLLM_PLUGINS allows {','.join(sorted(extra))}; valid entries are "
                            f"{','.join(sorted(ALLOWED_PLUGINS))} (or leave it empty)")
    return problems


def check_ninja() -> str | None:
    ninja = shutil.which("ninja")
    if ninja is None:
        return ("ninja is not on PATH; vLLM's JIT builds (FlashInfer, torch cpp_extension) need it "
                "(put the venv's bin/ on PATH; the lock installs ninja there)")
    result = subprocess.run([ninja, "--version"], capture_output=True, text=True)
    if result.returncode != 0:
        return f"{ninja} --version failed: {result.stderr.strip()}"
    return None


def check_tq_dtypes() -> str | None:
    try:
        from vllm.config.cache import CacheDType
        from vllm.model_executor.layers.quantization.turboquant.config import TQ_PRESETS
    except Exception as error:  # any import failure means the install is unusable
        return f"cannot import vLLM's CacheDType / TQ_PRESETS: {type(error).__name__}: {error}"
    cache_dtypes = {name for name in typing.get_args(CacheDType) if name.startswith("turboquant_")}
    presets = set(TQ_PRESETS)
    expected = sorted(EXPECTED_TQ_DTYPES)
    if cache_dtypes != EXPECTED_TQ_DTYPES or presets != EXPECTED_TQ_DTYPES:
        return (f"TurboQuant dtypes differ: CacheDType has {sorted(cache_dtypes)}, TQ_PRESETS has "
                f"{sorted(presets)}; expected exactly {expected}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches-dir", type=Path, required=True,
                        help="the repository's patches/ directory (apply + vllm-<version>/series)")
    parser.add_argument("--site", type=Path, default=None,
                        help="site-packages that holds vllm (default: this interpreter's purelib)")
    parser.add_argument("--expect-series-sha256", default=None,
                        help="fail unless the applied series has this sha256 (the image's label value)")
    args = parser.parse_args(argv)
    # --site: a PYTHONPATH install such as the GPU host's /tmp/site-patched.
    site = args.site or site_packages()

    checks = [
        ("vllm version", [check_version(site)]),
        ("patch series", [check_patches(site, args.patches_dir, args.expect_series_sha256)]),
        ("plugins", check_plugins()),
        ("ninja", [check_ninja()]),
        ("turboquant dtypes", [check_tq_dtypes()]),
    ]
    failed = 0
    for name, problems in checks:
        problems = [p for p in problems if p]
        if problems:
            failed += 1
            for problem in problems:
                print(f"FAIL {name}: {problem}", flush=True)
        else:
            print(f"ok   {name}", flush=True)
    if failed:
        print(f"verify.py: {failed} check(s) failed; this vLLM install is not a tqstack image", file=sys.stderr)
        return 1
    print(f"verify.py: vLLM {EXPECTED_VLLM_VERSION} with the tqstack patch series, no third-party TurboQuant "
          f"plugin, ninja on PATH, TurboQuant dtypes {sorted(EXPECTED_TQ_DTYPES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
