"""Process helpers shared by the GPU-host scripts (serve_stacks.py, bench/bench_session.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# The harness's own helpers (stdlib + httpx, both on the GPU host image).
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from tqbench.servers import free_port, stop_process_group  # noqa: E402,F401


def stop(process: subprocess.Popen, grace_s: float = 40) -> None:
    stop_process_group(process, grace_s=grace_s, kill_wait_s=20)


def gpu_memory_used_mib() -> list[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(v) for v in out.split() if v.strip().isdigit()]


def wait_gpu_free(limit_mib: int = 2048, timeout_s: float = 60) -> bool:
    """Wait until every GPU uses less than ``limit_mib`` (the next server checks free memory at start)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = gpu_memory_used_mib()
        if not used or max(used) < limit_mib:
            return True
        time.sleep(2)
    return False
