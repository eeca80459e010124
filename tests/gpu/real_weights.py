"""Real-weight TurboQuant checks on the GPU host (issue 2): SmolLM2-135M and Gemma 3 270M, bf16 KV
(`auto`) vs the four TurboQuant KV dtypes, on real weights and a fixed text.

    python3 tests/gpu/real_weights.py --out DIR --deadline-s 360 [--parallel 2] [--models ...]
        [--dtypes ...] [--resume] [--dry-run]

Needs tests/gpu/kit/install.sh (-> /tmp/site-patched) and tests/gpu/kit/models.sh install
(-> /tmp/tqmodels/hf/{smollm2-135m,gemma3-270m}). Per case (model x kv dtype), in its own process
with the patched site: one engine (bf16, eager, token-id prompts, chunked prefill of
--chunk-tokens), then
  (a) greedy generation, 8 prompts x 128 tokens (temperature 0, ignore_eos) -> token agreement
      vs `auto` (fraction of identical tokens, first divergence per prompt);
  (b) perplexity of the fixed text (3072 tokens) from prompt_logprobs;
  (c) the final kv_cache_dtype_skip_layers, backend/KV dtype per layer, versions, patch marker.
What the PPL exercises (vLLM 0.26.0 TurboQuant backend, `_prefill_attention`): the first chunk
attends to its own raw K/V (flash-attn, no quantization); every later chunk of more than 128
tokens attends to the earlier tokens *dequantized from the TurboQuant cache* plus its own chunk
raw (`_continuation_prefill`); chunks of <= 128 tokens go through the TurboQuant decode kernel
(cache only). With 256-token chunks, 11 of 12 chunks read compressed KV for everything before
them. Layers in skipped_layers (boundary layers, and all of Gemma 3's sliding layers) stay bf16.
Two PPL paths per dtype (--paths): `prefill` (chunks of --chunk-tokens > 128: the dequantized
continuation prefill) and `decode` (chunks of --decode-chunk-tokens <= 128: every later chunk runs the
TurboQuant decode kernel, reading even its own chunk's K/V from the cache, as generation does; no
generation in these cases). Decode-path rows are labelled <dtype>#decode and compared with auto#decode.

Writes DIR/real_weights.jsonl (one record per case, as it finishes), DIR/summary.json (rewritten
after every case), DIR/logs/<case>.log and DIR/plan.json. Exit 0 unless the lane itself breaks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import queue
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from case import run_marked_process  # noqa: E402  (case.py is stdlib-only at import)
TOKEN_IDS = HERE / "real_weights" / "token_ids.json"
RESULT_MARKER = "TQRW-RESULT "
MODELS = {
    # name: facts used in the plan and checked against the engine's config
    "smollm2-135m": {"arch": "LlamaForCausalLM", "layers": 30, "head_dim": 64},
    "gemma3-270m": {"arch": "Gemma3ForCausalLM", "layers": 18, "head_dim": 256, "sliding_window": 512},
}
DTYPES = ["auto", "turboquant_4bit_nc", "turboquant_k8v4", "turboquant_k3v4_nc", "turboquant_3bit_nc"]
MAX_MODEL_LEN = 4096
GEN_TOKENS = 128
DECODE_PATH = "#decode"  # label suffix of the decode-path PPL cases
PATHS = ["prefill", "decode"]


# ----------------------------------------------------------------------------- maths (CPU-tested)

def perplexity(token_logprobs: list[float]) -> float:
    """exp(mean negative log-likelihood) over the scored tokens."""
    if not token_logprobs:
        raise ValueError("perplexity: no token logprobs")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


def ppl_delta_pct(ppl: float, ppl_ref: float) -> float:
    return (ppl / ppl_ref - 1.0) * 100.0


def first_divergence(tokens: list[int], ref: list[int]) -> int | None:
    """Index of the first differing token, None when identical (length differences count at the end)."""
    for i, (a, b) in enumerate(zip(tokens, ref)):
        if a != b:
            return i
    return None if len(tokens) == len(ref) else min(len(tokens), len(ref))


def agreement(outputs: list[list[int]], ref_outputs: list[list[int]]) -> dict:
    """Position-wise identical-token fraction and the greedy prefix that matches, vs the reference."""
    if len(outputs) != len(ref_outputs):
        raise ValueError(f"agreement: {len(outputs)} outputs vs {len(ref_outputs)} reference outputs")
    same = total = prefix = 0
    divergences = []
    for tokens, ref in zip(outputs, ref_outputs):
        n = max(len(tokens), len(ref))
        same += sum(a == b for a, b in zip(tokens, ref))
        total += n
        div = first_divergence(tokens, ref)
        divergences.append(div)
        prefix += n if div is None else div
    return {
        "token_agreement": round(same / total, 4) if total else None,
        # tokens before the first divergence: after it the two continuations are different texts
        "prefix_agreement": round(prefix / total, 4) if total else None,
        "identical_prompts": sum(d is None for d in divergences),
        "first_divergence": divergences,
    }


def summarize(records: list[dict]) -> dict:
    """Per model: the auto baseline, then per TurboQuant dtype the PPL delta % and token agreement."""
    latest: dict[tuple, dict] = {}
    for record in records:  # a resumed or re-run case: the last record wins
        latest[(record["model"], record.get("label") or record["kv_cache_dtype"])] = record
    summary: dict = {}
    for model in sorted({m for m, _ in latest}):
        base = latest.get((model, "auto"))
        base_ok = bool(base and base.get("ok"))
        entry = {"auto": {"ok": base_ok, "ppl": base.get("ppl") if base else None,
                          "error": base.get("error") if base else "not run"}}
        decode_base = latest.get((model, "auto" + DECODE_PATH))
        if decode_base is not None:
            entry["auto"]["decode_ppl"] = decode_base.get("ppl")
        for (m, dtype), record in sorted(latest.items()):
            if m != model or dtype.startswith("auto") or dtype.endswith(DECODE_PATH):
                continue
            row = {"ok": bool(record.get("ok")), "ppl": record.get("ppl"),
                   "skipped_layers": record.get("skipped_layers"),
                   "turboquant_layers": record.get("turboquant_layers")}
            if not record.get("ok"):
                row["error"] = record.get("error")
            if base_ok and record.get("ppl") is not None:
                row["ppl_delta_pct"] = round(ppl_delta_pct(record["ppl"], base["ppl"]), 3)
            if base_ok and record.get("outputs") and base.get("outputs"):
                row.update(agreement(record["outputs"], base["outputs"]))
            decode = latest.get((model, dtype + DECODE_PATH))
            if decode is not None:
                row["decode_ppl"] = decode.get("ppl")
                if not decode.get("ok"):
                    row["decode_error"] = decode.get("error")
                elif decode_base and decode_base.get("ok") and decode.get("ppl") is not None:
                    row["decode_ppl_delta_pct"] = round(ppl_delta_pct(decode["ppl"], decode_base["ppl"]), 3)
            entry[dtype] = row
        summary[model] = entry
    return summary


# ----------------------------------------------------------------------------- one case (subprocess)

def run_case(spec: dict, record: dict) -> None:
    """Fills `record` as it goes, so a failure keeps what was learned before it."""
    sys.path.insert(0, str(HERE))  # case.py helpers
    from case import describe_kv_cache, engine_layer_facts

    t0 = time.time()
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    record.update(vllm=vllm.__version__, transformers=transformers.__version__, torch=torch.__version__,
                  gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    marker = os.path.join(os.path.dirname(vllm.__file__), "_tqstack_patches.json")
    record["patch_marker"] = json.load(open(marker)) if os.path.exists(marker) else None
    if spec["kv_cache_dtype"].startswith("turboquant_"):
        # 0.26.0 accepts any positive head size; recorded so a refusal would be visible here too
        try:
            from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend
            record["turboquant_supports_head_size"] = bool(
                TurboQuantAttentionBackend.supports_head_size(spec["head_dim"]))
        except Exception as error:  # informative only: the engine start below is the real test
            record["turboquant_supports_head_size"] = f"not checked: {error!r}"

    engine_kwargs = engine_args(spec)
    record["engine_args"] = {k: v for k, v in engine_kwargs.items() if k != "model"}
    with startup_lock(spec.get("lock_file")):  # one engine profiles GPU memory at a time
        llm = LLM(**engine_kwargs)
    record["startup_s"] = round(time.time() - t0, 1)
    vllm_config = llm.llm_engine.vllm_config
    core = llm.llm_engine.engine_core.engine_core
    record.update(engine_layer_facts(llm))
    record["turboquant_layers"] = sorted(
        i for key, idx in record["layer_backends"].items() if "/turboquant" in key for i in idx)
    try:
        record.update(describe_kv_cache(core.scheduler, vllm_config))
    except Exception as error:  # informative only
        record["kv_cache_error"] = repr(error)
    hf = vllm_config.model_config.hf_text_config
    record["model_config"] = {"architectures": vllm_config.model_config.architectures,
                              "num_hidden_layers": hf.num_hidden_layers,
                              "head_dim": getattr(hf, "head_dim", None),
                              "sliding_window": getattr(hf, "sliding_window", None),
                              "layer_types": getattr(hf, "layer_types", None)}

    # (a) greedy generation (prefill-path cases only)
    t1 = time.time()
    if spec["gen_tokens"] > 0:
        prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
        greedy = SamplingParams(max_tokens=spec["gen_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
        outputs = llm.generate(prompts, greedy, use_tqdm=False)
        record["outputs"] = [list(o.outputs[0].token_ids) for o in outputs]
    record["generate_s"] = round(time.time() - t1, 1)

    # (b) perplexity: logprob of each actual next token of the fixed text (the first has none)
    t2 = time.time()
    ids = spec["ppl_ids"]
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    result = llm.generate([{"prompt_token_ids": ids}], scoring, use_tqdm=False)[0]
    logprobs = []
    for position, entry in enumerate(result.prompt_logprobs or []):
        if position == 0 or entry is None:
            continue
        logprobs.append(float(entry[ids[position]].logprob))
    if len(logprobs) != len(ids) - 1:
        raise AssertionError(f"prompt_logprobs covered {len(logprobs)} of {len(ids) - 1} tokens")
    record["ppl"] = perplexity(logprobs)
    record["ppl_tokens"] = len(logprobs)
    # NLL per 256-token window: shows where (early/late in the text) a dtype loses
    window = 256
    record["nll_by_window"] = [round(-sum(logprobs[i:i + window]) / len(logprobs[i:i + window]), 4)
                               for i in range(0, len(logprobs), window)]
    record["ppl_s"] = round(time.time() - t2, 1)
    record["ok"] = True


class startup_lock:
    """Exclusive flock on a shared file (no-op without one): with --parallel, vLLM's memory profiling
    asserts when another process frees GPU memory meanwhile, so starts and exits take turns."""

    def __init__(self, path: str | None):
        self.path, self.handle = path, None

    def __enter__(self):
        if self.path:
            import fcntl
            self.handle = open(self.path, "a")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.handle:
            self.handle.close()
        return False


def case_main(spec_json: str) -> None:
    sys.path.insert(0, str(HERE))
    from case import exception_chain

    import traceback
    spec = json.loads(spec_json)
    record: dict = {"ok": False}
    try:
        run_case(spec, record)
    except BaseException as error:  # noqa: BLE001 - the record must say what failed, whatever it was
        traceback.print_exc()
        record["ok"] = False
        record["error"] = exception_chain(error)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(record, default=str), flush=True)
    # Exit while holding the start lock so no other engine is profiling while this one's memory goes.
    lock = startup_lock(spec.get("lock_file"))
    lock.__enter__()
    os._exit(0)


# ----------------------------------------------------------------------------- the lane

def load_token_ids(path: pathlib.Path) -> dict:
    data = json.loads(path.read_text())
    for name in MODELS:
        entry = data.get("models", {}).get(name)
        if not entry or len(entry.get("ppl_ids", [])) < 2049 or not entry.get("prompts"):
            raise SystemExit(f"{path}: models.{name} lacks ppl_ids (>= 2049) or prompts")
    return data


def build_plan(args, token_ids: dict) -> list[dict]:
    cases = []
    # auto first for every model (the reference), then the TurboQuant dtypes in priority order;
    # models interleaved so --parallel 2 runs one of each at a time
    for dtype in args.dtypes:
        for path in args.paths:
            for model in args.models:
                entry = token_ids["models"][model]
                # a non-default boundary is its own row in the summary, compared with the same auto
                label = dtype if args.boundary_layers is None or dtype == "auto" else f"{dtype}@b{args.boundary_layers}"
                decode = path == "decode"
                label += DECODE_PATH if decode else ""
                cases.append({
                    "id": f"{model}/{label}", "model": model, "kv_cache_dtype": dtype, "label": label,
                    "boundary_layers": args.boundary_layers, "ppl_path": path,
                    "model_dir": str(args.models_root / model), "head_dim": MODELS[model]["head_dim"],
                    "max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": args.gpu_memory_utilization,
                    "chunk_tokens": args.decode_chunk_tokens if decode else args.chunk_tokens,
                    "gen_tokens": 0 if decode else args.gen_tokens,
                    "prompts": entry["prompts"][:args.num_prompts], "ppl_ids": entry["ppl_ids"],
                    "lock_file": str((args.out or pathlib.Path("OUT")) / ".startup.lock") if args.parallel > 1 else None,
                })
    return cases


def engine_args(spec: dict) -> dict:
    """LLM(...) arguments of a case; the boundary setting is the engine option of patch 0011."""
    kwargs = dict(
        model=spec["model_dir"], dtype="bfloat16", enforce_eager=True, max_model_len=spec["max_model_len"],
        gpu_memory_utilization=spec["gpu_memory_utilization"], kv_cache_dtype=spec["kv_cache_dtype"],
        skip_tokenizer_init=True, max_num_seqs=16, seed=0,
        enable_chunked_prefill=True, max_num_batched_tokens=spec["chunk_tokens"],
        enable_prefix_caching=False,  # every token's K/V must come from this request's own prefill
    )
    if spec.get("boundary_layers") is not None and spec["kv_cache_dtype"].startswith("turboquant_"):
        kwargs["turboquant_boundary_layers"] = spec["boundary_layers"]
    return kwargs


def case_env(site: str) -> dict:
    env = dict(os.environ)
    env.pop("TQ_BOUNDARY_LAYERS", None)  # the deprecated fallback must not change what a record says ran
    env.update(
        PYTHONPATH=site, PYTHONUNBUFFERED="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # in-process engine core: the case reads its scheduler
        VLLM_USE_FLASHINFER_SAMPLER="0",     # FlashInfer is not in the kit
        VLLM_PLUGINS="", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TRITON_CACHE_DIR="/tmp/tq-triton-cache", VLLM_CACHE_ROOT="/tmp/tq-vllm-cache",
    )
    return env


def case_record_base(case: dict) -> dict:
    return {"case": case["id"], "model": case["model"], "kv_cache_dtype": case["kv_cache_dtype"],
            "label": case.get("label", case["kv_cache_dtype"]), "boundary_layers": case.get("boundary_layers"), "ok": False,
            "error": None, "ppl": None, "outputs": None, "skipped_layers": None, "layer_backends": None}


def run_one(case: dict, timeout_s: float, log_path: pathlib.Path, site: str, script: pathlib.Path | None = None) -> dict:
    """One case in its own process group (`script --case SPEC`, this file unless a test swaps it)."""
    spec = {k: v for k, v in case.items() if k not in ("id", "model", "label")}
    record = case_record_base(case)
    t0 = time.time()
    argv = [sys.executable, str(script or pathlib.Path(__file__).resolve()), "--case", json.dumps(spec)]
    result, text, returncode, timed_out = run_marked_process(
        argv, case_env(site), log_path, timeout_s, RESULT_MARKER, cwd=REPO)
    if result is not None:
        record.update(result)
    else:
        tail = "\n".join(line for line in text.splitlines() if line.strip())[-1500:].splitlines()[-6:]
        why = f"timeout after {timeout_s:.0f} s" if timed_out else f"case process exited {returncode}"
        record["error"] = f"{why} without a result; last log lines:\n" + "\n".join(tail)
    record.update(elapsed_s=round(time.time() - t0, 1), returncode=returncode, timed_out=timed_out,
                  log=str(log_path.name))
    return record


def read_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return records


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, help="results and logs directory (required unless --dry-run)")
    parser.add_argument("--deadline-s", type=float, default=360, help="wall seconds from start; no case starts that cannot finish")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--parallel", type=int, default=2, help="cases at once on the one GPU (engine starts take turns)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.30)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="max_num_batched_tokens (prefill chunk)")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS,
                        help="PPL paths: prefill (chunks > 128 tokens) and/or decode (chunks <= 128: decode kernel)")
    parser.add_argument("--decode-chunk-tokens", type=int, default=16,
                        help="max_num_batched_tokens of the decode-path cases (<= 128; 16: each query sees at least "
                             "112 of its 128 newest tokens in the recent window, close to generation's 128)")
    parser.add_argument("--gen-tokens", type=int, default=GEN_TOKENS)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--timeout-per-case", type=float, default=300)
    parser.add_argument("--min-case-s", type=float, default=60, help="do not start a case with less time left")
    parser.add_argument("--boundary-layers", type=int, help="--turboquant-boundary-layers for the cases (default: unset = the"
                        " patched default 2); TurboQuant rows get the label <dtype>@b<N>")
    parser.add_argument("--site", default="/tmp/site-patched", help="PYTHONPATH of the case processes")
    parser.add_argument("--models-root", type=pathlib.Path, default=pathlib.Path("/tmp/tqmodels/hf"))
    parser.add_argument("--token-ids", type=pathlib.Path, default=TOKEN_IDS)
    parser.add_argument("--resume", action="store_true", help="skip cases already ok in --out/real_weights.jsonl")
    parser.add_argument("--dry-run", "--list", dest="dry_run", action="store_true", help="print the plan; no GPU")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case spec (JSON)
    args = parser.parse_args(argv)
    if args.case is None and not args.dry_run and args.out is None:
        parser.error("--out is required (unless --dry-run)")
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    if not 0.05 <= args.gpu_memory_utilization <= 0.95:
        parser.error("--gpu-memory-utilization must be within [0.05, 0.95]")
    if args.boundary_layers is not None and args.boundary_layers < 0:
        parser.error("--boundary-layers must be >= 0")
    if args.chunk_tokens < 16:
        parser.error("--chunk-tokens must be >= 16")
    if not 16 <= args.decode_chunk_tokens <= 128:
        parser.error("--decode-chunk-tokens must be within [16, 128] (above 128 the backend dequantizes instead)")
    if "auto" not in args.dtypes:
        print("note: 'auto' not in --dtypes: agreement/PPL delta only against an earlier auto record (--resume)")
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    args = parse_args(argv)
    if args.case is not None:
        case_main(args.case)
        return 0
    token_ids = load_token_ids(args.token_ids)
    plan = build_plan(args, token_ids)
    if args.dry_run:
        print(f"real_weights plan: {len(plan)} cases, parallel {args.parallel}, deadline {args.deadline_s:.0f} s, "
              f"site {args.site}, models under {args.models_root}")
        for case in plan:
            exists = pathlib.Path(case["model_dir"]).is_dir()
            print(f"  {case['id']:40s} prompts {len(case['prompts'])}x{case['gen_tokens']} tok, ppl {len(case['ppl_ids'])} tok, "
                  f"chunk {case['chunk_tokens']}, gpu_mem {case['gpu_memory_utilization']}"
                  + ("" if exists else "  [model dir missing here]"))
        return 0

    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results_path, summary_path = out / "real_weights.jsonl", out / "summary.json"
    (out / "plan.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "cases": [c["id"] for c in plan]}, indent=1))
    records = read_records(results_path)
    done = {r["case"] for r in records if r.get("ok")} if args.resume else set()
    if not args.resume and records:
        results_path.rename(out / f"real_weights.{int(start)}.previous.jsonl")
        records = []
    todo: queue.Queue = queue.Queue()
    for case in plan:
        if case["id"] in done:
            print(f"[resume] {case['id']} already ok", flush=True)
        else:
            todo.put(case)
    lock = threading.Lock()

    def record_and_summarize(record: dict) -> None:
        with lock:
            records.append(record)
            with open(results_path, "a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
            summary = {"summary": summarize(records), "deadline_s": args.deadline_s,
                       "elapsed_s": round(time.time() - start, 1), "cases_recorded": len(records)}
            summary_path.write_text(json.dumps(summary, indent=1, default=str))

    def worker() -> None:
        while True:
            try:
                case = todo.get_nowait()
            except queue.Empty:
                return
            left = args.deadline_s - (time.time() - start)
            if left < args.min_case_s:
                record = case_record_base(case)
                record.update(skipped=True, error=f"not started: {left:.0f} s left before the deadline "
                                                  f"(< --min-case-s {args.min_case_s:.0f})")
                print(f"[skip] {case['id']}: {record['error']}", flush=True)
                record_and_summarize(record)
                continue
            timeout = min(args.timeout_per_case, left - 5)
            print(f"[start] {case['id']} (timeout {timeout:.0f} s, {left:.0f} s left)", flush=True)
            try:
                record = run_one(case, timeout, out / "logs" / (case["id"].replace("/", "__") + ".log"), args.site)
            except Exception as error:  # the lane must go on with the next case
                record = case_record_base(case)
                record["error"] = f"lane error: {error!r}"
            error_lines = (record.get("error") or "").splitlines()
            status = "ok" if record.get("ok") else "FAIL " + (error_lines[-1][:200] if error_lines else "")
            ppl = f" ppl {record['ppl']:.3f}" if record.get("ppl") else ""
            print(f"[done] {case['id']} {status}{ppl} in {record.get('elapsed_s')} s", flush=True)
            record_and_summarize(record)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(args.parallel, todo.qsize() or 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = summarize(records)
    summary_path.write_text(json.dumps({"summary": summary, "deadline_s": args.deadline_s,
                                        "elapsed_s": round(time.time() - start, 1), "cases_recorded": len(records)},
                                       indent=1, default=str))
    for model, entry in summary.items():
        for dtype, row in entry.items():
            print(f"{model:14s} {dtype:20s} ok={row.get('ok')} ppl={row.get('ppl')} "
                  f"dppl%={row.get('ppl_delta_pct')} agree={row.get('token_agreement')} "
                  f"prefix={row.get('prefix_agreement')}", flush=True)
    print(f"real_weights: {len(records)} records in {results_path} ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
