#!/usr/bin/env python3
"""Serve each CUDA stack of configs/ natively on the offline GPU host (no Docker) and check it answers.

For every stack whose hardware is NVIDIA, the exact argv of ``tqconfig.load_stack(name).serve_args()``
is started with the patched vLLM 0.26.0 of the GPU kit (``--site``, e.g. /tmp/site-patched), changing
only what the host forces:

- the model id becomes a local folder with the full-size ``configs/hf/<model>/config.json`` (bf16
  dummy weights, no quantization_config) and a locally trained tokenizer (``prepare_model.py``);
  ``--revision`` is dropped (a local folder has none) and ``--load-format dummy`` added;
- ``--kv-cache-memory-bytes`` is the per-GPU KV budget the planner gives the stack's own card, times
  stack TP / run TP when the host has fewer GPUs than the stack's TP (which is then lowered);
- ``--language-model-only`` for multimodal stacks (no offline image processor for these models);
- ``--gdn-prefill-backend triton`` for hybrid models when FlashInfer is not installed;
- ``--host``/``--port``; optionally ``--enforce-eager`` (``--enforce-eager`` flag of this script).
Every change is recorded per stack as ``argv_diff`` next to both argvs.

Per stack: ``/health`` status, a streamed ``/v1/completions`` (status, chunks), the KV-cache tokens and
maximum concurrency from the server log and ``/metrics``, the planner's prediction for the same
settings, and the log tail on failure. Results go to ``<out>/stacks-<date>-<gpu>.jsonl``, the server logs
to ``<out>/logs/<stack>.log``. Resumable on the same host: state lives in ``--state-dir`` and a rerun
skips finished stacks; ``--budget-s`` stops starting stacks that could overrun the run's time limit.

    PYTHONPATH=/tmp/site-patched:configs:bench python3 tests/gpu/stacks/serve_stacks.py \
        --site /tmp/site-patched --out results/stacks
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO / "configs"), str(Path(__file__).resolve().parent)]

import prepare_model  # noqa: E402
from hostproc import free_port, stop, wait_gpu_free  # noqa: E402
import tqconfig  # noqa: E402

LOG_COPY_BYTES = 8 * 1024 * 1024  # results stay small enough to commit: keep the log's end
STACK_MIN_S = 240  # do not start a stack with less time left than this (--budget-s)


# --------------------------------------------------------------------------------------------- argv plan
def parse_options(argv: list[str]) -> dict[str, str | bool]:
    """``vllm serve`` argv after the model: ``--flag value`` pairs, bare ``--flag`` as True."""
    options: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        name = argv[i]
        if not name.startswith("--"):
            raise ValueError(f"unexpected positional argument {name!r} in serve argv")
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            options[name] = argv[i + 1]
            i += 2
        else:
            options[name] = True
            i += 1
    return options


def argv_diff(stack_argv: list[str], run_argv: list[str], why: dict[str, str]) -> list[dict[str, Any]]:
    """Each option whose value differs between the stack's argv and the argv run, with the reason."""
    before = {"<model>": stack_argv[0], **parse_options(stack_argv[1:])}
    after = {"<model>": run_argv[0], **parse_options(run_argv[1:])}
    changes = []
    for option in [*before, *[o for o in after if o not in before]]:
        if before.get(option) != after.get(option):
            changes.append({"option": option, "stack": before.get(option), "run": after.get(option),
                            "why": why.get(option, "")})
    return changes


@dataclass
class RunPlan:
    stack: str
    served_model_name: str
    hf_config: str
    stack_argv: list[str]
    argv: list[str]
    argv_diff: list[dict[str, Any]]
    environment: dict[str, str]
    stack_tp: int
    run_tp: int
    kv_cache_memory_bytes: int
    kv_cache_dtype: str
    max_model_len: int
    prediction: dict[str, Any] = field(default_factory=dict)


def _prediction(plan: "tqconfig.CapacityPlan") -> dict[str, Any]:
    keys = ("kv_cache_tokens", "max_concurrency", "reported_kv_cache_tokens", "reported_max_concurrency",
            "num_blocks", "page_bytes", "num_kv_cache_groups", "kv_cache_memory_bytes", "tensor_parallel_size",
            "turboquant_layers", "fits", "reasons")
    return {k: getattr(plan, k) for k in keys}


def plan_stack(name: str, *, gpus: int, model_dir: Path, port: int, flashinfer: bool,
               keep_multimodal: bool = False, enforce_eager: bool = False) -> RunPlan:
    """The exact stack argv and the argv to run on this host, with every difference explained."""
    stack = tqconfig.load_stack(name)
    s = stack.serving
    own = stack.plan()  # the stack's own card: memory left for KV per GPU
    run_tp = min(s.tensor_parallel_size, gpus)
    kv_bytes = own.kv_cache_memory_bytes * s.tensor_parallel_size // run_tp
    overrides: dict[str, Any] = {"model": str(model_dir), "revision": None, "load_format": "dummy",
                                 "kv_cache_memory_bytes": kv_bytes, "tensor_parallel_size": run_tp}
    why = {
        "<model>": "local folder: full-size configs/hf config.json (bf16 dummy weights) + locally trained tokenizer",
        "--revision": "a local folder has no hub revision",
        "--load-format": "no weights on the offline host: dummy weights",
        "--kv-cache-memory-bytes": (
            f"per-GPU KV budget the planner leaves on a {stack.hardware.gpu_memory_gib} GiB {stack.hardware.gpu_name}"
            + (f", x{s.tensor_parallel_size}/{run_tp} for the lower TP" if run_tp != s.tensor_parallel_size else "")),
        "--tensor-parallel-size": f"the host has {gpus} GPU(s)",
        "--language-model-only": "no offline image processor for this model: the vision tower is not profiled",
        "--gdn-prefill-backend": "FlashInfer is not installed on the host (vLLM's GDN prefill default needs it)",
        "--enforce-eager": "asked for (--enforce-eager): skips torch.compile and CUDA graphs for a faster start",
        "--host": "bind locally for the checks", "--port": "bind locally for the checks",
    }
    multimodal = not s.language_model_only
    if multimodal and not keep_multimodal:
        overrides["language_model_only"] = True
    if stack.architecture.is_hybrid and not flashinfer:
        overrides["gdn_prefill_backend"] = "triton"
    if enforce_eager:
        overrides["enforce_eager"] = True
    overrides.update(host="127.0.0.1", port=port)
    stack_argv = stack.serve_args()
    argv = stack.serve_args(**overrides)
    prediction = {
        "run": _prediction(stack.plan(tensor_parallel_size=run_tp, kv_cache_memory_bytes=kv_bytes)),
        "stack_card": _prediction(own),
    }
    environment = {**stack.environment(), "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(run_tp))}
    return RunPlan(name, stack.served_model_name, stack.model.hf_config, stack_argv, argv,
                   argv_diff(stack_argv, argv, why), environment, s.tensor_parallel_size, run_tp, kv_bytes,
                   s.kv_cache_dtype, s.max_model_len, prediction)


def cuda_stacks() -> list[str]:
    names = [n for n in tqconfig.list_stacks() if tqconfig.load_stack(n).hardware.vendor == "nvidia"]
    # The TP=4 Gemma 4 31B stack first: it is the one a 4-GPU host exists for.
    return sorted(names, key=lambda n: (tqconfig.load_stack(n).serving.tensor_parallel_size < 4, n))


# --------------------------------------------------------------------------------------------- server log
KV_TOKENS_RE = re.compile(r"(?:GPU|CPU|XPU) KV cache size: ([\d,]+) tokens")
CONCURRENCY_RE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
MAX_LEN_RE = re.compile(r"estimated maximum model length is (\d+)")


def parse_server_log(text: str) -> dict[str, Any]:
    """KV-cache figures vLLM 0.26.0 logs at startup (first occurrence; TP workers repeat them)."""
    facts: dict[str, Any] = {"kv_cache_tokens": None, "max_concurrency": None, "concurrency_for_tokens": None,
                             "estimated_max_model_len": None}
    if m := KV_TOKENS_RE.search(text):
        facts["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    if m := CONCURRENCY_RE.search(text):
        facts["concurrency_for_tokens"] = int(m.group(1).replace(",", ""))
        facts["max_concurrency"] = float(m.group(2))
    if m := MAX_LEN_RE.search(text):
        facts["estimated_max_model_len"] = int(m.group(1))
    return facts


def cache_config_info(metrics_text: str) -> dict[str, str]:
    match = re.search(r"^vllm:cache_config_info\{([^}]*)\}", metrics_text, re.M)
    return dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) if match else {}


# --------------------------------------------------------------------------------------------- host run
def host_gpus() -> tuple[int, str]:
    """(GPU count, short name such as 'h200' or 'h200x4') from nvidia-smi."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return 0, "nogpu"
    names = [n.strip() for n in names if n.strip()]
    if not names:
        return 0, "nogpu"
    short = re.sub(r"[^a-z0-9]+", "", names[0].lower().replace("nvidia", "")) or "gpu"
    return len(names), short + (f"x{len(names)}" if len(names) > 1 else "")


def streamed_completion(base_url: str, model: str) -> dict[str, Any]:
    import httpx

    body = {"model": model, "prompt": "The river near the village school", "max_tokens": 16, "min_tokens": 16,
            "ignore_eos": True, "temperature": 0.0, "stream": True}
    chunks, text, status, error = 0, "", None, None
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as response:
            status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    payload = json.loads(line[6:])
                    if payload.get("choices"):
                        chunks += 1
                        text += payload["choices"][0].get("text", "")
            if status != 200:
                error = response.read().decode(errors="replace")[:500]
    except Exception as exc:  # the record says what broke; the next stack still runs
        error = f"{type(exc).__name__}: {exc}"
    return {"completion_status": status, "streamed_chunks": chunks, "completion_text": text[:200],
            "completion_error": error}


def serve_and_check(plan: RunPlan, site: Path, log_path: Path, health_timeout_s: float) -> dict[str, Any]:
    import httpx

    base_url = f"http://127.0.0.1:{parse_options(plan.argv[1:])['--port']}"
    env = {**os.environ, **plan.environment, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *plan.argv]
    record: dict[str, Any] = {"health_status": None, "completion_status": None, "streamed_chunks": 0}
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while time.monotonic() - started < health_timeout_s and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                record["health_status"] = httpx.get(f"{base_url}/health", timeout=5).status_code
                if record["health_status"] == 200:
                    break
            time.sleep(3)
        record["startup_s"] = round(time.monotonic() - started, 1)
        if record["health_status"] != 200:
            record["error"] = (f"server exited with code {process.returncode} before /health answered"
                               if process.poll() is not None else f"/health not 200 within {health_timeout_s:.0f} s")
            return record
        record.update(streamed_completion(base_url, plan.served_model_name))
        with contextlib.suppress(httpx.HTTPError, ValueError):
            record["cache_config_info"] = cache_config_info(httpx.get(f"{base_url}/metrics", timeout=30).text)
            cards = httpx.get(f"{base_url}/v1/models", timeout=30).json().get("data", [])
            record["served_max_model_len"] = cards[0].get("max_model_len") if cards else None
            record["vllm_version"] = httpx.get(f"{base_url}/version", timeout=30).json().get("version")
        return record
    finally:
        stop(process)
        record["gpu_freed"] = wait_gpu_free()
        record["log_facts"] = parse_server_log(log_path.read_text(errors="replace"))


def compare(record: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
    served = record.get("log_facts", {})
    out: dict[str, Any] = {}
    for key in ("kv_cache_tokens", "max_concurrency"):
        if served.get(key) and prediction.get(key):
            out[f"{key}_served_over_predicted"] = round(served[key] / prediction[key], 4)
    return out


def preflight(site: Path, state: Path) -> dict[str, Any]:
    """The images' verify steps against the installed site: patch series applied, then images/ verify."""
    steps = [[sys.executable, str(REPO / "patches" / "apply"), "--verify", str(site)]]
    verify = REPO / "images" / "common" / "verify.py"
    if verify.exists():
        steps.append([sys.executable, str(verify), "--patches-dir", str(REPO / "patches"), "--site", str(site)])
    results = []
    # VLLM_PLUGINS as the images bake it (ENV in every Dockerfile).
    env = {**os.environ, "PYTHONPATH": str(site), "TQ_VLLM_SITE": str(site),
           "VLLM_PLUGINS": "lora_filesystem_resolver,lora_hf_hub_resolver"}
    with open(state / "preflight.log", "a") as log:
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
            log.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
            results.append({"argv": argv, "rc": done.returncode, "output_tail": (done.stdout + done.stderr)[-1500:]})
    if not verify.exists():
        results.append({"argv": None, "rc": None, "output_tail": "images/common/verify.py not present: skipped"})
    return {"steps": results, "ok": all(r["rc"] in (0, None) for r in results)}


def export(state: Path, out: Path, results_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (state / "results.jsonl").exists():
        shutil.copyfile(state / "results.jsonl", out / results_name)
    if (state / "preflight.log").exists():
        shutil.copyfile(state / "preflight.log", out / "preflight.log")
    for log in sorted((state / "logs").glob("*.log")):
        (out / "logs").mkdir(exist_ok=True)
        with open(log, "rb") as src:
            src.seek(max(0, log.stat().st_size - LOG_COPY_BYTES))
            (out / "logs" / log.name).write_bytes(src.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=Path("/tmp/site-patched"), help="patched vLLM install (kit)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("RESULTS_DIR") or os.environ.get("OUT") or "out"),
                        help="results directory (default: $RESULTS_DIR, else $OUT, else ./out)")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/tq-stacks"))
    parser.add_argument("--stacks", default="", help="comma-separated stack names (default: every CUDA stack)")
    parser.add_argument("--budget-s", type=float, default=540, help="time limit of this run: no stack starts with less than 240 s of it left")
    parser.add_argument("--health-timeout-s", type=float, default=420)
    parser.add_argument("--max-attempts", type=int, default=2, help="tries per stack across reruns")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--keep-multimodal", action="store_true", help="do not add --language-model-only")
    parser.add_argument("--dry-run", action="store_true", help="print the plans, start nothing")
    args = parser.parse_args(argv)
    started = time.monotonic()

    gpus, gpu_label = host_gpus()
    names = [n.strip() for n in args.stacks.split(",") if n.strip()] or cuda_stacks()
    unknown = [n for n in names if n not in tqconfig.list_stacks()]
    if unknown:
        parser.error(f"--stacks: unknown {unknown}; valid: {', '.join(cuda_stacks())}")
    flashinfer = (args.site / "flashinfer").exists() or importlib.util.find_spec("flashinfer") is not None
    if args.dry_run:
        for name in names:
            plan = plan_stack(name, gpus=max(gpus, 1), model_dir=Path("/tmp/tq-models") / name, port=8000,
                              flashinfer=flashinfer, keep_multimodal=args.keep_multimodal,
                              enforce_eager=args.enforce_eager)
            print(json.dumps(asdict(plan), indent=1, default=str))
        return 0
    if gpus == 0:
        print("no NVIDIA GPU found (nvidia-smi): run this on the GPU host", file=sys.stderr)
        return 2
    if not (args.site / "vllm").is_dir():
        print(f"--site {args.site}: no vllm/ there; run tests/gpu/kit/install.sh first (tests/gpu/README.md)", file=sys.stderr)
        return 2

    state = args.state_dir
    (state / "logs").mkdir(parents=True, exist_ok=True)
    results_name = f"stacks-{dt.date.today().isoformat()}-{gpu_label}.jsonl"
    attempts_path = state / "attempts.json"
    attempts: dict[str, int] = json.loads(attempts_path.read_text()) if attempts_path.exists() else {}
    finished = {json.loads(line)["stack"] for line in (state / "results.jsonl").read_text().splitlines()
                if line.strip()} if (state / "results.jsonl").exists() else set()
    try:
        if not (state / "preflight.json").exists():
            check = preflight(args.site, state)
            (state / "preflight.json").write_text(json.dumps(check, indent=1))
            if not check["ok"] and check["steps"][0]["rc"] != 0:
                print("patch series not verified on the site; see preflight.log", file=sys.stderr)
                return 1
        for name in names:
            if name in finished:
                print(f"{name}: done in an earlier run, skipped")
                continue
            left = args.budget_s - (time.monotonic() - started)
            if left < STACK_MIN_S:
                print(f"{name}: {left:.0f} s of --budget-s left (< {STACK_MIN_S}); rerun to continue")
                break
            model_dir = state / "models" / tqconfig.load_stack(name).model.hf_config
            plan = plan_stack(name, gpus=gpus, model_dir=model_dir, port=free_port(), flashinfer=flashinfer,
                              keep_multimodal=args.keep_multimodal, enforce_eager=args.enforce_eager)
            prepare_model.prepare(plan.hf_config, model_dir)
            attempts[name] = attempts.get(name, 0) + 1
            attempts_path.write_text(json.dumps(attempts))
            timeout = min(args.health_timeout_s, left - 60)
            print(f"{name}: TP {plan.run_tp}, KV budget {plan.kv_cache_memory_bytes / 2**30:.2f} GiB/GPU, "
                  f"health timeout {timeout:.0f} s", flush=True)
            log_path = state / "logs" / f"{name}.log"
            outcome = serve_and_check(plan, args.site, log_path, timeout)
            ok = outcome.get("health_status") == 200 and outcome.get("completion_status") == 200
            budget_cut = not ok and timeout < args.health_timeout_s and "within" in str(outcome.get("error", ""))
            if budget_cut and attempts[name] < args.max_attempts:
                print(f"{name}: cut by --budget-s after {outcome.get('startup_s')} s; rerun to retry")
                break
            record = {"stack": name, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "gpu": gpu_label, "ok": ok, "attempt": attempts[name], **asdict(plan), **outcome,
                      "predicted": plan.prediction["run"],
                      "served_vs_predicted": compare(outcome, plan.prediction["run"])}
            if not ok:
                record["log_tail"] = log_path.read_text(errors="replace")[-4000:]
            with open(state / "results.jsonl", "a") as results:
                results.write(json.dumps(record, default=str) + "\n")
            print(f"{name}: health {outcome.get('health_status')}, completion {outcome.get('completion_status')} "
                  f"({outcome.get('streamed_chunks')} chunks), KV {outcome['log_facts']}", flush=True)
    finally:
        export(state, args.out, results_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
