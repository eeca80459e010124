"""One matrix case, in its own process (started by matrix.py with PYTHONPATH=/tmp/site-<variant>).

    python3 tests/gpu/case.py '<json case spec>'

Starts a real offline vLLM engine (dummy weights, eager, in-process engine core), generates
a small batch from token-id prompts and checks the token counts, then reports what the
engine actually built: the final kv_cache_dtype_skip_layers, the attention backend and KV
dtype of every attention layer, KV-cache capacity as vLLM computes it, the KV-cache groups
(spec, block size, page size) and, if asked, the 32K admission probe. The last stdout line
is `TQCASE-RESULT <json>`; on failure the record carries the exception chain verbatim.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback

RESULT_MARKER = "TQCASE-RESULT "


def exception_chain(error: BaseException) -> str:
    """Last line of each exception in the chain (outermost last), as Python prints them."""
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines.append("".join(traceback.format_exception_only(type(error), error)).strip())
        error = error.__cause__ or error.__context__
    return "\n".join(reversed(lines))


def run_marked_process(argv: list[str], env: dict, log_path, timeout_s: float, marker: str,
                       cwd=None) -> tuple[dict | None, str, int, bool]:
    """Run one case process in its own process group, all output into ``log_path``; on timeout kill the
    group. Returns (the last ``marker`` line's JSON or None, the log text, return code, timed out)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            timed_out = True
    text = open(log_path, errors="replace").read()
    results = [line[len(marker):] for line in text.splitlines() if line.startswith(marker)]
    return (json.loads(results[-1]) if results else None), text, process.returncode, timed_out


def engine_layer_facts(llm) -> dict:
    """Final skip list and the backend/KV dtype of every attention layer of a started in-process engine."""
    vllm_config = llm.llm_engine.vllm_config
    layers = describe_layers(vllm_config)
    if not layers:  # the worker may hold its own copy of the config
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker
        layers = describe_layers(getattr(worker, "worker", worker).model_runner.vllm_config)
    return {"skipped_layers": list(vllm_config.cache_config.kv_cache_dtype_skip_layers or []),
            "layer_backends": summarize_layers(layers), "num_attention_layers": len(layers)}


def layer_index(name: str) -> int | None:
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def describe_layers(vllm_config) -> dict:
    """Backend and KV dtype each layer got, from the static forward context."""
    context = vllm_config.compilation_config.static_forward_context
    layers = {}
    for name, module in context.items():
        backend = getattr(module, "attn_backend", None)
        if backend is not None:
            try:
                backend_name = backend.get_name()
            except Exception:  # some backends only carry a class name
                backend_name = getattr(backend, "__name__", str(backend))
        else:
            backend_name = type(module).__name__
        layers[name] = {
            "backend": backend_name,
            "kv_cache_dtype": getattr(module, "kv_cache_dtype", None),
            "impl": type(getattr(module, "impl", None)).__name__ if hasattr(module, "impl") else None,
            "head_size": getattr(module, "head_size", None),
            "sliding_window": getattr(module, "sliding_window", None),
            "kv_sharing_target": getattr(module, "kv_sharing_target_layer_name", None),
        }
    return layers


def summarize_layers(layers: dict) -> dict:
    """{'TRITON_ATTN/auto/head256/sw1024': [0, 1, ...]} — compact view of the per-layer table."""
    summary: dict[str, list] = {}
    for name, info in layers.items():
        key = f"{info['backend']}/{info['kv_cache_dtype']}/head{info['head_size']}"
        if info["sliding_window"]:
            key += f"/sw{info['sliding_window']}"
        if info["kv_sharing_target"]:
            key += "/shared"
        summary.setdefault(key, []).append(layer_index(name) if layer_index(name) is not None else name)
    return {k: sorted(v, key=lambda x: (isinstance(x, str), x)) for k, v in summary.items()}


def describe_kv_cache(scheduler, vllm_config) -> dict:
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    config = scheduler.kv_cache_config
    tokens, concurrency = get_kv_cache_capacity(vllm_config, config)
    groups = []
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        groups.append({
            "spec": type(spec).__name__,
            "block_size": getattr(spec, "block_size", None),
            "page_size_bytes": getattr(spec, "page_size_bytes", None),
            "sliding_window": getattr(spec, "sliding_window", None),
            "dtype": str(getattr(spec, "dtype", None)),
            "cache_dtype_str": getattr(spec, "cache_dtype_str", None),
            "num_layers": len(group.layer_names),
            "layers": sorted(i for i in map(layer_index, group.layer_names) if i is not None),
        })
    return {
        "kv_capacity_tokens": int(tokens),
        "kv_capacity_concurrency": round(float(concurrency), 2),
        "num_blocks": config.num_blocks,
        "kv_cache_bytes": sum(t.size for t in config.kv_cache_tensors),
        "scheduler_block_size": scheduler.block_size,
        "kv_cache_groups": groups,
    }


def run_case(spec: dict, record: dict) -> None:
    """Fills `record` as it goes, so a failure keeps what was learned before it."""
    t0 = time.time()
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    record.update(vllm=vllm.__version__, transformers=transformers.__version__, torch=torch.__version__)
    marker = os.path.join(os.path.dirname(vllm.__file__), "_tqstack_patches.json")
    record["patch_marker"] = json.load(open(marker)) if os.path.exists(marker) else None

    engine_kwargs = dict(
        model=spec["model_dir"],
        load_format="dummy",
        enforce_eager=True,
        max_model_len=spec["max_model_len"],
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.90),
        kv_cache_dtype=spec["kv_cache_dtype"],
        skip_tokenizer_init=True,
        max_num_seqs=spec.get("max_num_seqs", 256),
        seed=0,
    )
    if spec.get("language_model_only"):
        engine_kwargs["language_model_only"] = True
    if spec.get("gdn_prefill_backend"):
        engine_kwargs["gdn_prefill_backend"] = spec["gdn_prefill_backend"]
    engine_kwargs.update(spec.get("extra_engine_args", {}))
    record["engine_args"] = {k: v for k, v in engine_kwargs.items() if k != "model"}

    llm = LLM(**engine_kwargs)
    record["startup_s"] = round(time.time() - t0, 1)
    vllm_config = llm.llm_engine.vllm_config
    core = llm.llm_engine.engine_core.engine_core
    record.update(engine_layer_facts(llm))
    record.update(describe_kv_cache(core.scheduler, vllm_config))

    # Small batch: distinct token-id prompts, fixed output length.
    vocab = vllm_config.model_config.get_vocab_size()
    prompts = [{"prompt_token_ids": [(7 * i + 13 * t) % (vocab - 10) + 10 for t in range(24 + 8 * i)]}
               for i in range(4)]
    max_tokens = spec.get("max_tokens", 16)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                                                   detokenize=False), use_tqdm=False)
    record["generated_tokens"] = [len(o.outputs[0].token_ids) for o in outputs]
    if record["generated_tokens"] != [max_tokens] * len(prompts):
        raise AssertionError(f"expected {max_tokens} tokens per prompt, got {record['generated_tokens']}")
    record["generate_s"] = round(time.time() - t0 - record["startup_s"], 1)

    if spec.get("admission"):
        from admission import probe_engine, probe_manager

        context_len = spec["max_model_len"]
        record.update(probe_manager(llm, context_len=context_len))
        if spec["admission"] == "engine":
            record.update(probe_engine(llm, record["admitted_32k"], context_len=context_len,
                                       wall_limit_s=spec.get("engine_wall_limit_s", 420),
                                       only_n_plus_1=spec.get("engine_only_n_plus_1", False)))
    record["ok"] = True


def main() -> int:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # admission.py
    record: dict = {"ok": False}
    try:
        run_case(spec, record)
    except BaseException as error:  # noqa: BLE001 - the record must say what failed, whatever it was
        traceback.print_exc()
        record["ok"] = False
        record["error"] = exception_chain(error)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(record, default=str), flush=True)
    # Skip interpreter teardown: engine shutdown can hang or crash after a failed start.
    os._exit(0)


if __name__ == "__main__":
    main()
