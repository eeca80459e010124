"""Capacity helpers on hand-built inputs: Prometheus parsing, log parsing, the probe search."""
from __future__ import annotations

import pytest

from tqbench.capacity import CapacitySettingsError, parse_capacity_settings, resolve_probe_lengths
from tqbench.capacity.probe import output_tokens_for, search
from tqbench.capacity.server_info import (cache_config_info, load_state, parse_prometheus, parse_server_log,
                                          server_capacity)

METRICS = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="turboquant_4bit_nc",engine="0",num_gpu_blocks="4096"} 1.0
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
"""


def test_metrics_parsing():
    samples = parse_prometheus(METRICS)
    info = cache_config_info(samples)
    assert info["num_gpu_blocks"] == "4096" and info["cache_dtype"] == "turboquant_4bit_nc"
    assert load_state(samples) == {"running": 3.0, "waiting": 1.0, "preemptions": 2.0, "kv_cache_usage": 0.5}
    assert server_capacity(info, {}, 8192)["kv_cache_tokens"] == 4096 * 16
    assert server_capacity(info, {}, 8192)["max_concurrency"] == 8.0


def test_log_lines_old_and_new_formats(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO ... GPU KV cache size: 1,109,742 tokens\n"
                   "INFO ... Maximum concurrency for 32,768 tokens per request: 33.87x\n"
                   "INFO ... CPU KV cache size: 8,192 tokens, Maximum concurrency for 4,096 tokens per request: 2.00x\n")
    parsed = parse_server_log(log)
    assert parsed["log_kv_cache_tokens"] == 8192 and parsed["log_max_concurrency"] == 2.0  # last boot wins
    assert parsed["log_kv_device"] == "CPU" and parsed["log_concurrency_len"] == 4096
    capacity = server_capacity({"num_gpu_blocks": "1", "block_size": "16"}, parsed, 4096)
    assert capacity["kv_cache_tokens"] == 8192 and capacity["kv_cache_tokens_source"] == "server log"


@pytest.mark.parametrize(("limit", "start", "upper"), [(7, 1, 64), (7, 20, 64), (0, 4, 64), (64, 8, 64), (33, 33, 256)])
def test_search_finds_the_limit_in_few_steps(limit, start, upper):
    tried = []

    def step(n):
        tried.append(n)
        return n <= limit

    admitted, refused = search(step, start, upper, max_steps=16)
    assert admitted == limit
    assert refused == (None if limit >= upper else limit + 1)
    assert len(tried) <= 2 * upper.bit_length() + 1 and len(set(tried)) == len(tried)


def test_probe_output_outlasts_prefill():
    assert output_tokens_for(4, 2048, 16, 4096) == 2 + 16
    assert output_tokens_for(1000, 1024, 16, 512) == 512  # capped at half the context


def test_bad_capacity_settings():
    with pytest.raises(CapacitySettingsError, match=r"capacity\.probe_context_len"):
        parse_capacity_settings({"probe_context_len": 10})
    with pytest.raises(CapacitySettingsError, match="known keys"):
        parse_capacity_settings({"prob": True})
    with pytest.raises(CapacitySettingsError, match=r"capacity\.probe_context_lens.*>= 64 tokens or 'max_model_len'"):
        parse_capacity_settings({"probe_context_lens": [1024, 32]})
    with pytest.raises(CapacitySettingsError, match="not both"):
        parse_capacity_settings({"probe_context_lens": [1024], "probe_context_len": 2048})


def test_probe_lengths_default_resolve_and_skip():
    assert parse_capacity_settings({}).lengths() == [1024, 4096, "max_model_len"]
    assert parse_capacity_settings({"probe_context_len": 512}).lengths() == [512]
    lengths, skipped = resolve_probe_lengths([1024, 4096, "max_model_len"], 2048)
    assert lengths == [1024, 2048]
    assert skipped == [{"context_len": 4096, "reason": "longer than the server's max_model_len 2048"}]
    assert resolve_probe_lengths([4096, "max_model_len"], 4096) == ([4096], [])  # no repeated length
    lengths, skipped = resolve_probe_lengths(["max_model_len"], None)
    assert lengths == [] and "does not report max_model_len" in skipped[0]["reason"]


def test_planner_prediction_for_a_configs_stack():
    """The real tqconfig planner on a real stack: TurboQuant predicts more tokens than auto, bad dtypes become notes."""
    from tqconfig import load_stack

    from tqbench.capacity import planner_prediction

    stack = load_stack("rtx5060ti-x4-qwen3.6-27b")
    auto = planner_prediction(stack, "auto", 32768)
    turbo = planner_prediction(stack, "turboquant_4bit_nc", 32768)
    assert auto["predicted_kv_tokens"] > 0 and auto["plan"]["max_model_len"] == 32768
    assert turbo["predicted_kv_tokens"] > 2 * auto["predicted_kv_tokens"]
    assert planner_prediction(stack, "bogus", 32768)["note"].startswith("no prediction: ")
    assert planner_prediction(None, "auto", 32768)["predicted_kv_tokens"] is None
