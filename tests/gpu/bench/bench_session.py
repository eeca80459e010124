#!/usr/bin/env python3
"""GPU-host benchmark session: one lane per KV dtype, each on its own GPU, in parallel, merged into ONE
tqbench run directory (issue 3).

Per dtype (``lane``, one GPU, its own state folder ``<state>/<dtype>/``):
1. ``vllm serve`` (``--site``: the GPU kit's patched install) of the full-size Qwen3.6-27B config with
   dummy bf16 weights, 6 GiB KV (``--kv-cache-memory-bytes``), prefix caching off, eager;
2. priming: the harness runs one unsaved wave (N = C, at most 16 output tokens) of every scenario, so neither tool measures
   first-shape compilation (Triton JIT of the TurboQuant kernels);
3. ``tqbench run --parts capacity`` into the lane's run directory;
4. fidelity, interleaved per scenario and repeated while --deadline-s allows: harness (``tqbench run
   --parts latency --scenarios S``, its own run dir ``h<k>-S``), then ``vllm bench serve`` with the same
   ISL/OSL/N/C/seed/warm-ups (``vllm-bench/<dtype>/S.json``, ``S.rep<k>.json``); repeat 1 of the harness is
   the run's latency table, later repeats keep their latency.csv (``fidelity-reps/<dtype>/S.rep<k>.csv``);
5. the 27B server stops; SmolLM2-135M-Instruct (a small real model) is served with the same dtype and
   ``tqbench run --config gpu-quality.yaml --parts quality`` measures GSM8K / NIAH / perplexity.
Then (``main``): ``tqbench merge`` of every lane's run dirs into ``<state>/<date>-<gpu>/``, the report is
regenerated from the merged raw data, ``fidelity.py`` writes fidelity.json, and ``--out`` receives
``bench-run.tar.gz`` (the run dir), ``fidelity.json`` and ``session.log``. Every step is bounded by
``--deadline-s``; what did not fit is recorded in ``<run>/session-skips.jsonl`` with the reason.

``--slice NAME --model MODEL`` (gpu-complete.yaml): one part of the complete one-GPU run, sized for one
GPU-host run. A slice runs some scenarios (or the capacity probe, with quality beside it) of one model on
a server configured for it (decode CUDA graphs, 0.90 memory utilization, 131,072-token context; the
capacity slice a fixed KV pool); its run directory is named ``<date>-<gpu>-<model>``, and assemble.py
merges every slice of that model into one run directory and report.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
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
COMPLETE_CONFIG = HERE / "gpu-complete.yaml"
HF_CONFIG = "qwen3.6-27b"
SERVED_NAME = "qwen3.6-27b"
KV_CACHE_MEMORY_BYTES = 6 * 1024**3
SERVER_ARGS = ["--max-model-len", "32768", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
               "--no-enable-prefix-caching", "--language-model-only", "--seed", "0"]


@dataclasses.dataclass(frozen=True)
class Model:
    """A full-size model the sliced complete run serves with dummy weights."""
    hf_config: str               # configs/hf folder
    flags: tuple[str, ...]       # model-specific serve flags
    capacity_kv_bytes: int       # the capacity slice's fixed KV pool: admission steps stay short
    quality: str                 # the small real model served beside the capacity slice (QUALITY)


MODELS = {
    # The offline host has no image processor: text only. Without FlashInfer, GDN prefill uses Triton (below).
    "qwen3.6-27b": Model("qwen3.6-27b", ("--language-model-only",), 6 * 1024**3, "smollm2-135m"),
    # Sliding-window layers (bf16 always) take most of Gemma 4 31B's KV pool: 16 GiB holds about one
    # 32K request in bf16 (tqconfig's plan), so the max_model_len probe has something to admit.
    # Gemma 3 270M beside it: its full layers take the head_dim-256 TurboQuant path of Gemma's family.
    "gemma-4-31b": Model("gemma-4-31b-it", ("--language-model-only",), 16 * 1024**3, "gemma3-270m"),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """Part of the complete run that fits one GPU-host run (about 10 minutes): these scenarios (or capacity) on one server."""
    scenarios: tuple[str, ...]
    parts: tuple[str, ...]
    repeats: int                 # interleaved (harness, vllm bench serve) pairs per scenario
    vllm_bench: bool = True      # pair each harness run with `vllm bench serve` (fidelity.json)


SLICES = {
    # capacity at three probe lengths on a fixed KV pool; the quality model is served beside it
    "capacity": Slice((), ("capacity",), repeats=1, vllm_bench=False),
    # the five named scenarios in two halves of about equal decode time; 3 repeats for fidelity.json
    "named-a": Slice(("short_decode", "decode_heavy"), ("latency",), repeats=3),
    "named-b": Slice(("mixed", "long_prefill", "high_load"), ("latency",), repeats=3),
    "long-32k": Slice(("long_context_32k_c1", "long_context_32k_c8"), ("latency",), repeats=1),
    "long-128k": Slice(("long_context_128k_c1",), ("latency",), repeats=1, vllm_bench=False),
}
# Serving as users do on a large GPU: decode CUDA graphs without torch.compile (a start takes about a
# minute), the whole memory but a margin, long context.
SLICE_SERVER_ARGS = ["--max-num-seqs", "64", "--max-num-batched-tokens", "8192", "--no-enable-prefix-caching",
                     "--seed", "0", "--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]
SLICE_MAX_MODEL_LEN = 131072
CAPACITY_MAX_MODEL_LEN = 32768
# Priming meets every shape of a scenario (prefill chunks, decode batches up to C) without measuring it:
# a short wave is enough, since decode graphs are captured and TurboQuant kernels compiled at start-up.
PRIME_MAX_OUTPUT = 16


def slice_server_args(model: Model, slice_name: str) -> list[str]:
    """`vllm serve` memory/shape flags of one slice of the complete run."""
    if slice_name == "capacity":
        sizing = ["--kv-cache-memory-bytes", str(model.capacity_kv_bytes), "--max-model-len", str(CAPACITY_MAX_MODEL_LEN)]
    else:
        sizing = ["--gpu-memory-utilization", "0.90", "--max-model-len", str(SLICE_MAX_MODEL_LEN)]
    return [*sizing, *SLICE_SERVER_ARGS, *model.flags]
SERVER_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_PLUGINS": "lora_filesystem_resolver,lora_hf_hub_resolver",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "PYTHONUNBUFFERED": "1"}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        return self.end - time.monotonic() - reserve


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def server_argv(python: str, model_dir: Path, dtype: str, port: int, *, flashinfer: bool, enforce_eager: bool,
                server_args: list[str] | None = None, served_name: str = SERVED_NAME) -> list[str]:
    """GPU defaults; ``server_args`` replaces the memory/shape flags (a slice's, or the local CPU dry run's)."""
    tuning = server_args if server_args is not None else [
        "--kv-cache-memory-bytes", str(KV_CACHE_MEMORY_BYTES), *SERVER_ARGS,
        *([] if flashinfer else ["--gdn-prefill-backend", "triton"])]
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), "--served-model-name", served_name,
            "--load-format", "dummy", "--kv-cache-dtype", dtype, *tuning, "--host", "127.0.0.1", "--port", str(port)]
    if enforce_eager:
        argv.append("--enforce-eager")
    return argv


def vllm_bench_argv(python: str, scenario: dict, *, base_url: str, tokenizer: Path, dtype: str, seed: int,
                    num_warmups: int, result_dir: Path | None, served_name: str = SERVED_NAME) -> list[str]:
    """`vllm bench serve` flags that reproduce one harness scenario (bench/README.md: closed/open loop)."""
    rate = scenario.get("request_rate", math.inf)
    argv = [python, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", base_url, "--endpoint", "/v1/completions", "--model", served_name,
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
    """Run one client step with its output in ``log_path``; None when the deadline cut it short."""
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
            out.write(f"\n(stopped: --deadline-s reached after {timeout:.0f} s)\n".encode())
            return None


QUALITY_CONFIG = HERE / "gpu-quality.yaml"
QUALITY_MODEL = Path("/tmp/tqmodels/hf/smollm2-135m")
# SmolLM2-135M: max length 8192, head_dim 64 (TurboQuantConfig takes any head_dim; boundary layers 2+2 of 30).
# It shares its lane's GPU with the running 27B server during priming and capacity (neither is a latency
# measurement): fixed KV bytes (no profiling-based sizing) and a utilization whose start check (free memory
# >= 0.25 x 141 GB) holds beside the 27B server (~65 GB: 54 GB bf16 weights, 6 GiB KV, activations).
QUALITY_SERVER_ARGS = ("--max-model-len 8192 --gpu-memory-utilization 0.25 --kv-cache-memory-bytes 2147483648 "
                       "--enforce-eager --seed 0")
# The small real models (tests/gpu/kit/models.sh): HF folder, tqbench quality config, serve flags.
QUALITY = {
    "smollm2-135m": (QUALITY_MODEL, QUALITY_CONFIG, QUALITY_SERVER_ARGS),
    # 32K context for NIAH at 31,744 tokens; its KV at 32K is small (one KV head, 6 of 18 layers full)
    "gemma3-270m": (Path("/tmp/tqmodels/hf/gemma3-270m"), HERE / "gpu-quality-gemma3.yaml",
                    "--max-model-len 32768 --gpu-memory-utilization 0.25 --kv-cache-memory-bytes 4294967296 "
                    "--enforce-eager --seed 0"),
}
# Seconds kept back at the end of the whole session for merge, report, fidelity and packing.
FINISH_RESERVE_S = 35.0
# Guess of a step's duration before it has run once (seconds): start only what can finish.
FIRST_GUESS_S = {"prime": 60.0, "capacity": 60.0, "harness": 45.0, "vllm_bench": 50.0, "quality": 150.0}


def record_skip(run_root: Path, dtype: str, step: str, why: str) -> None:
    run_root.mkdir(parents=True, exist_ok=True)
    with open(run_root / "session-skips.jsonl", "a") as fh:
        fh.write(json.dumps({"time": dt.datetime.now().isoformat(timespec="seconds"), "kv_cache_dtype": dtype,
                             "step": step, "why": why}) + "\n")
    log(f"{dtype}: SKIP {step}: {why}")


def physical_gpu() -> str | None:
    """This lane's GPU index for nvidia-smi (which ignores CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return visible if visible.isdigit() else None


def wait_own_gpu_free(limit_mib: int = 2048, timeout_s: float = 60) -> None:
    gpu = physical_gpu()
    if gpu is None or shutil.which("nvidia-smi") is None:
        return
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout.strip()
        if not out or int(out.splitlines()[0]) < limit_mib:
            return
        time.sleep(2)


def write_config(bench: dict, path: Path, **changes) -> Path:
    data = json.loads(json.dumps(bench))
    for key, value in changes.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_server(command: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"$ {shlex.join(command)}\n".encode())
        out.flush()
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_healthy(server: subprocess.Popen, base_url: str, limit: float) -> str | None:
    """None when healthy, else why not."""
    started = time.monotonic()
    while time.monotonic() - started < limit and server.poll() is None and not healthy(base_url):
        time.sleep(2)
    if healthy(base_url):
        return None
    return f"exited with {server.returncode}" if server.poll() is not None else f"not healthy in {limit:.0f} s"


class Lane:
    """One KV dtype on one GPU: full-size dummy-weight server (prime, capacity, interleaved fidelity), then quality."""

    def __init__(self, args, bench: dict, dtype: str, deadline: Deadline):
        self.args, self.bench, self.dtype, self.deadline = args, bench, dtype, deadline
        self.state = args.state / dtype
        self.state.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.state / "main"  # capacity (+ the harness latency of repeat 1, merged later)
        self.python = sys.executable
        client_path = os.pathsep.join(p for p in (args.client_path, str(args.site), str(REPO / "bench"),
                                                   str(REPO / "configs")) if p)
        self.client_env = {**os.environ, "PYTHONPATH": client_path, "PYTHONUNBUFFERED": "1", **SERVER_ENV}
        self.server_env = {**os.environ, "PYTHONPATH": str(args.site), **SERVER_ENV}
        self.served = args.served_name
        self.took: dict[str, list[float]] = {}
        self.status = 0

    def guess(self, kind: str) -> float:
        seen = self.took.get(kind)
        return 1.25 * max(seen) if seen else FIRST_GUESS_S[kind]

    def step(self, kind: str, label: str, argv: list[str], log_path: Path, env: dict, *, keep: float = 0.0) -> int | None:
        """Run ``argv`` if its guessed duration fits before the deadline (minus ``keep``); records skips."""
        left = self.deadline.left(reserve=keep)
        if left < self.guess(kind):
            record_skip(self.args.state, self.dtype, label, f"{left:.0f} s left (keeping {keep:.0f} s for later "
                        f"steps), a {kind} step needs about {self.guess(kind):.0f} s")
            return None
        started = time.monotonic()
        rc = run_step(argv, env=env, timeout=left, log_path=log_path)
        self.took.setdefault(kind, []).append(time.monotonic() - started)
        log(f"{self.dtype}: {label} exit {rc} ({time.monotonic() - started:.0f} s)")
        if rc != 0:
            self.status = 1
        return rc

    def tqbench(self, config: Path, run_dir: Path, base_url: str, model: str, parts: str,
                scenarios: str | None = None) -> list[str]:
        argv = [self.python, "-m", "tqbench.cli", "run", "--config", str(config), "--endpoint", base_url,
                "--model", model, "--kv", self.dtype, "--parts", parts, "--run-dir", str(run_dir)]
        return argv + (["--scenarios", scenarios] if scenarios else [])

    def run(self) -> int:
        args = self.args
        model_dir = prepare_model.prepare(args.hf_config, self.state / "model")
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server_log = self.run_dir / "logs" / f"server-{self.dtype}.log"
        flashinfer = (args.site / "flashinfer").exists()
        if args.server_args is not None:
            server_args = shlex.split(args.server_args)
        elif args.slice:
            server_args = slice_server_args(MODELS[args.model], args.slice)
            if args.model.startswith("qwen") and not flashinfer:
                server_args += ["--gdn-prefill-backend", "triton"]
        else:
            server_args = None
        command = server_argv(self.python, model_dir, self.dtype, port, flashinfer=flashinfer,
                              enforce_eager=args.enforce_eager, server_args=server_args, served_name=self.served)
        log(f"{self.dtype}: GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '?')}: starting {shlex.join(command[3:])}")
        server = start_server(command, server_log, self.server_env)
        try:
            limit = min(float(self.bench["server"]["health_timeout_s"]), self.deadline.left(reserve=60))
            why = wait_healthy(server, base_url, limit)
            if why:
                record_skip(args.state, self.dtype, "model server and everything on it", f"server {why}; log {server_log}")
                self.status = 1
            else:
                log(f"{self.dtype}: {self.served} server healthy")
                self.measure(base_url, model_dir, server_log)
        finally:
            stop(server)
            self.finish_quality()
            wait_own_gpu_free()
        if self.quality_pending():  # the overlapped attempt failed or never ran: once more, GPU to itself
            rc = self.quality(wait=True, label=f"quality ({Path(self.args.quality_model).name}, alone on the GPU)")
            log(f"{self.dtype}: quality retry exit {rc}")
        return self.status

    def quality_pending(self) -> bool:
        if not self.args.quality_model or (self.state / "quality-missing").exists():
            return False
        return not (self.state / "quality" / "raw" / "quality" / self.dtype / "DONE").exists()

    def finish_quality(self) -> None:
        """Wait for the overlapped quality run (bounded by the deadline), then record how it ended."""
        proc, started = getattr(self, "quality_proc", (None, 0.0))
        if proc is None:
            return
        try:
            rc = proc.wait(timeout=max(1.0, self.deadline.left()))
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        self.quality_proc = (None, 0.0)
        self.took.setdefault("quality", []).append(time.monotonic() - started)
        log(f"{self.dtype}: quality ({Path(self.args.quality_model).name}, beside the {self.served} server) exit {rc} "
            f"({time.monotonic() - started:.0f} s)")

    def measure(self, base_url: str, model_dir: Path, server_log: Path) -> None:
        bench, state, dtype = self.bench, self.state, self.dtype
        if self.args.quality_model and self.args.quality_overlap:
            self.quality(wait=False)  # beside priming and capacity, finished before any latency pair starts
        quality_keep = 0.0
        parts = self.args.parts or bench["parts"]
        scenarios = [s for s in bench["latency"]["scenarios"] if "latency" in parts
                     and (self.args.scenarios is None or s["name"] in self.args.scenarios)]
        if scenarios:
            primer = {**bench, "parts": ["latency"], "latency": {**bench["latency"], "num_warmups": 0, "scenarios": [
                {**s, "num_prompts": s["concurrency"], "output_len": min(s["output_len"], PRIME_MAX_OUTPUT)}
                for s in scenarios]}}
            self.step("prime", "priming (harness, one short wave per scenario, discarded)",
                      self.tqbench(write_config(primer, state / "primer.yaml"), state / "primer-run", base_url,
                                   self.served, "latency"),
                      state / "logs" / "prime.log", self.client_env, keep=quality_keep)
        if "capacity" in parts:
            config = bench.copy()
            config["capacity"] = {**bench.get("capacity", {}), "server_log": str(server_log)}
            self.step("capacity", "tqbench capacity",
                      self.tqbench(write_config(config, state / "bench.yaml"), self.run_dir, base_url, self.served,
                                   "capacity"),
                      self.run_dir / "logs" / f"tqbench-capacity-{dtype}.log", self.client_env, keep=quality_keep)
        self.finish_quality()  # the latency pairs get the GPU to themselves
        quality_keep = self.guess("quality") if self.quality_pending() else 0.0
        config_path = write_config(bench, state / "latency.yaml")
        seed, warmups = int(bench.get("seed", 0)), int(bench["latency"].get("num_warmups", 0))
        for repeat in range(1, self.args.repeats + 1):
            for scenario in scenarios:
                name = scenario["name"]
                # Repeat 1 of both tools before any repeat 2: the minimum for a comparison comes first.
                rep_dir = state / f"h{repeat}-{name}"
                self.step("harness", f"harness {name} repeat {repeat}",
                          self.tqbench(config_path, rep_dir, base_url, self.served, "latency", name),
                          rep_dir / "logs" / f"tqbench-latency-{dtype}-{name}-rep{repeat}.log", self.client_env,
                          keep=quality_keep + (self.guess("vllm_bench") if self.args.vllm_bench else 0.0))
                if not (rep_dir / "latency.csv").exists() or not self.args.vllm_bench:
                    continue  # no harness number (or no pairs in this slice), so no pair to compare
                result_dir = state / "vllm-bench"
                filename = f"{name}.json" if repeat == 1 else f"{name}.rep{repeat}.json"
                argv = vllm_bench_argv(self.python, scenario, base_url=base_url, tokenizer=model_dir, dtype=dtype,
                                       seed=seed, num_warmups=warmups, result_dir=result_dir, served_name=self.served)
                argv[argv.index("--result-filename") + 1] = filename
                self.step("vllm_bench", f"vllm bench serve {name} repeat {repeat}", argv,
                          result_dir / f"{Path(filename).stem}.log", self.server_env, keep=quality_keep)

    def quality(self, *, wait: bool, label: str = "") -> int | None:
        """tqbench quality on the small real model; ``wait=False`` starts it in the background."""
        args = self.args
        model = Path(args.quality_model)
        label = label or f"quality ({model.name})"
        if not (model / "config.json").exists():
            record_skip(args.state, self.dtype, "quality", f"no model folder {model} (the install step provides it)")
            (self.state / "quality-missing").touch()
            return None
        bench = yaml.safe_load(args.quality_config.read_text())
        launch = (f"{{python}} -m vllm.entrypoints.cli.main serve {model} --served-model-name {model.name} "
                  f"--kv-cache-dtype {{kv_cache_dtype}} {args.quality_server_args} --host {{host}} --port {{port}}")
        argv = [self.python, "-m", "tqbench.cli", "run", "--config", str(args.quality_config), "--launch-cmd", launch,
                "--model", model.name, "--kv", self.dtype, "--parts", "quality", "--port", str(free_port()),
                "--vllm-python", self.python, "--health-timeout", str(bench["server"]["health_timeout_s"]),
                "--run-dir", str(self.state / "quality")]
        env = dict(self.client_env)
        if args.gsm8k_dir:
            env["TQBENCH_GSM8K_DIR"] = str(args.gsm8k_dir)
        log_path = self.state / "logs" / "quality.log"
        if wait:
            return self.step("quality", label, argv, log_path, env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            self.quality_proc = (subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                                  start_new_session=True), time.monotonic())
        log(f"{self.dtype}: {label} started beside the {self.served} server")
        return None


def merge_lanes(args, dtypes: list[str], run_dir: Path, python: str, env: dict) -> None:
    """One run directory from every lane: harness cells via `tqbench merge`, plus the fidelity inputs."""
    sources = []
    for dtype in dtypes:
        lane = args.state / dtype
        sources += [p for p in [lane / "main", *sorted(lane.glob("h1-*")), lane / "quality"] if (p / "run.json").exists()]
        for result in sorted((lane / "vllm-bench").glob("*")) if (lane / "vllm-bench").is_dir() else []:
            target = run_dir / "vllm-bench" / dtype / result.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result, target)
        for rep_dir in sorted(lane.glob("h*-*")):
            repeat, scenario = rep_dir.name[1:].split("-", 1)
            if repeat != "1" and (rep_dir / "latency.csv").exists():
                target = run_dir / "fidelity-reps" / dtype / f"{scenario}.rep{repeat}.csv"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(rep_dir / "latency.csv", target)
        for log_file in sorted((lane / "logs").glob("*.log")) if (lane / "logs").is_dir() else []:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_file, run_dir / "logs" / f"{log_file.stem}-{dtype}.log")
    if not sources:
        log("merge: no lane produced a run directory")
        return
    rc = subprocess.run([python, "-m", "tqbench.cli", "merge", str(run_dir), *map(str, sources)], env=env, cwd=REPO,
                        check=False).returncode
    log(f"merge of {len(sources)} run dirs exit {rc}")
    if (run_dir / "latency.csv").exists():
        subprocess.run([python, str(HERE / "fidelity.py"), str(run_dir)], env=env, cwd=REPO, check=False)
    gzip_large_prompts(run_dir)


def gzip_large_prompts(run_dir: Path, limit: int = 900_000) -> None:
    """The repository takes no file over 1 MB: prompt files above ``limit`` bytes are kept gzipped."""
    for big in run_dir.glob("prompts/*.jsonl"):
        if big.stat().st_size > limit:
            with open(big, "rb") as src, gzip.open(f"{big}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            big.unlink()


def export(run_dir: Path, out: Path, session_log: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        with tarfile.open(out / "bench-run.tar.gz", "w:gz") as tar:
            tar.add(run_dir, arcname=run_dir.name)
    if (run_dir / "fidelity.json").exists():
        shutil.copyfile(run_dir / "fidelity.json", out / "fidelity.json")
    if session_log and session_log.exists():
        shutil.copyfile(session_log, out / "session.log")


def plan(args, dtypes: list[str], gpus: list[str]) -> list[str]:
    parts = args.parts or ["capacity", "latency"]
    work = ["priming"] if "latency" in parts else []
    work += ["capacity"] if "capacity" in parts else []
    if "latency" in parts:
        pair = "(harness, vllm bench serve)" if args.vllm_bench else "harness"
        which = ", ".join(args.scenarios) if args.scenarios is not None else f"every scenario of {args.bench_config.name}"
        work.append(f"{args.repeats} x {pair} for {which}")
    lines = [f"lane {d}: GPU {gpus[i % len(gpus)] if gpus else '(CUDA_VISIBLE_DEVICES unset)'}: {args.served_name} "
             f"dummy server ({args.hf_config}{', slice ' + args.slice if args.slice else ''}), {', '.join(work)}, "
             f"then quality on {args.quality_model or '(none)'}" for i, d in enumerate(dtypes)]
    if gpus and len(gpus) < len(dtypes):
        lines.append(f"only {len(gpus)} GPU(s) for {len(dtypes)} lanes: lanes sharing a GPU run one after another")
    name = f"<date>-{args.gpu_label}" + (f"-{args.model}" if args.slice else "")
    lines.append(f"then: tqbench merge -> {args.state}/{name}, fidelity.py, pack into {args.out}")
    if args.slice:
        lines.append(f"then, where the results land: tests/gpu/bench/assemble.py bench/results/{name} "
                     f"<this and the other slices' bench-run.tar.gz>")
    return lines


def resolve_slice(parser: argparse.ArgumentParser, args) -> None:
    """Fill in what --model / --slice decide (the lane subprocesses repeat this from the same argv)."""
    if args.slice and not args.model:
        parser.error(f"--slice {args.slice}: name the model too (--model {' or '.join(sorted(MODELS))})")
    model = MODELS[args.model] if args.model else None
    args.served_name = args.model or SERVED_NAME
    quality_dir, quality_config, quality_args = QUALITY[model.quality if model else "smollm2-135m"]
    args.quality_model = str(quality_dir) if args.quality_model is None else args.quality_model
    args.quality_config = args.quality_config or quality_config
    args.quality_server_args = args.quality_server_args or quality_args
    args.hf_config = args.hf_config or (model.hf_config if model else HF_CONFIG)
    args.bench_config = args.bench_config or (COMPLETE_CONFIG if args.slice else CONFIG)
    chosen = SLICES.get(args.slice)
    args.scenarios = list(chosen.scenarios) if chosen else None
    args.parts = list(chosen.parts) if chosen else None
    args.vllm_bench = chosen.vllm_bench if chosen else True
    args.repeats = args.repeats if args.repeats is not None else (chosen.repeats if chosen else 2)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    if chosen:
        # every slice's server is its own: a fresh state folder per model and slice, so that slices of one
        # session never resume each other; decode CUDA graphs, so never eager; quality only beside capacity
        args.state = args.state / args.model / args.slice
        args.enforce_eager = False
        if "capacity" not in chosen.parts:
            args.quality_model = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="auto,turboquant_4bit_nc", help="comma-separated KV dtypes, one lane each")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site-patched"))
    parser.add_argument("--client-path", default="", help="extra PYTHONPATH for tqbench (locust, lm_eval, needlehaystack)")
    parser.add_argument("--state", type=Path, default=Path("/tmp/tq-bench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("RESULTS_DIR") or os.environ.get("OUT") or "out"),
                        help="results directory (default: $RESULTS_DIR, else $OUT, else ./out)")
    parser.add_argument("--gpu-label", default="gpu", help="e.g. h200; names the run directory")
    parser.add_argument("--deadline-s", "--budget-s", dest="deadline_s", type=float, default=540,
                        help="wall seconds from start for everything, packing included")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved (harness, vllm bench serve) pairs per scenario (default 2, or the slice's)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="full-size model to serve with dummy weights (default: qwen3.6-27b)")
    parser.add_argument("--slice", choices=list(SLICES), default=None,
                        help="one GPU-host run's part of the complete run (gpu-complete.yaml); needs --model")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--bench-config", type=Path, default=None,
                        help="tqbench config (default gpu-bench.yaml; with --slice gpu-complete.yaml)")
    parser.add_argument("--hf-config", default=None, help="configs/hf name or config.json path of the model "
                        "(default: the --model's, else qwen3.6-27b)")
    parser.add_argument("--server-args", default=None, help="replace the GPU memory/shape flags (local dry run)")
    parser.add_argument("--quality-model", default=None,
                        help="HF folder of the quality model ('' = none; default SmolLM2-135M, or the --model's)")
    parser.add_argument("--quality-config", type=Path, default=None)
    parser.add_argument("--quality-server-args", default=None)
    parser.add_argument("--no-quality-overlap", dest="quality_overlap", action="store_false",
                        help="run quality only after the model server stopped (default: beside priming and capacity)")
    parser.add_argument("--gsm8k-dir", type=Path, default=None, help="folder with GSM8K test/train.jsonl")
    parser.add_argument("--lane", default=None, help=argparse.SUPPRESS)  # internal: run one dtype's lane
    parser.add_argument("--dry-run", "--list", dest="dry_run", action="store_true", help="print the plan, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_s)
    resolve_slice(parser, args)

    bench = yaml.safe_load(args.bench_config.read_text())
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in bench["kv_cache_dtypes"]]
    if unknown:
        parser.error(f"--dtypes: {unknown} not in {args.bench_config.name} kv_cache_dtypes {bench['kv_cache_dtypes']}")
    known = [s["name"] for s in (bench.get("latency") or {}).get("scenarios", [])]
    missing = [s for s in args.scenarios or [] if s not in known]
    if missing:
        parser.error(f"--slice {args.slice}: scenarios {missing} are not in {args.bench_config.name} (it has {known})")
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if args.dry_run:
        print("\n".join(plan(args, dtypes, gpus)))
        return 0
    if not (args.site / "vllm").is_dir():
        parser.error(f"--site {args.site}: no vllm/ there; run tests/gpu/kit/install.sh first (tests/gpu/README.md)")
    args.state.mkdir(parents=True, exist_ok=True)
    if args.lane:
        return Lane(args, bench, args.lane, deadline).run()

    name_file = args.state / "run-name"
    if not name_file.exists():  # never the name of a run already committed in bench/results/
        name = base = f"{dt.date.today().isoformat()}-{args.gpu_label}" + (f"-{args.model}" if args.slice else "")
        suffix = 1
        while (REPO / "bench" / "results" / name).exists():
            suffix += 1
            name = f"{base}-{suffix}"
        name_file.write_text(name)
    run_dir = args.state / name_file.read_text().strip()
    for line in plan(args, dtypes, gpus):
        log(line)
    python = sys.executable
    client_path = os.pathsep.join(p for p in (args.client_path, str(args.site), str(REPO / "bench"),
                                               str(REPO / "configs")) if p)
    env = {**os.environ, "PYTHONPATH": client_path, "PYTHONUNBUFFERED": "1"}
    lanes: dict[str, subprocess.Popen] = {}
    lane_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    try:
        # Lanes on distinct GPUs run together; a lane whose GPU is taken waits for it.
        queue = list(enumerate(dtypes))
        while queue or lanes:
            busy = {p.gpu for p in lanes.values()}
            for i, dtype in list(queue):
                gpu = gpus[i % len(gpus)] if gpus else ""
                if gpu in busy and gpus:
                    continue
                left = deadline.left(reserve=FINISH_RESERVE_S)
                if left < 120:
                    record_skip(args.state, dtype, "lane", f"only {left:.0f} s left before the deadline")
                    queue.remove((i, dtype))
                    continue
                child_env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
                command = [python, str(Path(__file__).resolve()), *lane_argv, "--lane", dtype,
                           "--deadline-s", str(int(left))]
                proc = subprocess.Popen(command, env=child_env, cwd=REPO)
                proc.gpu = gpu
                lanes[dtype] = proc
                busy.add(gpu)
                queue.remove((i, dtype))
                log(f"lane {dtype} started on GPU {gpu or '(default)'}")
            for dtype, proc in list(lanes.items()):
                if proc.poll() is not None:
                    log(f"lane {dtype} exit {proc.returncode}")
                    del lanes[dtype]
                elif deadline.left(reserve=FINISH_RESERVE_S - 10) <= 0:
                    stop(proc)
                    record_skip(args.state, dtype, "lane (stopped)", "deadline reached")
                    del lanes[dtype]
            time.sleep(2)
        merge_lanes(args, dtypes, run_dir, python, env)
        if (args.state / "session-skips.jsonl").exists():
            shutil.copyfile(args.state / "session-skips.jsonl", run_dir / "session-skips.jsonl")
    finally:
        for proc in lanes.values():
            stop(proc)
        export(run_dir, args.out, args.state / "session.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
