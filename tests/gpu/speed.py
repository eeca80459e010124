#!/usr/bin/env python3
"""Serving speed of TurboQuant against bf16 on the GPU host: `vllm bench serve` against real servers.

For each model x KV dtype x kernel, one `vllm serve` (full-size config from configs/hf/, dummy bf16
weights, CUDA graphs on for decode, no torch.compile so a start takes about a minute), a warm-up
request, then `vllm bench serve` for each workload (random dataset, 256 output tokens, --ignore-eos,
num_prompts = concurrency, all sent at once). `kernel` is `tqstack` (the full patch series) or
`upstream` (the series without tqstack's TurboQuant kernels, i.e. vLLM 0.26.0's own store/decode).

    python3 tests/gpu/speed.py --out DIR [--models ...] [--dtypes ...] [--kernels ...]
        [--workloads 1024:1 32768:1 32768:8] [--deadline-s 540]

Records (DIR/speed.jsonl, one per run, written as each finishes): model, kv_cache_dtype, kernel,
input_len, output_len, concurrency, num_prompts, cuda_graphs, ttft_p50_ms, tpot_p50_ms, itl_p50_ms,
decode_tpot_p50_ms, output_tok_s, jit_during_run, gpu. decode_tpot_p50_ms is the median inter-token
latency over tokens that arrived after every request's first token (all prompts start together, so
after that instant no prefill chunk shares a step with decode). jit_during_run is true when the server
logged a Triton JIT compilation "during inference" (vLLM's JIT monitor) between the warm-up and the end
of the run. Server logs go to DIR/logs/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE / "stacks"))
from hostproc import free_port, stop, wait_gpu_free  # noqa: E402
import prepare_model  # noqa: E402

MODELS = {
    # name: (configs/hf folder, extra serve flags)
    "gemma-4-31b": ("gemma-4-31b-it", ["--language-model-only"]),
    "qwen3.6-27b": ("qwen3.6-27b", ["--language-model-only", "--gdn-prefill-backend", "triton"]),
}
DTYPES = ["auto", "turboquant_4bit_nc", "turboquant_k8v4"]
KERNELS = ["tqstack", "upstream"]
TQSTACK_KERNEL_PATCH = "0012-tqstack-turboquant-kernels.patch"
OUTPUT_LEN = 256
JIT_MARK = "during inference:"


def decode_tpot_ms(ttfts: list[float], itls: list[list[float]]) -> float | None:
    """Median ITL (ms) of tokens that arrived after the last first token of the run (s inputs)."""
    if not ttfts:
        return None
    prefill_end = max(ttfts)
    decode = []
    for ttft, gaps in zip(ttfts, itls):
        t = ttft
        for gap in gaps:
            t += gap
            if t > prefill_end:
                decode.append(gap)
    return statistics.median(decode) * 1e3 if decode else None


def parse_workload(text: str) -> tuple[int, int]:
    try:
        length, conc = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload {text!r}: expected INPUT_LEN:CONCURRENCY, e.g. 32768:8")
    if length < 16 or conc < 1:
        raise argparse.ArgumentTypeError(f"workload {text!r}: INPUT_LEN >= 16 and CONCURRENCY >= 1")
    return length, conc


def upstream_series(names: list[str]) -> list[str]:
    """The series up to, not including, tqstack's TurboQuant kernels (later patches build on them)."""
    if TQSTACK_KERNEL_PATCH not in names:
        raise ValueError(f"{TQSTACK_KERNEL_PATCH} is not in the series: nothing to compare against")
    return names[: names.index(TQSTACK_KERNEL_PATCH)]


def upstream_site(unpatched: Path, dest: Path) -> Path:
    """vLLM 0.26.0 with the tqstack patches before the TurboQuant kernels."""
    if (dest / "vllm").is_dir():
        return dest
    series = Path(tempfile.mkdtemp(prefix="tq-series-"))
    src = REPO / "patches" / "vllm-0.26.0"
    keep = upstream_series([n for n in (src / "series").read_text().split() if n.endswith(".patch")])
    for name in keep:
        shutil.copy(src / name, series / name)
    (series / "series").write_text("\n".join(keep) + "\n")
    shutil.copytree(unpatched, dest, symlinks=True)
    subprocess.run([sys.executable, str(REPO / "patches" / "apply"), "-q", "--series", str(series), str(dest)], check=True)
    return dest


BOUNDARY_LINE = re.compile(r"--turboquant-boundary-layers (\d+)\): keeping layers \[([\d, ]*)\]")


def boundary_from_log(text: str) -> dict:
    """The boundary protection the server reported at start-up (patch 0011's config line)."""
    found = BOUNDARY_LINE.search(text)
    if not found:
        return {}
    return {"turboquant_boundary_layers": int(found.group(1)),
            "turboquant_bf16_layers": [int(x) for x in found.group(2).replace(" ", "").split(",") if x]}


def serve_argv(model_dir: Path, extra: list[str], dtype: str, port: int, max_len: int,
               boundary_layers: int | None = None) -> list[str]:
    boundary = (["--turboquant-boundary-layers", str(boundary_layers)]
                if boundary_layers is not None and dtype.startswith("turboquant_") else [])
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
            "--load-format", "dummy", "--dtype", "bfloat16", "--kv-cache-dtype", dtype,
            "--max-model-len", str(max_len), "--max-num-batched-tokens", "2048", "--max-num-seqs", "16",
            "--gpu-memory-utilization", "0.90", "--no-enable-prefix-caching",
            "--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}),
            "--host", "127.0.0.1", "--port", str(port), *boundary, *extra]


def wait_health(port: int, proc: subprocess.Popen, timeout_s: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def bench(port: int, model_dir: Path, length: int, conc: int, out: Path, output_len: int, env: dict) -> dict:
    """`vllm bench serve` from the same site as the server (env carries its PYTHONPATH)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
            "--base-url", f"http://127.0.0.1:{port}", "--model", str(model_dir), "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(length), "--random-output-len", str(output_len),
            "--ignore-eos", "--num-prompts", str(conc), "--max-concurrency", str(conc), "--request-rate", "inf",
            "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name,
            "--seed", "0"]
    client_log = out.with_suffix(".client.log")
    with client_log.open("w") as log:  # kept: a failing client must say why
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=600, env=env)
    if done.returncode != 0:
        tail = client_log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"vllm bench serve exited {done.returncode}: " + " | ".join(tail))
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=DTYPES)
    ap.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    ap.add_argument("--workloads", nargs="+", type=parse_workload, default=[(1024, 1), (32768, 1), (32768, 8)])
    ap.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    ap.add_argument("--deadline-s", type=float, default=540)
    ap.add_argument("--boundary-layers", type=int, default=None,
                    help="--turboquant-boundary-layers for TurboQuant servers (default: the engine's, 2)")
    ap.add_argument("--min-case-s", type=float, default=120, help="do not start a server with less time left")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site-patched"))
    ap.add_argument("--unpatched-site", type=Path, default=Path("/tmp/site-unpatched"))
    ap.add_argument("--models-root", type=Path, default=Path("/tmp/tq-models"))
    args = ap.parse_args(argv)
    for dtype in args.dtypes:
        if dtype != "auto" and not dtype.startswith("turboquant_"):
            ap.error(f"--dtypes: {dtype!r} is not auto or a turboquant_* preset")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    results = args.out / "speed.jsonl"
    max_len = max(length for length, _ in args.workloads) + args.output_len + 64
    import torch

    gpu = torch.cuda.get_device_name(0)
    plan = []
    for model in args.models:
        for dtype in args.dtypes:
            for kernel in (["tqstack"] if dtype == "auto" else args.kernels):
                plan.append((model, dtype, kernel))
    for model, dtype, kernel in plan:
        left = args.deadline_s - (time.time() - start)
        case = f"{model}/{dtype}/{kernel}"
        if left < args.min_case_s:
            print(f"[skip] {case}: {left:.0f} s left", flush=True)
            continue
        hf_name, extra = MODELS[model]
        model_dir = args.models_root / model
        if not (model_dir / "config.json").exists():
            prepare_model.prepare(hf_name, model_dir)
        site = args.site if kernel == "tqstack" else upstream_site(args.unpatched_site, Path("/tmp/site-upstream-kernels"))
        env = {**os.environ, "PYTHONPATH": str(site), "VLLM_PLUGINS": "", "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONUNBUFFERED": "1"}
        port = free_port()
        log_path = args.out / "logs" / (case.replace("/", "__") + ".log")
        log = open(log_path, "w")
        t0 = time.time()
        proc = subprocess.Popen(serve_argv(model_dir, extra, dtype, port, max_len, args.boundary_layers), env=env,
                                stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = {"model": model, "kv_cache_dtype": dtype, "kernel": kernel, "output_len": args.output_len,
                "cuda_graphs": "FULL_DECODE_ONLY", "max_num_batched_tokens": 2048, "gpu": gpu}
        try:
            if not wait_health(port, proc, min(400, left - 30)):
                rec = {**base, "ok": False, "error": "server did not become healthy", "log": log_path.name}
                with results.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[fail] {case}: not healthy after {time.time() - t0:.0f} s", flush=True)
                continue
            startup_s = time.time() - t0
            log.flush()
            base.update(boundary_from_log(log_path.read_text(errors="replace")))
            try:
                bench(port, model_dir, 512, 1, args.out / "raw" / f"{case.replace('/', '__')}__warmup.json", 16, env)
            except (subprocess.SubprocessError, OSError, RuntimeError, ValueError) as error:
                rec = {**base, "ok": False, "error": f"warm-up request failed: {error}"[:600], "log": log_path.name}
                with results.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[fail] {case}: {rec['error']}", flush=True)
                continue
            for length, conc in args.workloads:
                if args.deadline_s - (time.time() - start) < 45:
                    print(f"[skip] {case} {length}:{conc}: deadline", flush=True)
                    continue
                log.flush()
                jit_before = log_path.read_text(errors="replace").count(JIT_MARK)
                raw = args.out / "raw" / f"{case.replace('/', '__')}__{length}x{conc}.json"
                try:
                    r = bench(port, model_dir, length, conc, raw, args.output_len, env)
                except (subprocess.SubprocessError, OSError, RuntimeError, ValueError) as error:
                    rec = {**base, "ok": False, "input_len": length, "concurrency": conc, "error": repr(error)[:400]}
                else:
                    log.flush()
                    jit_after = log_path.read_text(errors="replace").count(JIT_MARK)
                    rec = {**base, "ok": True, "input_len": length, "concurrency": conc,
                           "num_prompts": r.get("num_prompts", conc), "ttft_p50_ms": r["median_ttft_ms"],
                           "tpot_p50_ms": r["median_tpot_ms"], "itl_p50_ms": r["median_itl_ms"],
                           "decode_tpot_p50_ms": decode_tpot_ms(r.get("ttfts", []), r.get("itls", [])),
                           "output_tok_s": r["output_throughput"], "jit_during_run": jit_after > jit_before,
                           "startup_s": round(startup_s, 1)}
                with results.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[run] {case} {length}:{conc} " + (
                    f"ttft {rec['ttft_p50_ms']:.0f} ms tpot {rec['tpot_p50_ms']:.2f} decode {rec['decode_tpot_p50_ms']:.2f} "
                    f"jit {rec['jit_during_run']}" if rec["ok"] else rec["error"]), flush=True)
        finally:
            stop(proc)
            log.close()
            wait_gpu_free()
    print(f"speed: {results} ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
