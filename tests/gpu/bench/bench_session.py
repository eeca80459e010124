#!/usr/bin/env python3
"""One GPU-host benchmark session per KV dtype: a patched vLLM 0.26.0 server, then the harness
(``tqbench run --endpoint``) and ``vllm bench serve`` against that same server with the same scenarios.

For each dtype given (``--dtypes auto`` in one device call, ``turboquant_4bit_nc`` in the next):
1. start ``vllm serve`` from ``--site`` (the carry kit's patched install) on a local folder with the
   full-size Qwen3.6-27B config, dummy bf16 weights and a local tokenizer (tests/gpu/stacks/prepare_model.py),
   KV budget ``--kv-cache-memory-bytes`` (6 GiB: the capacity probe stays short), prefix caching off
   (no cross-request cache hits in either tool), log into ``<run>/logs/server-<dtype>.log``;
2. ``tqbench run --config tests/gpu/bench/gpu-bench.yaml --endpoint ... --kv <dtype> --run-dir <run>``
   (capacity + latency; resumable through its DONE markers);
3. ``vllm bench serve --dataset-name random`` per scenario of the same config: same ISL/OSL/N/C/rate,
   ``--ignore-eos``, temperature 0, same seed and warm-ups, ``--save-result`` into
   ``<run>/vllm-bench/<dtype>/<scenario>.json`` (skipped when present);
4. stop the server; ``fidelity.py`` writes ``<run>/fidelity.json`` from both tools' results.
The run directory lives in ``--state`` (survives between calls while the machine stays warm) and is
packed into ``$OUT/bench-run.tar.gz`` at the end of every call, with fidelity.json and report.md beside it.
Every step gets what is left of ``--budget-s``; a step cut short is redone by the next call.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "tests" / "gpu" / "stacks"))

import prepare_model  # noqa: E402
from hostproc import free_port, stop, wait_gpu_free  # noqa: E402
CONFIG = HERE / "gpu-bench.yaml"
HF_CONFIG = "qwen3.6-27b"
SERVED_NAME = "qwen3.6-27b"
KV_CACHE_MEMORY_BYTES = 6 * 1024**3
SERVER_ARGS = ["--max-model-len", "32768", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
               "--no-enable-prefix-caching", "--language-model-only", "--seed", "0"]
SERVER_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_PLUGINS": "lora_filesystem_resolver,lora_hf_hub_resolver",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "0"}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        return self.end - time.monotonic() - reserve


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def server_argv(python: str, model_dir: Path, dtype: str, port: int, *, flashinfer: bool, enforce_eager: bool,
                server_args: list[str] | None = None) -> list[str]:
    """GPU defaults; ``server_args`` replaces the memory/shape flags (the local CPU dry run uses it)."""
    tuning = server_args if server_args is not None else [
        "--kv-cache-memory-bytes", str(KV_CACHE_MEMORY_BYTES), *SERVER_ARGS,
        *([] if flashinfer else ["--gdn-prefill-backend", "triton"])]
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), "--served-model-name", SERVED_NAME,
            "--load-format", "dummy", "--kv-cache-dtype", dtype, *tuning, "--host", "127.0.0.1", "--port", str(port)]
    if enforce_eager:
        argv.append("--enforce-eager")
    return argv


def vllm_bench_argv(python: str, scenario: dict, *, base_url: str, tokenizer: Path, dtype: str, seed: int,
                    num_warmups: int, result_dir: Path | None) -> list[str]:
    """`vllm bench serve` flags that reproduce one harness scenario (bench/README.md: closed/open loop)."""
    rate = scenario.get("request_rate", math.inf)
    argv = [python, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", base_url, "--endpoint", "/v1/completions", "--model", SERVED_NAME,
            "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", str(scenario["input_len"]), "--random-output-len", str(scenario["output_len"]),
            "--random-range-ratio", "0", "--num-prompts", str(scenario["num_prompts"]),
            "--max-concurrency", str(scenario["concurrency"]),
            "--request-rate", "inf" if math.isinf(float(rate)) else str(rate),
            "--burstiness", str(scenario.get("burstiness", 1.0)), "--ignore-eos", "--temperature", "0",
            "--seed", str(seed), "--num-warmups", str(num_warmups),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--metadata", f"scenario={scenario['name']}", f"kv_cache_dtype={dtype}", "--disable-tqdm"]
    if result_dir is not None:
        argv += ["--save-result", "--result-dir", str(result_dir), "--result-filename", f"{scenario['name']}.json"]
    return argv


def priming_argv(python: str, scenario: dict, **kwargs) -> list[str]:
    """One unsaved wave of the scenario (N = C): the server has met every shape before either tool measures."""
    wave = {**scenario, "num_prompts": scenario["concurrency"]}
    return vllm_bench_argv(python, wave, num_warmups=0, result_dir=None, **kwargs)


def healthy(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def run_step(argv: list[str], *, env: dict, timeout: float, log_path: Path) -> int | None:
    """Run one client step with its output in ``log_path``; None when the budget cut it short."""
    if timeout <= 5:
        return None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            out.write(f"\n(stopped: the call's budget ran out after {timeout:.0f} s)\n".encode())
            return None


def dtype_config(bench: dict, dtype: str, server_log: Path, state: Path) -> Path:
    """The committed config with this dtype's server log for the capacity part (endpoint mode has none)."""
    data = json.loads(json.dumps(bench))
    data.setdefault("capacity", {})["server_log"] = str(server_log)
    path = state / f"gpu-bench-{dtype}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pending_work(run_dir: Path, bench: dict, dtype: str) -> tuple[list[str], list[dict]]:
    parts = [p for p in bench["parts"] if not (run_dir / "raw" / p / dtype / "DONE").exists()]
    scenarios = [s for s in bench["latency"]["scenarios"]
                 if not (run_dir / "vllm-bench" / dtype / f"{s['name']}.json").exists()]
    return parts, scenarios


def export(run_dir: Path, out: Path, session_log: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "bench-run.tar.gz", "w:gz") as tar:
        tar.add(run_dir, arcname=run_dir.name)
    for name in ("fidelity.json", "report.md", "latency.csv", "capacity.csv"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, out / name)
    if session_log and session_log.exists():
        shutil.copyfile(session_log, out / "session.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", required=True, help="comma-separated KV dtypes of this call, e.g. auto")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site-patched"))
    parser.add_argument("--client-path", default="", help="extra PYTHONPATH for tqbench (locust wheels)")
    parser.add_argument("--state", type=Path, default=Path("/tmp/tq-bench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--gpu-label", default="gpu", help="e.g. h200; names the run directory")
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--bench-config", type=Path, default=CONFIG, help="tqbench config (default gpu-bench.yaml)")
    parser.add_argument("--hf-config", default=HF_CONFIG, help="configs/hf name or config.json path of the model")
    parser.add_argument("--server-args", default=None, help="replace the GPU memory/shape flags (local dry run)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)

    bench = yaml.safe_load(args.bench_config.read_text())
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in bench["kv_cache_dtypes"]]
    if unknown:
        parser.error(f"--dtypes: {unknown} not in {args.bench_config.name} kv_cache_dtypes {bench['kv_cache_dtypes']}")
    if not (args.site / "vllm").is_dir():
        parser.error(f"--site {args.site}: no vllm/ there; install the carry kit first (tests/gpu/README.md)")
    args.state.mkdir(parents=True, exist_ok=True)
    name_file = args.state / "run-name"
    if not name_file.exists():
        name_file.write_text(f"{dt.date.today().isoformat()}-{args.gpu_label}")
    run_dir = args.state / name_file.read_text().strip()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    model_dir = prepare_model.prepare(args.hf_config, args.state / "model")
    python = sys.executable
    flashinfer = (args.site / "flashinfer").exists()
    client_path = os.pathsep.join(p for p in (args.client_path, str(args.site), str(REPO / "bench"),
                                               str(REPO / "configs")) if p)
    client_env = {**os.environ, "PYTHONPATH": client_path, "PYTHONUNBUFFERED": "1"}
    bench_env = {**os.environ, "PYTHONPATH": str(args.site), **SERVER_ENV}
    status = 0
    try:
        for dtype in dtypes:
            parts, scenarios = pending_work(run_dir, bench, dtype)
            if not parts and not scenarios:
                log(f"{dtype}: harness and vllm bench results present, skipped")
                continue
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            server_log = run_dir / "logs" / f"server-{dtype}.log"
            command = server_argv(python, model_dir, dtype, port, flashinfer=flashinfer, enforce_eager=args.enforce_eager,
                                  server_args=None if args.server_args is None else shlex.split(args.server_args))
            log(f"{dtype}: starting {shlex.join(command[3:])}")
            with open(server_log, "ab") as out:
                out.write(f"$ {shlex.join(command)}\n".encode())
                out.flush()
                server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "PYTHONPATH": str(args.site), **SERVER_ENV})
            try:
                limit = min(float(bench["server"]["health_timeout_s"]), deadline.left(reserve=120))
                started = time.monotonic()
                while time.monotonic() - started < limit and server.poll() is None and not healthy(base_url):
                    time.sleep(3)
                if not healthy(base_url):
                    why = f"exited with {server.returncode}" if server.poll() is not None else f"not healthy in {limit:.0f} s"
                    log(f"{dtype}: server {why}; log {server_log}")
                    status = 1
                    continue
                log(f"{dtype}: healthy after {time.monotonic() - started:.0f} s")
                # Prime first, so that neither tool pays first-shape compilation (Triton JIT, CPU compile).
                for scenario in bench["latency"]["scenarios"]:
                    run_step(priming_argv(python, scenario, base_url=base_url, tokenizer=model_dir, dtype=dtype,
                                          seed=int(bench.get("seed", 0)) + 1),
                             env=bench_env, timeout=min(120.0, deadline.left(reserve=240)),
                             log_path=run_dir / "logs" / f"prime-{dtype}.log")
                log(f"{dtype}: primed")
                if parts:
                    config = dtype_config(bench, dtype, server_log, args.state)
                    reserve = 45.0 * len(scenarios)  # keep time for the vllm bench side
                    rc = run_step([python, "-m", "tqbench.cli", "run", "--config", str(config), "--endpoint", base_url,
                                   "--model", SERVED_NAME, "--kv", dtype, "--run-dir", str(run_dir)],
                                  env=client_env, timeout=deadline.left(reserve=reserve + 30),
                                  log_path=run_dir / "logs" / f"tqbench-{dtype}.log")
                    log(f"{dtype}: tqbench exit {rc}")
                    status = status or (0 if rc == 0 else 1)
                for scenario in scenarios:
                    result_dir = run_dir / "vllm-bench" / dtype
                    rc = run_step(vllm_bench_argv(python, scenario, base_url=base_url, tokenizer=model_dir, dtype=dtype,
                                                  seed=int(bench.get("seed", 0)),
                                                  num_warmups=int(bench["latency"].get("num_warmups", 0)),
                                                  result_dir=result_dir),
                                  env=bench_env, timeout=deadline.left(reserve=30),
                                  log_path=result_dir / f"{scenario['name']}.log")
                    log(f"{dtype}: vllm bench serve {scenario['name']} exit {rc}")
                    status = status or (0 if rc == 0 else 1)
            finally:
                stop(server)
                wait_gpu_free()
        if (run_dir / "latency.csv").exists():
            subprocess.run([python, str(HERE / "fidelity.py"), str(run_dir)], env=client_env, cwd=REPO, check=False)
    finally:
        export(run_dir, args.out, args.state / "session.log")
    return status


if __name__ == "__main__":
    sys.exit(main())
