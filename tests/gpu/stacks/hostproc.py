"""Process helpers shared by the GPU-host scripts (serve_stacks.py, bench/bench_session.py)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, grace_s: float = 40) -> None:
    """SIGTERM the process group (API server, engine core, TP workers), SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


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
