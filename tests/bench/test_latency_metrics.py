"""Latency metric code on hand-built timelines, against values computed by hand."""
from __future__ import annotations

import math

import pytest

from tqbench.metrics.latency import request_frame, scenario_metrics

MS = 1_000_000  # ns per ms


def rec(start_ms, chunks, *, completion=None, prompt=10, ok=True, end_ms=None, warmup=False, t0_ms=None):
    """A raw record as loadgen writes it; chunks = [(arrival_ms, tokens), ...]."""
    chunk_ns = [int(t * MS) for t, _ in chunks]
    return {
        "request_id": f"r{start_ms}", "ok": ok, "warmup": warmup, "start_ns": int(start_ms * MS),
        "end_ns": int((end_ms if end_ms is not None else chunks[-1][0]) * MS),
        "chunk_ns": chunk_ns, "chunk_tokens": [k for _, k in chunks], "prompt_tokens": prompt,
        "completion_tokens": completion if completion is not None else sum(k for _, k in chunks),
        "t0_ns": None if t0_ms is None else int(t0_ms * MS), "error": None if ok else "boom",
    }


@pytest.fixture
def timeline():
    return [
        rec(0, [(100, 1), (150, 1), (250, 2), (300, 1)]),  # 5 tokens, one 2-token chunk
        rec(50, [(250, 1), (350, 1)]),  # 2 tokens
        rec(100, [(400, 1)]),  # 1-token output: no TPOT, no ITL
        rec(120, [], ok=False, end_ms=500, completion=0),  # failed: excluded, but ends the run
        rec(-1000, [(-900, 1), (-800, 1)], warmup=True),  # warm-up: ignored entirely
    ]


def test_per_request_values(timeline):
    frame = request_frame(timeline).set_index("request_id")
    assert len(frame) == 4  # warm-up dropped
    first = frame.loc["r0"]
    assert first.ttft_ms == 100 and first.e2el_ms == 300
    assert first.tpot_ms == pytest.approx((300 - 100) / (5 - 1))
    assert first.itl_ms == [50, 100, 50]
    assert first.itl_token_ms == [50, 50, 50, 50]  # the 100 ms gap carried 2 tokens
    assert math.isnan(frame.loc["r100"].tpot_ms) and frame.loc["r100"].itl_ms == []
    assert not frame.loc["r120"].ok


def test_run_level_metrics(timeline):
    m = scenario_metrics(timeline)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["duration_s"] == pytest.approx(0.5)  # first start 0 ms .. failed request seen at 500 ms
    assert m["request_throughput"] == pytest.approx(3 / 0.5)
    assert m["output_throughput"] == pytest.approx((5 + 2 + 1) / 0.5)
    assert m["total_token_throughput"] == pytest.approx((30 + 8) / 0.5)
    # TTFT samples 100, 200, 300 (linear interpolation like numpy.percentile)
    assert (m["ttft_ms_mean"], m["ttft_ms_p50"], m["ttft_ms_p90"], m["ttft_ms_p99"]) == pytest.approx((200, 200, 280, 298))
    # TPOT samples 50, 100 (the 1-token request has none)
    assert (m["tpot_ms_mean"], m["tpot_ms_p50"], m["tpot_ms_p90"], m["tpot_ms_p99"]) == pytest.approx((75, 75, 95, 99.5))
    # chunk ITL pooled: 50, 100, 50 + 100
    assert (m["itl_ms_mean"], m["itl_ms_p50"], m["itl_ms_p90"], m["itl_ms_p99"]) == pytest.approx((75, 75, 100, 100))
    # token ITL pooled: 50, 50, 50, 50 + 100
    assert (m["itl_token_ms_mean"], m["itl_token_ms_p50"], m["itl_token_ms_p90"], m["itl_token_ms_p99"]) == \
        pytest.approx((60, 50, 80, 98))
    assert m["e2el_ms_mean"] == pytest.approx(300) and m["e2el_ms_p99"] == pytest.approx(300)


def test_multi_token_first_chunk_and_empty_chunks():
    frame = request_frame([
        rec(0, [(100, 3), (200, 1)]),  # first chunk brought 3 tokens
        rec(0, [(100, 1), (150, 0), (200, 1)]),  # an empty chunk (e.g. finish) between tokens
    ])
    coalesced, with_empty = frame.iloc[0], frame.iloc[1]
    assert coalesced.tpot_ms == pytest.approx(100 / 3)  # (E2EL - TTFT) / (4 - 1)
    assert coalesced.itl_ms == [100] and coalesced.itl_token_ms == [100]
    assert with_empty.itl_ms == [50, 50]  # vLLM ITL counts every choices chunk
    assert with_empty.itl_token_ms == [100]  # token ITL spans token-bearing chunks only
    assert with_empty.tpot_ms == pytest.approx(100)


def test_open_loop_duration_starts_at_schedule_zero():
    m = scenario_metrics([rec(300, [(400, 1), (500, 1)], t0_ms=0), rec(700, [(800, 1), (1000, 1)], t0_ms=0)])
    assert m["duration_s"] == pytest.approx(1.0)
    assert m["request_throughput"] == pytest.approx(2.0)


def test_usage_missing_falls_back_to_chunk_tokens():
    record = rec(0, [(10, 2), (20, 2)])
    record["completion_tokens"] = None
    assert request_frame([record]).iloc[0].output_tokens == 4


def test_all_failed_gives_zero_throughput_and_no_latency():
    m = scenario_metrics([rec(0, [], ok=False, end_ms=100, completion=0)])
    assert (m["completed"], m["failed"], m["request_throughput"]) == (1 - 1, 1, 0)
    assert math.isnan(m["ttft_ms_mean"])


def test_decode_phase_excludes_gaps_overlapping_any_prefill():
    """Two requests sent together: A's first token at 100 ms, B's at 200 ms, so prefill is in flight 0-200 ms."""
    m = scenario_metrics([
        rec(0, [(100, 1), (150, 1), (250, 1), (300, 1)]),  # gaps 100-150, 150-250 overlap B's prefill; 250-300 clean
        rec(0, [(200, 1), (260, 1), (330, 2)]),  # both gaps after 200 ms: clean, 130 ms for 3 tokens
    ])
    assert m["decode_requests"] == 2
    assert (m["decode_tpot_ms_mean"], m["decode_tpot_ms_p50"]) == pytest.approx(((50 + 130 / 3) / 2,) * 2)
    assert m["decode_tok_s_per_user_p50"] == pytest.approx((1000 / 50 + 3000 / 130) / 2)
    assert m["tpot_ms_mean"] != pytest.approx(m["decode_tpot_ms_mean"])  # plain TPOT mixes in prefill time
    assert m["prefill_tok_s"] == pytest.approx(20 / 0.2)  # 10 + 10 prompt tokens, prefill busy 0-200 ms
    assert m["ttft_per_1k_ms_p50"] == pytest.approx((100 / 0.01 + 200 / 0.01) / 2)


def test_decode_phase_of_sequential_requests_is_their_whole_decode():
    m = scenario_metrics([rec(0, [(100, 1), (140, 1), (180, 1)]), rec(200, [(300, 1), (320, 1)])])
    assert m["decode_requests"] == 2 and m["decode_tpot_ms_p50"] == pytest.approx((40 + 20) / 2)
    assert m["prefill_tok_s"] == pytest.approx(20 / 0.2)  # two 100 ms prefill windows


def test_sustained_arrivals_leave_no_clean_decode_step():
    m = scenario_metrics([rec(0, [(100, 1), (200, 1)]), rec(50, [(250, 1)]), rec(150, [(300, 1)])])
    assert m["decode_requests"] == 0 and math.isnan(m["decode_tpot_ms_p50"])
