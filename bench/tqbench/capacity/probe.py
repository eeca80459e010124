"""Admission probe: the largest N concurrent L-token requests the server runs at once with no preemption.

One step sends N requests together, each a distinct random token-id prompt of L - out tokens
generating ``out`` tokens with ``ignore_eos`` (so each ends holding L tokens of KV), and polls
``/metrics`` until all finish. The step is *admitted* when every request succeeded, all N were
seen running at the same time (N = 1: it finished), and ``vllm:num_preemptions`` did not move. ``out`` is long enough
that decoding outlasts the staggered (chunked) prefill of all N prompts, otherwise the first
requests would finish before the last start and N would never be seen running together.

The search gallops from a starting guess (the server's own capacity / L) and then bisects, so it
needs O(log N) steps; every step is appended to the raw JSONL as it finishes.
"""
from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tqbench.capacity.server_info import load_state, parse_prometheus
from tqbench.quality.client import ServerClient, ServerError


def output_tokens_for(n: int, context_len: int, min_output: int, prefill_tokens_per_step: int) -> int:
    """Decode steps that outlast the staggered prefill of n prompts, capped at half the context."""
    needed = math.ceil(n * context_len / prefill_tokens_per_step) + min_output
    return max(1, min(needed, context_len // 2))


def wait_idle(client: ServerClient, timeout_s: float) -> dict[str, float | None]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = load_state(parse_prometheus(client.metrics_text()))
        if not state["running"] and not state["waiting"]:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"server still busy after {timeout_s:.0f}s (running={state['running']}, "
                               f"waiting={state['waiting']}); the admission probe needs an idle server")
        time.sleep(0.2)


def probe_step(client: ServerClient, n: int, context_len: int, token_pool: list[int], *, min_output: int,
               prefill_tokens_per_step: int, poll_interval_s: float, timeout_s: float, seed: int) -> dict[str, Any]:
    out = output_tokens_for(n, context_len, min_output, prefill_tokens_per_step)
    rng = random.Random(f"probe-{seed}-{n}-{context_len}")
    prompts = [[rng.choice(token_pool) for _ in range(context_len - out)] for _ in range(n)]
    before = wait_idle(client, timeout_s)
    peak = {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}
    errors: list[str] = []
    finished = threading.Event()

    def send(prompt: list[int]) -> None:
        try:
            body = client.complete(prompt, max_tokens=out, min_tokens=out, ignore_eos=True, temperature=0.0)
            if body.get("usage", {}).get("completion_tokens") != out:
                errors.append(f"generated {body.get('usage', {}).get('completion_tokens')} of {out} tokens")
        except ServerError as exc:
            errors.append(str(exc)[:300])

    started = time.monotonic()
    pool = ThreadPoolExecutor(n)
    try:
        futures = [pool.submit(send, p) for p in prompts]
        threading.Thread(target=lambda: ([f.result() for f in futures], finished.set()), daemon=True).start()
        while not finished.is_set():
            state = load_state(parse_prometheus(client.metrics_text()))
            for key in peak:
                peak[key] = max(peak[key], state[key] or 0.0)
            if time.monotonic() - started > timeout_s:
                errors.append(f"step did not finish within {timeout_s:.0f}s")
                break
            finished.wait(poll_interval_s)
    finally:
        # Ctrl-C or a timeout must not wait for requests in flight; they end when the server stops.
        pool.shutdown(wait=finished.is_set(), cancel_futures=True)
    after = load_state(parse_prometheus(client.metrics_text()))
    preemptions = (after["preemptions"] or 0.0) - (before["preemptions"] or 0.0)
    # N requests ran together when /metrics saw them running at once. One request that finished without a
    # preemption ran by itself, whether or not a poll caught it: on a loaded machine polls can miss a short one.
    seen_together = peak["running"] >= n
    admitted = not errors and preemptions == 0 and (seen_together or n == 1)
    return {"n": n, "context_len": context_len, "prompt_tokens": context_len - out, "output_tokens": out,
            "peak_running": peak["running"], "seen_running_together": seen_together, "peak_waiting": peak["waiting"],
            "peak_kv_cache_usage": peak["kv_cache_usage"], "preemptions": preemptions,
            "errors": errors, "admitted": admitted, "duration_s": time.monotonic() - started}


def search(step: Callable[[int], bool], start: int, upper: int, max_steps: int) -> tuple[int, int | None]:
    """Largest admitted n in [0, upper] by galloping from ``start`` then bisecting.

    Returns (largest admitted, smallest refused or None when ``upper`` itself was admitted / steps ran out).
    """
    good, bad = 0, upper + 1
    n = min(max(1, start), upper)
    for _ in range(max_steps):
        if step(n):
            good = n
            if good >= upper or bad - good <= 1:
                break
            n = min(n * 2, upper) if bad > upper else (good + bad) // 2
        else:
            bad = n
            if bad - good <= 1:
                break
            n = max(1, n // 2) if good == 0 else (good + bad) // 2
    return good, (bad if bad <= upper else None)
