"""CPU checks of the GPU bench session: fidelity.json from the harness's real latency.csv (built by
tqbench's own report code from raw per-request records) and a `vllm bench serve --save-result` JSON
with the keys vLLM 0.26.0 writes; and the `vllm bench serve` / `vllm serve` flags the session passes
exist in vLLM 0.26.0."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "stacks")]

import bench_session  # noqa: E402
import fidelity  # noqa: E402
import vllm_cli  # noqa: E402
from tqbench.report import build_report  # noqa: E402

MS = 1_000_000  # ns


def harness_records(ttft_ms: list[float], tpot_ms: float, output_len: int, prompt_len: int) -> list[dict]:
    """Raw request records as tqbench's load generator writes them: one chunk per token."""
    records = []
    for i, ttft in enumerate(ttft_ms):
        start = i * 10_000 * MS
        chunks = [start + int(ttft * MS) + int(k * tpot_ms * MS) for k in range(output_len)]
        records.append({"request_id": f"r{i}", "ok": True, "warmup": False, "start_ns": start, "end_ns": chunks[-1],
                        "chunk_ns": chunks, "chunk_tokens": [1] * output_len, "completion_tokens": output_len,
                        "prompt_tokens": prompt_len})
    return records


def write_harness_run(run_dir: Path, dtype: str, scenario: dict, records: list[dict]) -> None:
    cell = run_dir / "raw" / "latency" / dtype / scenario["name"]
    cell.mkdir(parents=True)
    (cell / "scenario.json").write_text(json.dumps({"scenario": scenario}))
    (cell / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (cell / "DONE").write_text("")
    build_report(run_dir)  # the harness's own report code writes latency.csv


def vllm_bench_result(path: Path, *, ttfts_ms: list[float], tpot_ms: float, scenario: dict,
                      extra_input_tokens: int = 0) -> None:
    """The subset of vLLM 0.26.0 `--save-result` keys fidelity reads, computed as serve.py does."""
    import numpy as np

    n = len(ttfts_ms)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "date": "20261121-120000", "backend": "openai", "model_id": "qwen3.6-27b", "num_prompts": n,
        "request_rate": "inf", "burstiness": 1.0, "max_concurrency": scenario["concurrency"], "duration": 12.5,
        "completed": n, "failed": 0, "total_input_tokens": n * scenario["input_len"] + extra_input_tokens,
        "total_output_tokens": n * scenario["output_len"], "mean_ttft_ms": float(np.mean(ttfts_ms)),
        "median_ttft_ms": float(np.median(ttfts_ms)), "p99_ttft_ms": float(np.percentile(ttfts_ms, 99)),
        "mean_tpot_ms": tpot_ms, "median_tpot_ms": tpot_ms, "median_itl_ms": tpot_ms,
    }))


SCENARIO = {"name": "short_decode", "input_len": 128, "output_len": 33, "num_prompts": 4, "concurrency": 2,
            "request_rate": math.inf, "burstiness": 1.0}


def test_fidelity_ratios_from_both_tools(tmp_path):
    write_harness_run(tmp_path, "auto", SCENARIO, harness_records([100, 110, 120, 130], 20.0, 33, 128))
    # vllm bench: TTFT median 116 (harness 115 -> ratio 0.99138), TPOT 19.5 (harness 20 -> 1.02564)
    vllm_bench_result(tmp_path / "vllm-bench" / "auto" / "short_decode.json", ttfts_ms=[101, 112, 120, 131],
                      tpot_ms=19.5, scenario=SCENARIO, extra_input_tokens=1)  # re-encoding drift: not a mismatch
    assert fidelity.main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fidelity.json").read_text())
    (entry,) = result["scenarios"]
    assert entry["kv_cache_dtype"] == "auto" and entry["scenario"] == "short_decode"
    assert entry["ttft"]["harness_p50_ms"] == pytest.approx(115.0)
    assert entry["ttft"]["vllm_bench_p50_ms"] == pytest.approx(116.0)
    assert entry["ttft"]["ratio"] == pytest.approx(115 / 116, abs=1e-4) and entry["ttft"]["within_goal"]
    assert entry["tpot"]["harness_p50_ms"] == pytest.approx(20.0)
    assert entry["tpot"]["ratio"] == pytest.approx(20 / 19.5, abs=1e-4) and entry["tpot"]["within_goal"]
    assert entry["shape_mismatch"] == []
    assert result["summary"]["compared"] == 2 and result["summary"]["within_goal"] == 2
    assert result["summary"]["max_abs_deviation"] == pytest.approx(20 / 19.5 - 1, abs=1e-4)


def test_repeats_give_per_repeat_and_median_ratios(tmp_path):
    write_harness_run(tmp_path, "auto", SCENARIO, harness_records([100, 100, 100, 100], 20.0, 33, 128))
    bench_dir = tmp_path / "vllm-bench" / "auto"
    vllm_bench_result(bench_dir / "short_decode.json", ttfts_ms=[100] * 4, tpot_ms=25.0, scenario=SCENARIO)
    # repeat 2: the harness's latency.csv of its own run dir (as bench_session.py keeps it) + vllm bench .rep2
    rep_run = tmp_path.parent / "rep2-run"
    write_harness_run(rep_run, "auto", SCENARIO, harness_records([100, 100, 100, 100], 20.0, 33, 128))
    (tmp_path / "fidelity-reps" / "auto").mkdir(parents=True)
    (tmp_path / "fidelity-reps" / "auto" / "short_decode.rep2.csv").write_text((rep_run / "latency.csv").read_text())
    vllm_bench_result(bench_dir / "short_decode.rep2.json", ttfts_ms=[100] * 4, tpot_ms=20.2, scenario=SCENARIO)
    result = fidelity.fidelity(tmp_path)
    (entry,) = result["scenarios"]
    assert [r["repeat"] for r in entry["repeats"]] == [1, 2]
    assert entry["tpot"]["per_repeat_ratio"] == [pytest.approx(0.8, abs=1e-4), pytest.approx(20 / 20.2, abs=1e-4)]
    assert entry["tpot"]["median_ratio"] == pytest.approx((0.8 + 20 / 20.2) / 2, abs=1e-4)
    assert entry["tpot"]["vllm_bench_p50_ms"] == pytest.approx(22.6)  # median of the tool's two p50s
    assert not entry["tpot"]["within_goal"] and entry["ttft"]["within_goal"]
    assert result["summary"]["repeats"] == {"auto/short_decode": 2}
    assert "continuous_usage_stats" in " ".join(result["definitions"]["differences"])


def test_outside_goal_and_shape_mismatch_are_reported(tmp_path):
    write_harness_run(tmp_path, "turboquant_4bit_nc", SCENARIO, harness_records([100, 100, 100, 100], 20.0, 33, 128))
    other_shape = {**SCENARIO, "input_len": 120}
    vllm_bench_result(tmp_path / "vllm-bench" / "turboquant_4bit_nc" / "short_decode.json",
                      ttfts_ms=[90, 90, 90, 90], tpot_ms=20.0, scenario=other_shape)
    result = fidelity.fidelity(tmp_path)
    (entry,) = result["scenarios"]
    assert entry["ttft"]["ratio"] == pytest.approx(100 / 90, abs=1e-4) and not entry["ttft"]["within_goal"]
    assert entry["tpot"]["within_goal"]
    assert entry["shape_mismatch"] == ["input_len"]
    assert result["summary"]["shape_mismatches"] == ["turboquant_4bit_nc/short_decode"]


def test_missing_inputs_give_one_clear_error(tmp_path, capsys):
    assert fidelity.main([str(tmp_path)]) == 2
    assert "latency.csv" in capsys.readouterr().err
    write_harness_run(tmp_path, "auto", SCENARIO, harness_records([100, 110], 20.0, 33, 128))
    bad = tmp_path / "vllm-bench" / "auto" / "short_decode.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"completed": 2, "median_ttft_ms": 1.0}))
    assert fidelity.main([str(tmp_path)]) == 2
    assert "median_tpot_ms" in capsys.readouterr().err
    bad.unlink()
    assert fidelity.fidelity(tmp_path)["without_vllm_bench_result"] == ["auto/short_decode"]


def test_session_commands_use_only_vllm_0_26_0_flags(tmp_path):
    tree = vllm_cli.pristine_tree()
    if tree is None:
        pytest.fail("unpacked vLLM 0.26.0 wheel not found: run `make patches-pristine` or set TQ_VLLM_PRISTINE")
    config = yaml.safe_load(bench_session.CONFIG.read_text())
    bench_known = vllm_cli.bench_serve_options(tree)
    for scenario in config["latency"]["scenarios"]:
        argv = bench_session.vllm_bench_argv("python3", scenario, base_url="http://127.0.0.1:1", tokenizer=tmp_path,
                                             dtype="auto", seed=0, num_warmups=2, result_dir=tmp_path)
        assert [f for f in vllm_cli.flags(argv) if f not in bench_known] == []
        values = dict(zip(argv, argv[1:]))
        assert values["--random-input-len"] == str(scenario["input_len"])
        assert values["--random-output-len"] == str(scenario["output_len"])
        assert values["--num-prompts"] == str(scenario["num_prompts"])
        assert values["--max-concurrency"] == str(scenario["concurrency"])
        assert values["--request-rate"] == "inf" and "--ignore-eos" in argv
    serve_known = vllm_cli.serve_options(tree)
    for dtype in config["kv_cache_dtypes"]:
        argv = bench_session.server_argv("python3", tmp_path, dtype, 8000, flashinfer=False, enforce_eager=True)
        assert [f for f in vllm_cli.flags(argv) if f not in serve_known] == []


def test_gpu_bench_config_is_valid_and_fits_one_device_call_per_dtype():
    from tqconfig.bench import load_bench_config

    config = load_bench_config(bench_session.CONFIG)
    assert config.kv_cache_dtypes == ["auto", "turboquant_4bit_nc"] and "quality" not in config.parts
    quality = load_bench_config(bench_session.QUALITY_CONFIG)
    assert quality.parts == ["quality"] and quality.kv_cache_dtypes == config.kv_cache_dtypes
    # SmolLM2's max length is 8192: every NIAH probe plus its answer fits
    settings = quality.part_settings("quality")
    assert max(settings["niah"]["context_lengths"]) + 32 <= 8192
    # every latency scenario's requests fit the 6 GiB KV budget at once (no preemption skews either tool)
    import tqconfig

    model, hardware = tqconfig.load_model("qwen3.6-27b"), tqconfig.load_hardware("rtx5060ti-x4")
    for scenario in config.latency.scenarios:
        plan = tqconfig.plan_capacity(model, hardware, kv_cache_dtype="auto",
                                      max_model_len=scenario.input_len + scenario.output_len,
                                      gpu_memory_utilization=0.9, tensor_parallel_size=1, max_num_seqs=64,
                                      max_num_batched_tokens=8192, kv_cache_memory_bytes=bench_session.KV_CACHE_MEMORY_BYTES)
        assert plan.max_concurrency >= scenario.concurrency, scenario.name
