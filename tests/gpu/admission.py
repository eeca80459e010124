"""Admission probe: how many concurrent 32K-token requests a started engine holds without preemption.

Two modes, both against a real, started `vllm.LLM` (in-process engine core,
VLLM_ENABLE_V1_MULTIPROCESSING=0):

* ``manager`` (default, seconds): build fresh instances of vLLM's own ``KVCacheManager``
  from the engine's real ``KVCacheConfig`` (same block pool size, same groups and specs,
  same block sizes) and drive N synthetic requests of ``context_len`` tokens through it in
  chunked-prefill steps of ``max_num_batched_tokens`` as the V1 scheduler does: running
  requests first, then new ones FCFS. vLLM's sliding-window / Mamba managers free
  out-of-window blocks on each allocation exactly as in serving. N is admitted when every
  allocation succeeds and all N requests end up holding their full context at once. The
  largest N is found by doubling, then bisection. No GPU memory is touched.
* ``engine`` (confirmation, minutes on big models): submit N real requests with distinct
  random prompts of ``context_len - decode_tokens`` tokens and ``max_tokens=decode_tokens``
  (enough decode steps that the first request is still running when the last finishes
  its prefill), count preemptions by wrapping the scheduler's ``_preempt_request`` and
  record the peak size of the running queue. Admitted when preemptions == 0 and
  peak running == N.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any


def _engine_core(llm):
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError(
            "admission probe needs the in-process engine core: set VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )
    return core


def _fresh_manager(scheduler, vllm_config):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    return KVCacheManager(
        kv_cache_config=scheduler.kv_cache_config,
        max_model_len=vllm_config.model_config.max_model_len,
        scheduler_block_size=scheduler.block_size,
        hash_block_size=scheduler.hash_block_size,
        max_in_flight_tokens=getattr(vllm_config, "max_in_flight_tokens", None),
        enable_caching=False,  # synthetic prompts must not share prefix blocks
        watermark=getattr(vllm_config.scheduler_config, "watermark", 0.0),
    )


def _synthetic_request(index: int, num_tokens: int):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(
        request_id=f"admission-{index}",
        prompt_token_ids=[1 + index % 1000] * num_tokens,  # content is irrelevant: caching is off
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
    )


def fits_in_manager(scheduler, vllm_config, num_requests: int, context_len: int,
                    reserve_full_sequence: bool | None = None) -> tuple[bool, dict]:
    """Drive `num_requests` requests of `context_len` tokens through a fresh KVCacheManager.

    reserve_full_sequence: the scheduler's admission gate (scheduler_reserve_full_isl);
    None = what the live scheduler uses.
    """
    from vllm.v1.request import RequestStatus

    manager = _fresh_manager(scheduler, vllm_config)
    token_budget_per_step = vllm_config.scheduler_config.max_num_batched_tokens
    if reserve_full_sequence is None:
        reserve_full_sequence = bool(getattr(scheduler, "scheduler_reserve_full_isl", False))
    waiting = [_synthetic_request(i, context_len) for i in range(num_requests)]
    prefilling: list = []  # running, prompt not yet fully computed (FCFS)
    holding = 0            # running, full context held
    steps = 0
    while waiting or prefilling:
        steps += 1
        budget = token_budget_per_step
        still_prefilling = []
        for request in prefilling:
            remaining = context_len - request.num_computed_tokens
            if remaining == 0:
                # Prefill finished last step: its next (decode) allocation first trims the
                # blocks that fell out of the sliding window / Mamba state; apply that once.
                manager.remove_skipped_blocks(
                    request.request_id, request.num_computed_tokens, request.num_prompt_tokens
                )
                holding += 1
                continue
            still_prefilling.append(request)
            if budget == 0:
                continue
            chunk = min(remaining, budget)
            if manager.allocate_slots(request, chunk) is None:
                return False, {"failed_at_step": steps, "failed_request": request.request_id}
            request.num_computed_tokens += chunk
            budget -= chunk
        prefilling = still_prefilling
        while budget > 0 and waiting:
            request = waiting.pop(0)
            chunk = min(context_len, budget)
            blocks = manager.allocate_slots(
                request, chunk, full_sequence_must_fit=reserve_full_sequence,
                has_scheduled_reqs=bool(prefilling) or holding > 0,
            )
            if blocks is None:
                return False, {"failed_at_step": steps, "failed_request": request.request_id, "at_admission": True}
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens += chunk
            budget -= chunk
            prefilling.append(request)
    pool = manager.block_pool
    used_blocks = pool.num_gpu_blocks - pool.get_num_free_blocks()
    return True, {"steps": steps, "used_blocks": used_blocks, "num_blocks": pool.num_gpu_blocks}


def largest_admitted(scheduler, vllm_config, context_len: int, max_requests: int,
                     reserve_full_sequence: bool | None = None) -> tuple[int, dict]:
    """Largest N that fits (doubling, then bisection) and why N + 1 does not."""
    def fits(n):
        return fits_in_manager(scheduler, vllm_config, n, context_len, reserve_full_sequence)

    ok, info = fits(1)
    if not ok:
        return 0, info
    low, high, high_info = 1, 2, None  # low fits; find a high that does not
    while high <= max_requests:
        ok, info = fits(high)
        if not ok:
            high_info = info
            break
        low, high = high, high * 2
    high = min(high, max_requests + 1)
    while high - low > 1:
        middle = (low + high) // 2
        ok, info = fits(middle)
        if ok:
            low = middle
        else:
            high, high_info = middle, info
    return low, high_info or {}


def probe_manager(llm, context_len: int = 32768, max_requests: int = 4096) -> dict[str, Any]:
    core = _engine_core(llm)
    scheduler = core.scheduler
    vllm_config = llm.llm_engine.vllm_config
    t0 = time.time()
    ok, one = fits_in_manager(scheduler, vllm_config, 1, context_len)
    if not ok:
        return {"admitted_32k": 0, "admission_mode": "manager", "admission_limit": one,
                "probe_s": round(time.time() - t0, 1)}
    admitted, limit = largest_admitted(scheduler, vllm_config, context_len, max_requests)
    # The admission gate (scheduler_reserve_full_isl) reserves, per new request, the full
    # sequence capped for sliding layers at window + max_in_flight_tokens; when that cap
    # reaches max_model_len the gate, not the memory held, sets concurrency. Measure both.
    admitted_without_gate, limit_without_gate = largest_admitted(
        scheduler, vllm_config, context_len, max_requests, reserve_full_sequence=False)
    return {
        "admitted_32k": admitted,
        "admission_mode": "manager",
        "admission_context_len": context_len,
        "admission_limit": limit,  # why admitted + 1 failed: at admission (gate/first chunk) or mid-prefill
        "admitted_32k_without_reserve_gate": admitted_without_gate,
        "admission_limit_without_reserve_gate": limit_without_gate,
        "scheduler_reserve_full_isl": bool(getattr(scheduler, "scheduler_reserve_full_isl", False)),
        "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
        "max_in_flight_tokens": getattr(vllm_config, "max_in_flight_tokens", None),
        "blocks_per_request": one["used_blocks"],  # steady-state blocks one full-context request holds
        "num_blocks": one["num_blocks"],
        "probe_s": round(time.time() - t0, 1),
    }


class _ProbeStop(Exception):
    """Raised inside the scheduler to end a probe run early (first preemption at N+1, or the wall limit)."""


def run_engine(llm, num_requests: int, context_len: int = 32768, seed: int = 0,
               stop_on_preemption: bool = False, wall_limit_s: float | None = None) -> dict[str, Any]:
    """Real requests; returns preemptions and peak running for `num_requests`.

    ``stop_on_preemption`` ends the run at the first preemption (the N+1 run only has to show that one
    happens; finishing it would recompute the preempted prefill for minutes). The engine is unusable
    after an early stop, so that run must be the case's last use of it.
    """
    from vllm import SamplingParams

    core = _engine_core(llm)
    scheduler = core.scheduler
    vllm_config = llm.llm_engine.vllm_config
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    # Keep every request alive until the last prefill is done: each step decodes one token for every
    # running request, and those decode tokens share the step's budget with the prefill chunks.
    prefill_steps = math.ceil(num_requests * context_len / max(budget - num_requests, 1))
    decode_tokens = min(context_len // 4, prefill_steps + 32)
    prompt_len = context_len - decode_tokens
    rng = random.Random(seed)
    vocab = vllm_config.model_config.get_vocab_size()
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(prompt_len)]} for _ in range(num_requests)]

    stats = {"preemptions": 0, "peak_running": 0, "steps": 0, "stopped_early": None}
    original_preempt, original_schedule = scheduler._preempt_request, scheduler.schedule
    t0 = time.time()

    def counting_preempt(*args, **kwargs):
        stats["preemptions"] += 1
        result = original_preempt(*args, **kwargs)
        if stop_on_preemption:
            stats["stopped_early"] = "first preemption"
            raise _ProbeStop
        return result

    # At N+1 the scheduler may keep a request waiting instead of preempting: once every prefill would have
    # ended had all fitted, peak running already says whether they did.
    last_useful_step = prefill_steps + 16 if stop_on_preemption else None

    def tracking_schedule(*args, **kwargs):
        if wall_limit_s is not None and time.time() - t0 > wall_limit_s:
            stats["stopped_early"] = f"wall limit {wall_limit_s:.0f} s"
            raise _ProbeStop
        if last_useful_step is not None and stats["steps"] >= last_useful_step:
            stats["stopped_early"] = f"step {last_useful_step}: every prefill would have ended"
            raise _ProbeStop
        output = original_schedule(*args, **kwargs)
        stats["steps"] += 1
        stats["peak_running"] = max(stats["peak_running"], len(scheduler.running))
        return output

    scheduler._preempt_request, scheduler.schedule = counting_preempt, tracking_schedule
    generated: list[int] = []
    try:
        outputs = llm.generate(
            prompts, SamplingParams(max_tokens=decode_tokens, ignore_eos=True, temperature=0.0, detokenize=False),
            use_tqdm=False)
        generated = [len(o.outputs[0].token_ids) for o in outputs]
    except Exception as error:  # noqa: BLE001 - an early stop surfaces wrapped by the engine
        if stats["stopped_early"] is None:
            raise
        stats["stop_exception"] = type(error).__name__
    finally:
        scheduler._preempt_request, scheduler.schedule = original_preempt, original_schedule
    timed_out = bool(stats["stopped_early"]) and stats["stopped_early"].startswith("wall")
    return {
        "requests": num_requests,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "all_completed": bool(generated) and all(g == decode_tokens for g in generated),
        "elapsed_s": round(time.time() - t0, 1),
        **stats,
        # None: the wall limit ended the run before it could say
        "admitted": None if timed_out else (stats["preemptions"] == 0 and stats["peak_running"] == num_requests),
    }


def probe_engine(llm, expected: int, context_len: int = 32768, wall_limit_s: float = 420,
                 only_n_plus_1: bool = False) -> dict[str, Any]:
    """Confirm the manager's N: N must run without preemption, N + 1 must not all fit.

    ``only_n_plus_1``: N ran in an earlier record (each run of a 31B takes minutes); run N + 1 alone.
    """
    t0 = time.time()
    at_n = ({"requests": expected, "skipped": "only_n_plus_1: N is confirmed by an earlier record"}
            if only_n_plus_1 else run_engine(llm, expected, context_len, wall_limit_s=wall_limit_s))
    left = wall_limit_s - (time.time() - t0)
    run_next = (only_n_plus_1 or at_n["admitted"]) and left > 30
    at_n_plus_1 = (run_engine(llm, expected + 1, context_len, seed=1, stop_on_preemption=True, wall_limit_s=left)
                   if run_next else {"requests": expected + 1, "skipped": "no time left or N not admitted"})
    return {
        "admission_mode": "engine",
        "engine_at_n": at_n,
        "engine_at_n_plus_1": at_n_plus_1,
        "engine_confirms": bool(at_n.get("admitted")) and at_n_plus_1.get("admitted") is False,
    }
