#!/usr/bin/env python3
"""Issue 2: image-token ranges still reach Gemma 4 sliding layers as bidirectional after gate 1.

PROOF RUN: end-to-end image request (not the metadata-level fallback). The tiny Gemma 4 config
(vision tower included, dummy weights) gets an offline processor (tests/gpu/mm_prefix/fixture.py);
one request "text <|image|> text" plus a text-only request go through the real engine. In-process
hooks (VLLM_ENABLE_V1_MULTIPROCESSING=0) on TritonAttentionImpl.forward / TurboQuantAttentionImpl.forward
record per language-model layer: index, layer type, backend impl, kv dtype, the mm_prefix_range
tensor the kernel got vs the image positions; and for every sliding TRITON_ATTN layer the hook
re-runs the same kernel on the same q/k/v/cache with the ranges removed and records which positions
change: they must be exactly the image positions followed by another image token (bidirectional),
with the text positions and the last image token bit-identical.

    python3 tests/gpu/mm_prefix_probe.py --out DIR --deadline-s 240 [--with-31b] [--list]

Cases (priority order): patched tiny turboquant_4bit_nc, stock tiny turboquant_4bit_nc (expected
to fail at start), patched tiny auto, stock tiny auto; --with-31b adds patched 31B
turboquant_4bit_nc (gpu_memory_utilization 0.9: needs a GPU of its own).
Each case runs in its own subprocess with PYTHONPATH=/tmp/site-<variant>; results in
DIR/mm_prefix.jsonl (one record per case, appended as it ends), DIR/mm_prefix_summary.json, DIR/logs/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from case import exception_chain, run_marked_process  # noqa: E402  (case.py is stdlib-only at import)
TINY_CONFIG = REPO / "tests" / "fixtures" / "tiny-configs" / "tiny_gemma4" / "config.json"
GEMMA4_31B_CONFIG = REPO / "configs" / "hf" / "gemma-4-31b-it" / "config.json"
RESULT_MARKER = "MMPREFIX-RESULT "
PROOF = "end-to-end image request (real engine, real processor, real Triton kernel re-run without ranges)"
# bf16 kernel outputs; "identical" rows must be bit-identical anyway, this only guards the "differ" side.
DIFF_TOLERANCE = 0.0

# The tiny config's only full layer (5) is a boundary layer: with the default protection (2) no layer
# would run TurboQuant. 0 (patch 0007's knob) puts layer 5 on TURBOQUANT, the layer gate 1 is about.
TQ_NO_BOUNDARY = {"TQ_BOUNDARY_LAYERS": "0"}
CASES = [
    {"name": "patched/tiny_gemma4/turboquant_4bit_nc", "variant": "patched", "config": "tiny",
     "kv_cache_dtype": "turboquant_4bit_nc", "expect": "bidirectional", "timeout_s": 150, "min_s": 60,
     "env": TQ_NO_BOUNDARY},
    {"name": "unpatched/tiny_gemma4/turboquant_4bit_nc", "variant": "unpatched", "config": "tiny",
     "kv_cache_dtype": "turboquant_4bit_nc", "expect": "start_fails", "timeout_s": 90, "min_s": 30,
     "env": TQ_NO_BOUNDARY},
    {"name": "patched/tiny_gemma4/auto", "variant": "patched", "config": "tiny",
     "kv_cache_dtype": "auto", "expect": "bidirectional", "timeout_s": 120, "min_s": 45},
    {"name": "unpatched/tiny_gemma4/auto", "variant": "unpatched", "config": "tiny",
     "kv_cache_dtype": "auto", "expect": "bidirectional", "timeout_s": 120, "min_s": 45},
]
CASE_31B = {"name": "patched/gemma-4-31b-it/turboquant_4bit_nc", "variant": "patched", "config": "31b",
            "kv_cache_dtype": "turboquant_4bit_nc", "expect": "bidirectional", "timeout_s": 420, "min_s": 240}


def log(msg: str) -> None:
    print(f"[mm_prefix {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- child (one case)

class LayerRecorder:
    """Wraps attention impl forwards; records prefill calls of the language model's layers."""

    def __init__(self, layer_types: list[str], sliding_window: int):
        self.layer_types = layer_types
        self.sliding_window = sliding_window
        self.calls: dict[int, dict] = {}  # first prefill call per layer index
        # Off until the probe's own request: start-up runs dummy prefills (8 tokens, no image) first.
        self.active = False
        self.errors: list[str] = []

    def install(self) -> list[str]:
        wrapped = []
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
        TritonAttentionImpl.forward = self._wrap(TritonAttentionImpl.forward, rerun=True)
        wrapped.append("TritonAttentionImpl")
        try:
            from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionImpl
            TurboQuantAttentionImpl.forward = self._wrap(TurboQuantAttentionImpl.forward, rerun=False)
            wrapped.append("TurboQuantAttentionImpl")
        except ImportError as error:  # stock tree without the module: nothing to wrap
            self.errors.append(f"TurboQuantAttentionImpl not wrapped: {error}")
        return wrapped

    def _wrap(self, original, rerun: bool):
        recorder = self

        def forward(impl, layer, query, key, value, kv_cache, attn_metadata, output=None, *args, **kwargs):
            result = original(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            try:
                recorder._observe(original, rerun, impl, layer, query, key, value, kv_cache, attn_metadata,
                                  output, args, kwargs)
            except Exception as error:  # never break the engine; the record says what went wrong
                recorder.errors.append(f"{getattr(layer, 'layer_name', '?')}: {exception_chain(error)}")
            return result

        return forward

    def _observe(self, original, rerun, impl, layer, query, key, value, kv_cache, meta, output, args, kwargs):
        import copy
        import re

        import torch

        from mm_prefix.expect import expected_bidirectional_positions, judge_sliding_layer, row_positions

        if not self.active:
            return
        name = getattr(layer, "layer_name", "") or ""
        match = re.search(r"language_model\.model\.layers\.(\d+)\.", name)
        if meta is None or not match or getattr(meta, "max_query_len", 1) <= 1:
            return  # profiling, vision tower, or decode
        index = int(match.group(1))
        if index in self.calls:
            return
        num_tokens = int(meta.num_actual_tokens)
        range_tensor = getattr(meta, "mm_prefix_range_tensor", None)
        ranges_given = range_tensor.tolist() if range_tensor is not None else None
        layer_type = self.layer_types[index] if index < len(self.layer_types) else None
        record = {
            "layer": index, "layer_name": name, "layer_type": layer_type, "impl": type(impl).__name__,
            "kv_cache_dtype": getattr(impl, "kv_cache_dtype", getattr(layer, "kv_cache_dtype", None)),
            "use_mm_prefix": getattr(layer, "use_mm_prefix", None),
            "impl_sliding_window": list(getattr(impl, "sliding_window", None) or []) or None,
            "metadata_class": type(meta).__name__, "num_tokens": num_tokens,
            "mm_prefix_range_tensor": ranges_given,
            "mm_prefix_range": {str(k): [list(r) for r in v] for k, v in (getattr(meta, "mm_prefix_range", None)
                                                                       or {}).items()} or None,
        }
        self.calls[index] = record
        if not (rerun and output is not None and ranges_given is not None and layer_type == "sliding_attention"):
            return
        # Same kernel, same q/k/v and KV cache (forward does not write the cache), ranges removed.
        without = copy.copy(meta)
        without.mm_prefix_range_tensor = None
        if hasattr(without, "mm_prefix_range"):
            without.mm_prefix_range = None
        out_without = torch.zeros_like(output)
        original(impl, layer, query, key, value, kv_cache, without, out_without, *args, **kwargs)
        torch.cuda.synchronize()
        delta = (output[:num_tokens].float() - out_without[:num_tokens].float()).abs()
        per_row = delta.reshape(num_tokens, -1).amax(dim=1).tolist()
        rows = row_positions(meta.query_start_loc.tolist(), meta.seq_lens.tolist())
        by_request: dict[int, dict[int, float]] = {}
        for (req, pos), value_ in zip(rows, per_row):
            by_request.setdefault(req, {})[pos] = float(value_)
        window = self.sliding_window
        verdicts = {}
        for req, diffs in by_request.items():
            req_ranges = [tuple(r) for r in ranges_given[req] if r[0] < r[1]] if req < len(ranges_given) else []
            expected = expected_bidirectional_positions(req_ranges, window) if req_ranges else set()
            verdicts[str(req)] = judge_sliding_layer(diffs, expected, DIFF_TOLERANCE)
        record["rerun_without_ranges"] = verdicts
        record["output_abs_max"] = float(output[:num_tokens].float().abs().max())


def run_child(spec: dict, record: dict) -> None:
    t0 = time.time()
    sys.path.insert(0, str(HERE))
    import torch
    import transformers
    import vllm

    from mm_prefix.expect import image_ranges
    from mm_prefix.fixture import prepare_model_dir

    record.update(vllm=vllm.__version__, transformers=transformers.__version__, torch=torch.__version__,
                  vllm_path=os.path.dirname(vllm.__file__))
    marker = os.path.join(os.path.dirname(vllm.__file__), "_tqstack_patches.json")
    record["patch_marker"] = json.load(open(marker)) if os.path.exists(marker) else None
    config_json = TINY_CONFIG if spec["config"] == "tiny" else GEMMA4_31B_CONFIG
    model_dir = prepare_model_dir(config_json, Path(spec["model_root"]) / spec["config"])
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    record["model_dir"] = str(model_dir)
    record["prepare_s"] = round(time.time() - t0, 1)

    recorder = LayerRecorder(text["layer_types"], int(text["sliding_window"]))
    record["wrapped"] = recorder.install()

    from PIL import Image
    from vllm import LLM, SamplingParams

    engine_kwargs = dict(
        model=str(model_dir), load_format="dummy", enforce_eager=True,
        max_model_len=min(4096, int(text.get("max_position_embeddings", 4096))),
        gpu_memory_utilization=spec["gpu_memory_utilization"], kv_cache_dtype=spec["kv_cache_dtype"],
        max_num_seqs=4, seed=0, enable_prefix_caching=False, limit_mm_per_prompt={"image": 1},
    )
    record["engine_args"] = {k: v for k, v in engine_kwargs.items() if k != "model"}
    llm = LLM(**engine_kwargs)
    record["startup_s"] = round(time.time() - t0, 1)
    vllm_config = llm.llm_engine.vllm_config
    record["skipped_layers"] = list(vllm_config.cache_config.kv_cache_dtype_skip_layers or [])
    record["is_mm_prefix_lm"] = vllm_config.model_config.is_mm_prefix_lm

    rng = __import__("numpy").random.RandomState(0)
    image = Image.fromarray((rng.rand(96, 128, 3) * 255).astype("uint8"))
    words = lambda a, b: " ".join(f"w{i}" for i in range(a, b))  # noqa: E731
    prompts = [
        {"prompt": f"{words(10, 40)} <|image|> {words(40, 60)}", "multi_modal_data": {"image": image}},
        {"prompt": words(100, 150)},
    ]
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    recorder.active = True
    outputs = llm.generate(prompts, params, use_tqdm=False)
    record["generated_tokens"] = [len(o.outputs[0].token_ids) for o in outputs]
    image_prompt = list(outputs[0].prompt_token_ids)
    record["prompt_lens"] = [len(o.prompt_token_ids) for o in outputs]
    record["image_ranges"] = image_ranges(image_prompt, int(config["image_token_id"]))
    record["generate_s"] = round(time.time() - t0 - record["startup_s"], 1)
    record["layers"] = [recorder.calls[i] for i in sorted(recorder.calls)]
    record["hook_errors"] = recorder.errors
    record.update(judge_case(record, text["layer_types"]))
    record["ok"] = True


def judge_case(record: dict, layer_types: list[str]) -> dict:
    """Case verdict from the per-layer records (the evidence numbers go to the summary)."""
    layers = {layer["layer"]: layer for layer in record.get("layers", [])}
    image = [list(r) for r in record.get("image_ranges", [])]
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
    missing = [i for i in range(len(layer_types)) if i not in layers]
    sliding_bidi, sliding_range_ok, text_identical = [], [], []
    for i in sliding:
        layer = layers.get(i)
        if not layer:
            continue
        given = layer.get("mm_prefix_range_tensor") or []
        # The scheduler orders the batch, not the prompt list: find the entry that carries ranges. Exactly
        # one (the image request) may, with the image's positions; the text request gets none.
        with_ranges = {str(i): [list(r) for r in entry if r[0] < r[1]] for i, entry in enumerate(given)}
        with_ranges = {i: r for i, r in with_ranges.items() if r}
        sliding_range_ok.append(len(with_ranges) == 1 and list(with_ranges.values())[0] == image)
        verdicts = layer.get("rerun_without_ranges") or {}
        sliding_bidi.append(len(with_ranges) == 1
                            and bool(verdicts.get(next(iter(with_ranges)), {}).get("bidirectional")))
        text_identical.append(all(v.get("outside_bit_identical") for v in verdicts.values()) if verdicts else False)
    full_clear = [layers[i].get("mm_prefix_range_tensor") is None for i in full if i in layers]
    verdict = {
        "proof": PROOF,
        "layers_seen": len(layers), "layers_missing": missing,
        "sliding_layers": sliding, "full_layers": full,
        "full_layer_impls": {str(i): layers[i]["impl"] for i in full if i in layers},
        "full_layer_kv_dtypes": {str(i): layers[i]["kv_cache_dtype"] for i in full if i in layers},
        "sliding_layer_impls": sorted({layers[i]["impl"] for i in sliding if i in layers}),
        "sliding_ranges_match_image": all(sliding_range_ok) and len(sliding_range_ok) == len(sliding),
        "sliding_bidirectional": all(sliding_bidi) and len(sliding_bidi) == len(sliding),
        "sliding_text_bit_identical": all(text_identical) and len(text_identical) == len(sliding),
        "full_layers_no_range": all(full_clear) and len(full_clear) == len(full),
        "full_layers_on_turboquant": [i for i in full if i in layers and "TurboQuant" in layers[i]["impl"]],
    }
    verdict["verdict"] = ("bidirectional_proven" if image and verdict["sliding_ranges_match_image"]
                          and verdict["sliding_bidirectional"] and verdict["sliding_text_bit_identical"]
                          and verdict["full_layers_no_range"] and not missing else "not_proven")
    return verdict


SUMMARY_KEYS = ("outcome", "ok", "verdict", "error", "skipped", "sliding_ranges_match_image", "sliding_bidirectional",
                "sliding_text_bit_identical", "full_layers_no_range", "full_layer_impls", "full_layer_kv_dtypes",
                "sliding_layer_impls", "full_layers_on_turboquant", "image_ranges", "prompt_lens", "layers_missing",
                "hook_errors", "skipped_layers", "elapsed_s")


def rejudge(out: Path) -> int:
    """Verdicts again from recorded per-layer evidence (the GPU run's records stay as measured)."""
    records = [json.loads(line) for line in (out / "mm_prefix.jsonl").read_text().splitlines() if line.strip()]
    layer_types = json.loads(TINY_CONFIG.read_text())["text_config"]["layer_types"]
    summary = {"proof": PROOF, "cases": {}, "skipped": {}, "rejudged": True}
    for record in records:
        if record.get("layers"):
            record.update(judge_case(record, layer_types))
            spec = next((c for c in plan(False) if c["name"] == record["case"]), None)
            if spec:
                record["outcome"] = case_outcome(spec, record)
        summary["cases"][record["case"]] = {k: record[k] for k in SUMMARY_KEYS if k in record}
    (out / "mm_prefix.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    (out / "mm_prefix_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name, case in summary["cases"].items():
        print(f"{name}: {case.get('outcome')} {case.get('verdict', '')}")
    return 0


def child_main(case_json: str) -> int:
    spec = json.loads(case_json)
    record = {"case": spec["name"], "ok": False, "variant": spec["variant"], "kv_cache_dtype": spec["kv_cache_dtype"],
              "expect": spec["expect"]}
    t0 = time.time()
    try:
        run_child(spec, record)
    except BaseException as error:  # noqa: BLE001 - the record carries the verbatim chain
        record["error"] = exception_chain(error)
        traceback.print_exc()
    record["elapsed_s"] = round(time.time() - t0, 1)
    print(RESULT_MARKER + json.dumps(record, default=str), flush=True)
    os._exit(0)  # engine threads must not keep the process alive


# --------------------------------------------------------------------------- parent (lane)

def plan(with_31b: bool) -> list[dict]:
    cases = [dict(c, gpu_memory_utilization=0.45) for c in CASES]
    if with_31b:
        cases.append(dict(CASE_31B, gpu_memory_utilization=0.90))
    return cases


def case_outcome(spec: dict, record: dict) -> str:
    if spec["expect"] == "start_fails":
        return "as_expected" if not record.get("ok") and record.get("error") else "unexpected_start"
    if not record.get("ok"):
        return "failed"
    return "as_expected" if record.get("verdict") == "bidirectional_proven" else "not_proven"


def run_case_subprocess(spec: dict, out: Path, timeout_s: float) -> dict:
    site = Path(f"/tmp/site-{spec['variant']}")
    log_path = out / "logs" / (spec["name"].replace("/", "__") + ".log")
    if not site.is_dir():
        return {"case": spec["name"], "ok": False, "skipped": f"{site} missing (kit not installed?)"}
    env = dict(os.environ, **spec.get("env", {}), PYTHONPATH=str(site), VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
               VLLM_USE_FLASHINFER_SAMPLER="0", VLLM_PLUGINS="")
    spec = dict(spec, model_root=str(out / "models"))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    result, text, rc, timed_out = run_marked_process(command, env, log_path, timeout_s, RESULT_MARKER)
    if result is not None:
        return result
    reason = f"timeout after {timeout_s:.0f} s" if timed_out else f"exit code {rc} without a result"
    return {"case": spec["name"], "ok": False, "error": reason, "log_tail": text[-3000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results directory (required unless --list)")
    parser.add_argument("--deadline-s", type=float, default=240, help="wall seconds from start for the lane")
    parser.add_argument("--with-31b", action="store_true", help="also the 31B case (0.9 of a GPU of its own)")
    parser.add_argument("--list", "--dry-run", dest="list", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rejudge", type=Path, metavar="DIR",
                        help="recompute verdicts and the summary of DIR/mm_prefix.jsonl from its per-layer evidence")
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.rejudge:
        return rejudge(args.rejudge)
    cases = plan(args.with_31b)
    if args.list:
        print(f"proof: {PROOF}")
        for spec in cases:
            print(f"{spec['name']}: expect {spec['expect']}, gpu_memory_utilization {spec['gpu_memory_utilization']},"
                  f" env {spec.get('env', {})},"
                  f" timeout {spec['timeout_s']} s, PYTHONPATH=/tmp/site-{spec['variant']}")
        return 0
    if args.out is None:
        parser.error("--out is required (unless --list)")
    if args.deadline_s <= 0:
        parser.error(f"--deadline-s must be > 0, got {args.deadline_s}")
    start = time.time()
    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    summary = {"proof": PROOF, "cases": {}, "skipped": {}}
    summary_path = out / "mm_prefix_summary.json"
    for spec in cases:
        left = args.deadline_s - (time.time() - start)
        if left < spec["min_s"]:
            summary["skipped"][spec["name"]] = f"{left:.0f} s left before the deadline, case needs >= {spec['min_s']} s"
            log(f"skip {spec['name']}: {summary['skipped'][spec['name']]}")
            summary_path.write_text(json.dumps(summary, indent=1))
            continue
        log(f"start {spec['name']} (timeout {min(spec['timeout_s'], left):.0f} s)")
        record = run_case_subprocess(spec, out, min(spec["timeout_s"], left - 5))
        record["outcome"] = case_outcome(spec, record)
        with open(out / "mm_prefix.jsonl", "a") as jsonl:
            jsonl.write(json.dumps(record, default=str) + "\n")
        keys = ("outcome", "ok", "verdict", "error", "skipped", "sliding_ranges_match_image", "sliding_bidirectional",
                "sliding_text_bit_identical", "full_layers_no_range", "full_layer_impls", "full_layer_kv_dtypes",
                "sliding_layer_impls", "full_layers_on_turboquant", "image_ranges", "prompt_lens", "layers_missing", "hook_errors",
                "skipped_layers", "elapsed_s")
        summary["cases"][spec["name"]] = {k: record[k] for k in keys if k in record}
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
        log(f"done {spec['name']}: {record['outcome']} {record.get('verdict', '')} "
            f"{(record.get('error') or '').splitlines()[-1:]}")
    log(f"summary in {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
