"""Provenance of a run: what was measured, on what, with which code (``manifest.json``).

Collected once when a run starts (``run.json``), because ``tqbench report`` may regenerate the
report on another machine; ``manifest.json`` = that plus server facts and timestamps.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]
PATCH_DIR = REPO_ROOT / "patches" / "vllm-0.26.0"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run(argv: list[str], cwd: Path | None = None) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    # A copied tree (an image, the GPU host) has no .git, or a stale one: an explicit TQSTACK_COMMIT wins.
    commit = os.environ.get("TQSTACK_COMMIT") or _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def patch_series_hash(vllm_python: str | None = None, series_dir: Path = PATCH_DIR) -> dict[str, Any]:
    """The installed vLLM's ``_tqstack_patches.json`` when reachable, else a hash of patches/vllm-0.26.0/."""
    if vllm_python:
        location = _run([vllm_python, "-c", "import importlib.util as u; print(u.find_spec('vllm').submodule_search_locations[0])"])
        if location and (Path(location) / "_tqstack_patches.json").exists():
            return {"source": f"{location}/_tqstack_patches.json",
                    **json.loads((Path(location) / "_tqstack_patches.json").read_text())}
        if location:  # the measured vLLM is reachable and carries no patch marker: it is not patched
            return {"source": location, "series_sha256": None, "patched": False}
    series_file = series_dir / "series"
    if not series_file.exists():
        return {"source": None, "series_sha256": None}
    # Same digest as patches/apply writes into the marker: 'series' then each listed patch, name + NUL + bytes.
    names = [line.split("#", 1)[0].strip() for line in series_file.read_text().splitlines()]
    names = [n for n in names if n]
    digest = hashlib.sha256()
    for name in ["series", *names]:
        path = series_dir / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    return {"source": str(series_dir), "series": series_dir.name, "patches": names,
            "series_sha256": digest.hexdigest()}


_BUILD_PROBE = (
    "import importlib.metadata as m, importlib.util as u, json, pathlib\n"
    "loc = u.find_spec('vllm').submodule_search_locations[0]\n"
    "dist = (m.packages_distributions().get('vllm') or [None])[0]\n"
    "print(json.dumps({'distribution': dist, 'version': m.version(dist) if dist else None, 'location': loc,\n"
    "                  'patched': (pathlib.Path(loc) / '_tqstack_patches.json').exists()}))"
)


def vllm_build(vllm_python: str | None) -> dict[str, Any] | None:
    """Distribution, version and patch marker of the vLLM that ``vllm_python`` imports (None if unknown)."""
    if not vllm_python:
        return None
    out = _run([vllm_python, "-c", _BUILD_PROBE])
    try:
        return json.loads(out.splitlines()[-1]) if out else None
    except (json.JSONDecodeError, IndexError):
        return None


def gpu_info() -> list[dict[str, str]]:
    gpus = []
    nvidia = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pci.bus_id",
                   "--format=csv,noheader"])
    for line in (nvidia or "").splitlines():
        name, memory, driver, bus = (part.strip() for part in line.split(","))
        gpus.append({"vendor": "nvidia", "name": name, "memory": memory, "driver": driver, "bus_id": bus})
    xpu = _run(["xpu-smi", "discovery", "--json"])
    if xpu:
        try:
            for device in json.loads(xpu).get("device_list", []):
                gpus.append({"vendor": "intel", "name": device.get("device_name"),
                             "memory": device.get("memory_physical_size_byte"), "driver": device.get("driver_version")})
        except json.JSONDecodeError:
            pass
    return gpus


def server_version(base_url: str) -> str | None:
    try:
        return httpx.get(f"{base_url}/version", timeout=10).json().get("version")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def collect_provenance(vllm_python: str | None = None) -> dict[str, Any]:
    return {
        "tqstack": git_info(),
        "patch_series": patch_series_hash(vllm_python),
        "vllm_build": vllm_build(vllm_python),
        "image_digest": os.environ.get("TQ_IMAGE_DIGEST"),
        "gpus": gpu_info(),
        "client": {"host": platform.node(), "python": platform.python_version(), "platform": platform.platform(),
                   "cpus": os.cpu_count()},
    }
