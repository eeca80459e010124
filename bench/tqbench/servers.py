"""Server lifecycle for the benchmark targets.

- ``EndpointTarget``: a server that is already running (``--endpoint URL --model NAME``); checked,
  never started or stopped.
- ``LaunchTarget``: a plain launch command per KV dtype (``vllm serve ...`` of a configs/ stack, or any
  command template); started in its own process group with stdout/stderr captured into the run
  directory, ``/health`` polled with a timeout, stopped with SIGTERM then SIGKILL.
- ``ComposeTarget``: ``docker compose up -d`` with the KV dtype in the environment, logs collected
  with ``docker compose logs``, then ``docker compose down``.
Every failure is a ``ServerError`` whose message says what to fix.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx

from tqbench.context import Endpoint


class ServerError(RuntimeError):
    """The server under test cannot be reached, started, or stopped answering."""


@dataclass
class ServerHandle:
    endpoint: Endpoint
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    image_digests: list[str] = field(default_factory=list)  # compose: image ids of the running containers

    def alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            return False
        return is_healthy(self.endpoint.base_url)


def is_healthy(base_url: str, timeout_s: float = 10) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(log_path: Path | None, chars: int = 2000) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-chars:]


def check_endpoint(endpoint: Endpoint, timeout_s: float = 15) -> list[dict]:
    """The server's model cards; raises if it is unreachable or does not serve ``endpoint.model``."""
    url = f"{endpoint.base_url}/v1/models"
    try:
        response = httpx.get(url, headers=endpoint.headers(), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach the server at {endpoint.base_url} ({type(exc).__name__}: {exc}); "
                          "start it or pass the right --endpoint URL (scheme://host:port, no /v1)") from None
    if response.status_code == 401:
        raise ServerError(f"{url} refused the request (HTTP 401): pass the server's API key with --api-key")
    if response.status_code != 200:
        raise ServerError(f"{url} answered HTTP {response.status_code}; is this an OpenAI-compatible vLLM server?")
    cards = response.json().get("data", [])
    served = [card.get("id") for card in cards]
    if endpoint.model not in served:
        raise ServerError(f"--model {endpoint.model!r} is not served at {endpoint.base_url}; it serves {served}")
    return cards


def served_cache_config(base_url: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` from /metrics (cache_dtype, num_gpu_blocks, ...), {} if absent."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=15).text
    except httpx.HTTPError:
        return {}
    match = re.search(r"^vllm:cache_config_info\{([^}]*)\}", text, re.M)
    return dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) if match else {}


def wait_for_health(base_url: str, timeout_s: float, process: subprocess.Popen | None = None,
                    log_path: Path | None = None, poll_s: float = 2.0) -> None:
    from tqbench.progress import waiting

    deadline = time.monotonic() + timeout_s
    what = f"waiting for {base_url}/health" + (f" (server log: {log_path})" if log_path else "")
    with waiting(what, timeout_s):
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerError(f"the server exited with code {process.returncode} before becoming healthy; "
                                  f"log {log_path}:\n{log_tail(log_path)}")
            if is_healthy(base_url, timeout_s=5):
                return
            time.sleep(poll_s)
    raise ServerError(f"{base_url}/health did not answer 200 within {timeout_s:.0f} s (raise "
                      f"server.health_timeout_s or --health-timeout); log {log_path}:\n{log_tail(log_path)}")


class Target:
    """Where the benchmark gets a server for each KV dtype."""

    description = ""
    stack = None  # the tqconfig Stack when the target serves one from configs/

    def serve(self, kv_cache_dtype: str, log_path: Path) -> contextlib.AbstractContextManager[ServerHandle]:
        raise NotImplementedError


@dataclass
class EndpointTarget(Target):
    endpoint: Endpoint

    @property
    def description(self) -> str:
        return f"endpoint {self.endpoint.base_url} model {self.endpoint.model}"

    @contextlib.contextmanager
    def serve(self, kv_cache_dtype: str, log_path: Path) -> Iterator[ServerHandle]:
        check_endpoint(self.endpoint)
        served = served_cache_config(self.endpoint.base_url).get("cache_dtype")
        if served and served != kv_cache_dtype:
            raise ServerError(f"the endpoint serves kv cache dtype {served!r}, not {kv_cache_dtype!r}: pass "
                              f"--kv {served} (a running endpoint serves one dtype) or use --stack")
        yield ServerHandle(self.endpoint)


@dataclass
class LaunchTarget(Target):
    """Start ``argv_for(kv_cache_dtype)`` locally for each dtype."""

    argv_for: Callable[[str], list[str]]
    base_url: str
    model: str
    env: dict[str, str] = field(default_factory=dict)
    health_timeout_s: float = 1800
    api_key: str | None = None
    label: str | None = None

    @property
    def description(self) -> str:
        if self.label:
            return self.label
        try:  # the placeholder stays visible; the report fills in the dtype(s) of the run
            return f"local launch: {shlex.join(self.argv_for('KVDTYPE'))}".replace("KVDTYPE", "{kv_cache_dtype}")
        except Exception:
            return "local launch"

    @contextlib.contextmanager
    def serve(self, kv_cache_dtype: str, log_path: Path) -> Iterator[ServerHandle]:
        if is_healthy(self.base_url, timeout_s=3):
            raise ServerError(f"something already answers at {self.base_url}; stop it or choose another --port")
        try:
            argv = self.argv_for(kv_cache_dtype)
        except Exception as exc:  # e.g. the stack refuses this dtype on its hardware
            raise ServerError(f"cannot build the server command for {kv_cache_dtype}: {exc}") from None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, **self.env})
            except OSError as exc:
                raise ServerError(f"cannot start {argv[0]!r}: {exc}") from None
        try:
            wait_for_health(self.base_url, self.health_timeout_s, process, log_path)
            endpoint = Endpoint(self.base_url, self.model, self.api_key)
            check_endpoint(endpoint)
            yield ServerHandle(endpoint, log_path, process)
        finally:
            stop_process_group(process)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers and locust masters bind loopback only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_s: float = 30, kill_wait_s: float | None = None) -> None:
    """SIGTERM the process group (API server, engine core, workers), SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s if kill_wait_s is None else kill_wait_s)


@dataclass
class ComposeTarget(Target):
    """``docker compose`` project whose vLLM service reads the KV dtype from ``TQ_KV_CACHE_DTYPE``."""

    compose_file: Path
    base_url: str
    model: str
    env: dict[str, str] = field(default_factory=dict)
    health_timeout_s: float = 1800
    project: str = "tqbench"
    api_key: str | None = None

    @property
    def description(self) -> str:
        return f"docker compose -f {self.compose_file}"

    def _compose(self, *args: str, kv_cache_dtype: str, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env, "TQ_KV_CACHE_DTYPE": kv_cache_dtype}
        argv = ["docker", "compose", "-f", str(self.compose_file), "-p", self.project, *args]
        return subprocess.run(argv, env=env, **kwargs)

    def _image_ids(self, kv_cache_dtype: str) -> list[str]:
        ps = self._compose("ps", "-q", kv_cache_dtype=kv_cache_dtype, capture_output=True, text=True)
        containers = ps.stdout.split() if ps.returncode == 0 else []
        if not containers:
            return []
        inspect = subprocess.run(["docker", "inspect", "--format", "{{.Image}}", *containers],
                                 capture_output=True, text=True)
        return sorted(set(inspect.stdout.split())) if inspect.returncode == 0 else []

    @contextlib.contextmanager
    def serve(self, kv_cache_dtype: str, log_path: Path) -> Iterator[ServerHandle]:
        if shutil.which("docker") is None:
            raise ServerError("docker is not installed: use --launcher local (plain vllm serve) instead")
        up = self._compose("up", "-d", kv_cache_dtype=kv_cache_dtype, capture_output=True, text=True)
        if up.returncode != 0:
            raise ServerError(f"docker compose up failed ({up.returncode}): {up.stderr[-1500:]}")
        try:
            wait_for_health(self.base_url, self.health_timeout_s)
            endpoint = Endpoint(self.base_url, self.model, self.api_key)
            check_endpoint(endpoint)
            yield ServerHandle(endpoint, log_path, image_digests=self._image_ids(kv_cache_dtype))
        finally:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log:
                self._compose("logs", "--no-color", "--timestamps", kv_cache_dtype=kv_cache_dtype, stdout=log,
                              stderr=subprocess.STDOUT)
            self._compose("down", kv_cache_dtype=kv_cache_dtype, capture_output=True)


def command_template_target(template: str, base_url: str, model: str, host: str, port: int,
                            health_timeout_s: float, api_key: str | None = None) -> LaunchTarget:
    """A launch command with ``{kv_cache_dtype}``, ``{host}``, ``{port}``, ``{python}`` placeholders."""
    if "{kv_cache_dtype}" not in template:
        raise ServerError("--launch-cmd must contain {kv_cache_dtype} so each dtype starts its own server")

    def argv_for(kv_cache_dtype: str) -> list[str]:
        return shlex.split(template.format(kv_cache_dtype=kv_cache_dtype, host=host, port=port, python=sys.executable))

    return LaunchTarget(argv_for, base_url, model, health_timeout_s=health_timeout_s, api_key=api_key)


def stack_target(stack_name: str, *, launcher: str, host: str, port: int, health_timeout_s: float,
                 vllm_bin: str | None = None, python: str | None = None, compose_file: Path | None = None,
                 max_model_len: int | None = None, extra_args: list[str] | None = None) -> Target:
    """A target that serves a configs/ stack (``tqconfig.load_stack``) per KV dtype."""
    try:
        from tqconfig import load_stack
    except ImportError as exc:
        raise ServerError(f"--stack needs tqconfig.load_stack (configs/tqconfig): {exc}") from None
    try:
        stack = load_stack(stack_name)
    except Exception as exc:
        raise ServerError(f"--stack {stack_name!r}: {exc}") from None
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    model = str(getattr(stack, "served_model_name", None) or stack_name)
    environment = dict(stack.environment()) if hasattr(stack, "environment") else {}
    compose_file = compose_file or getattr(stack, "compose_file", None)
    if launcher == "auto":
        launcher = "compose" if compose_file and Path(compose_file).exists() and docker_engine_available() else "local"
    if launcher == "compose":
        if compose_file is None or not Path(compose_file).exists():
            raise ServerError(f"--launcher compose needs the stack's compose file (not found: {compose_file}); "
                              "run `make compose` or pass --compose-file")
        compose_env = {"TQ_PORT": str(port), **({"TQ_MAX_MODEL_LEN": str(max_model_len)} if max_model_len else {})}
        target = ComposeTarget(Path(compose_file), base_url, model, compose_env, health_timeout_s,
                               project=f"tqbench-{stack_name}")
        target.stack = stack
        return target
    if launcher != "local":
        raise ServerError(f"--launcher {launcher!r} is not valid; use 'auto', 'local' or 'compose'")
    if python:
        prefix = [python, "-m", "vllm.entrypoints.cli.main", "serve"]
    else:
        binary = vllm_bin or shutil.which("vllm")
        if binary is None:
            raise ServerError("no `vllm` on PATH: pass --vllm-bin PATH or --vllm-python PYTHON")
        prefix = [binary, "serve"]

    def argv_for(kv_cache_dtype: str) -> list[str]:
        args = stack.serve_args(kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len)
        return [*prefix, *args, "--host", host, "--port", str(port), *(extra_args or [])]

    target = LaunchTarget(argv_for, base_url, model, environment, health_timeout_s,
                          label=f"stack {stack_name}: {shlex.join(prefix)} <stack args> on port {port}")
    target.stack = stack  # parts (capacity planner) read the stack from CellContext.stack
    return target


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
