#!/usr/bin/env python3
"""GPU validation matrix: models x KV-cache dtypes x {unpatched, patched} vLLM 0.26.0.

Runs ON THE GPU HOST after tests/gpu/kit/install.sh (stdlib only; each case is a separate
`python3 tests/gpu/case.py` process with PYTHONPATH=/tmp/site-<variant> and a timeout).

    python3 tests/gpu/matrix.py                           # every case, both variants if installed
    python3 tests/gpu/matrix.py --variants unpatched --cases 'gemma-4-31b|qwen3.6' --deadline-s 540
    python3 tests/gpu/matrix.py --list                    # print the case ids in run order

Each finished case appends one JSON line to /tmp/tqresults/<date>-h200.jsonl (crash-safe)
and, when RESULTS_DIR (or OUT) names a results directory, the file is copied there after every
case, with a tarball of the per-case logs. A rerun (same host, or with --resume FILE from an
earlier run) skips cases already recorded. Cases cut short by --deadline-s are not recorded, so
the next run retries them; cases that exceed --timeout-per-case are recorded as failures.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
CASE_SCRIPT = REPO / "tests/gpu/case.py"
sys.path.insert(0, str(CASE_SCRIPT.parent))
from case import RESULT_MARKER, run_marked_process  # noqa: E402  (case.py is stdlib-only at import)
KV_DTYPES = ["auto", "turboquant_4bit_nc", "turboquant_k8v4", "turboquant_k3v4_nc", "turboquant_3bit_nc"]
CONTEXT_LEN = 32768


def load_config(model_dir: pathlib.Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# name -> engine settings. The full-size models run language-model-only (as the baseline
# did: no vision/audio tower memory, no processor/tokenizer needed); Qwen3.5/3.6 needs the
# Triton GDN prefill kernel because FlashInfer is not in the kit.
MODELS = {
    "gemma-4-31b-it": dict(model_dir="configs/hf/gemma-4-31b-it", language_model_only=True, admission="manager"),
    "qwen3.6-27b": dict(model_dir="configs/hf/qwen3.6-27b", language_model_only=True, admission="manager",
                        gdn_prefill_backend="triton"),
    "gemma-4-e4b-it": dict(model_dir="configs/hf/gemma-4-e4b-it", language_model_only=True, admission="manager"),
    "tiny_gemma4": dict(model_dir="tests/fixtures/tiny-configs/tiny_gemma4", language_model_only=True),
    "tiny_qwen3_5": dict(model_dir="tests/fixtures/tiny-configs/tiny_qwen3_5", language_model_only=True,
                         gdn_prefill_backend="triton"),
    "tiny_qwen3": dict(model_dir="tests/fixtures/tiny-configs/tiny_qwen3"),
}
FULL_SIZE = ["gemma-4-31b-it", "qwen3.6-27b", "gemma-4-e4b-it"]
TINY = ["tiny_gemma4", "tiny_qwen3_5", "tiny_qwen3"]


def ordered_cases(variants: list[str]) -> list[dict]:
    """Most informative first, so a run cut short still answers the main questions:
    stock capacity/admission, then the patched headline dtype, the stock failures it fixes,
    what the patches change for bf16, the tiny configs, then the other TurboQuant presets."""
    full_tq_others = [(m, d) for d in KV_DTYPES[2:] for m in FULL_SIZE]
    tiny_main = [(m, d) for m in TINY for d in ("auto", "turboquant_4bit_nc")]
    tiny_others = [(m, d) for d in KV_DTYPES[2:] for m in TINY]
    order: list[tuple[str, str, str]] = []
    order += [("unpatched", m, "auto") for m in FULL_SIZE]
    order += [("patched", m, "turboquant_4bit_nc") for m in FULL_SIZE]
    order += [("unpatched", m, "turboquant_4bit_nc") for m in FULL_SIZE]
    order += [("patched", m, "auto") for m in FULL_SIZE]
    order += [(v, m, d) for m, d in tiny_main for v in ("patched", "unpatched")]
    order += [("patched", m, d) for m, d in full_tq_others]
    order += [("unpatched", m, d) for m, d in full_tq_others]
    order += [(v, m, d) for m, d in tiny_others for v in ("patched", "unpatched")]
    cases = []
    for variant, model, dtype in order:
        if variant not in variants:
            continue
        settings = dict(MODELS[model])
        model_dir = REPO / settings["model_dir"]
        text_config = load_config(model_dir).get("text_config") or load_config(model_dir)
        max_model_len = min(CONTEXT_LEN, text_config.get("max_position_embeddings") or CONTEXT_LEN)
        cases.append(dict(
            id=f"{variant}/{model}/{dtype}", variant=variant, model=model, kv_cache_dtype=dtype,
            max_model_len=max_model_len, **{**settings, "model_dir": str(model_dir)},
        ))
    return cases


HIGHLIGHT = re.compile(
    r"GPU KV cache size|Maximum concurrency|Available KV cache memory|Model loading took|[Bb]ackend|"
    r"TurboQuant|turboquant|TQ |skip|FA4|FlashAttention|flash_attn|block.size|page.size|"
    r"Error|error|Exception|Traceback|WARNING"
)


def parse_log(text: str) -> dict:
    parsed: dict = {}
    if m := re.findall(r"GPU KV cache size: ([\d,]+) tokens", text):
        parsed["kv_cache_tokens"] = int(m[-1].replace(",", ""))
    if m := re.findall(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text):
        parsed["max_concurrency"] = float(m[-1][1])
    if m := re.findall(r"Available KV cache memory: ([\d.]+) GiB", text):
        parsed["available_kv_gib"] = float(m[-1])
    if m := re.findall(r"Model loading took ([\d.]+) GiB", text):
        parsed["weights_gib"] = float(m[-1])
    lines = [line.strip()[:400] for line in text.splitlines() if HIGHLIGHT.search(line)]
    # drop the traceback frames: the error field has the exception lines
    lines = [line for line in lines if not line.startswith(("File ", "^", "TQCASE-RESULT"))]
    parsed["log_highlights"] = lines[:40] + (["..."] + lines[-20:] if len(lines) > 60 else lines[40:60])
    return parsed


def last_exception_lines(text: str) -> str:
    """Fallback error text when the case died without writing its record (segfault, kill)."""
    lines = [line for line in text.splitlines() if line.strip()]
    exception_lines = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    return "\n".join(exception_lines[-3:] or lines[-3:])


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def wait_for_free_gpu(max_used_mib: int = 2048, max_wait_s: float = 60) -> None:
    """The previous case's memory is released asynchronously; vLLM sizes the KV cache from free memory."""
    deadline = time.time() + max_wait_s
    while time.time() < deadline:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out and int(out[0]) <= max_used_mib:
                return
        except (OSError, subprocess.SubprocessError, ValueError):
            return
        time.sleep(2)


def case_env(variant: str) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"/tmp/site-{variant}",
        PYTHONUNBUFFERED="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # in-process engine core: the case reads its scheduler
        VLLM_USE_FLASHINFER_SAMPLER="0",     # FlashInfer is not in the kit
        VLLM_PLUGINS="",                     # P0: no third-party TurboQuant plugin
        VLLM_NO_USAGE_STATS="1",
        TRITON_CACHE_DIR="/tmp/tq-triton-cache",  # shared across cases: JIT once per host
        VLLM_CACHE_ROOT="/tmp/tq-vllm-cache",
    )
    return env


def run_one(case: dict, timeout_s: float, log_path: pathlib.Path, gpu: str, date: str) -> tuple[dict, bool]:
    """Returns (record, cut_by_deadline)."""
    spec = {k: v for k, v in case.items() if k not in ("id", "variant", "model")}
    wait_for_free_gpu()
    t0 = time.time()
    result, text, returncode, timed_out = run_marked_process(
        [sys.executable, str(CASE_SCRIPT), json.dumps(spec)], case_env(case["variant"]), log_path, timeout_s,
        RESULT_MARKER, cwd=REPO)
    elapsed = round(time.time() - t0, 1)
    record = dict(
        date=date, case=case["id"], model=case["model"], model_dir=os.path.relpath(case["model_dir"], REPO),
        kv_cache_dtype=case["kv_cache_dtype"], variant=case["variant"], patched=case["variant"] == "patched",
        max_model_len=case["max_model_len"], gpu=gpu, elapsed_s=elapsed, returncode=returncode,
        timed_out=timed_out, ok=False, kv_cache_tokens=None, max_concurrency=None, admitted_32k=None,
        skipped_layers=None, layer_backends=None, error=None,
    )
    record.update(parse_log(text))
    if result is not None:
        record.update(result)
    elif timed_out:
        record["error"] = f"timeout after {timeout_s:.0f} s; last lines:\n{last_exception_lines(text)}"
    else:
        record["error"] = f"case process exited {returncode} without a result:\n{last_exception_lines(text)}"
    return record, False


def mirror_to_out(results: pathlib.Path, logs: pathlib.Path, date: str) -> None:
    out = os.environ.get("RESULTS_DIR") or os.environ.get("OUT")
    if not out or pathlib.Path(out).resolve() == results.parent.resolve():
        return  # no results directory, or the results already live there (a session lane packs its own)
    shutil.copy(results, pathlib.Path(out) / results.name)
    with tarfile.open(pathlib.Path(out) / f"logs-{date}-h200.tar.xz", "w:xz") as tar:
        tar.add(logs, arcname=f"logs-{date}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=None,
                        help="comma list of unpatched,patched (default: each whose /tmp/site-<variant> exists)")
    parser.add_argument("--cases", default=None, help="regex on case ids (see --list)")
    parser.add_argument("--timeout-per-case", type=float, default=420)
    parser.add_argument("--deadline-s", type=float, default=560,
                        help="start no case that could run past this many seconds from now")
    parser.add_argument("--min-case-s", type=float, default=75,
                        help="do not start a case with less time than this left before the deadline")
    parser.add_argument("--date", default="2026-11-21")
    parser.add_argument("--results-dir", default="/tmp/tqresults")
    parser.add_argument("--resume", nargs="*", default=[], help="earlier result files: their cases are skipped")
    parser.add_argument("--admission-mode", choices=["manager", "engine"], default="manager")
    parser.add_argument("--engine-only-n-plus-1", action="store_true",
                        help="engine mode: run only N+1 (N confirmed by an earlier record); case id gets +engine-n1")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="engine max_num_batched_tokens for every case (case ids get @mnbt<N>); it sets "
                             "vLLM's admission reserve for sliding-window layers, so it moves Gemma 4's 32K concurrency")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()

    valid_variants = ["patched", "unpatched"]
    if args.variants:
        variants = args.variants.split(",")
        bad = [v for v in variants if v not in valid_variants]
        if bad:
            parser.error(f"--variants: unknown {bad}; valid: {valid_variants}")
    else:
        variants = [v for v in valid_variants if pathlib.Path(f"/tmp/site-{v}").is_dir()] or ["unpatched"]
    cases = ordered_cases(variants)
    if args.cases:
        cases = [c for c in cases if re.search(args.cases, c["id"])]
        if not cases:
            parser.error(f"--cases {args.cases!r} matches no case id; see --list")
    for case in cases:
        if case.get("admission"):
            case["admission"] = args.admission_mode
            if args.admission_mode == "engine":  # its own record: the manager-mode record stays
                case["id"] += "+engine-n1" if args.engine_only_n_plus_1 else "+engine"
                case["engine_only_n_plus_1"] = args.engine_only_n_plus_1
        if args.max_num_batched_tokens:
            case["extra_engine_args"] = {**case.get("extra_engine_args", {}),
                                         "max_num_batched_tokens": args.max_num_batched_tokens}
            case["id"] += f"@mnbt{args.max_num_batched_tokens}"
    if args.list:
        print("\n".join(c["id"] for c in cases))
        return 0

    missing = [v for v in variants if not pathlib.Path(f"/tmp/site-{v}").is_dir()]
    if missing:
        parser.error(f"/tmp/site-{missing[0]} is missing: run tests/gpu/kit/install.sh first")

    results_dir = pathlib.Path(args.results_dir)
    logs = results_dir / f"logs-{args.date}"
    logs.mkdir(parents=True, exist_ok=True)
    results = results_dir / f"{args.date}-h200.jsonl"
    done = set()
    for path in [results, *map(pathlib.Path, args.resume)]:
        if path.exists():
            done |= {json.loads(line)["case"] for line in path.read_text().splitlines() if line.strip()}
    gpu = gpu_name()
    start = time.time()
    for case in cases:
        if case["id"] in done:
            print(f"skip (recorded) {case['id']}", flush=True)
            continue
        left = args.deadline_s - (time.time() - start)
        if left < args.min_case_s:
            print(f"deadline: {left:.0f} s left, not starting {case['id']} or later cases", flush=True)
            break
        timeout = min(args.timeout_per_case, left)
        if case.get("admission") == "engine":
            # leave start-up, generation and the manager probe their time, so the record is written
            case["engine_wall_limit_s"] = max(60.0, timeout - 110)
        print(f"run  {case['id']} (timeout {timeout:.0f} s)", flush=True)
        record, _ = run_one(case, timeout, logs / (case["id"].replace("/", "__") + ".log"), gpu, args.date)
        if record["timed_out"] and timeout < args.timeout_per_case:
            print(f"cut  {case['id']} by the deadline after {record['elapsed_s']} s: not recorded", flush=True)
            break
        with open(results, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        mirror_to_out(results, logs, args.date)
        summary = {k: record.get(k) for k in ("ok", "kv_cache_tokens", "max_concurrency", "admitted_32k",
                                               "skipped_layers", "elapsed_s")}
        print(f"done {case['id']} {json.dumps(summary)}", flush=True)
        if not record["ok"]:
            print("     error: " + (record.get("error") or "").replace("\n", "\n            ")[:1500], flush=True)
    if results.exists():
        mirror_to_out(results, logs, args.date)
    return 0


if __name__ == "__main__":
    sys.exit(main())
