"""`tqbench merge`: run directories measured in parallel (one KV dtype per GPU) become one report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from tqconfig.bench import load_bench_config

from tqbench.merge import MergeError, merge_runs
from tqbench.report import build_report
from tqbench.runner import run_matrix
from tqbench.servers import EndpointTarget


@pytest.fixture(scope="module")
def two_lanes(vllm_cpu_server, tmp_path_factory) -> tuple[Path, Path]:
    """A real latency run, and a copy of it relabelled as the other dtype (the second GPU's lane)."""
    lane_a = tmp_path_factory.mktemp("lane-auto")
    config = load_bench_config("ci").select(parts=["latency"], scenarios=["short_decode"])
    result = run_matrix(config, EndpointTarget(vllm_cpu_server), lane_a,
                        extra_info={"model": vllm_cpu_server.model, "base_url": vllm_cpu_server.base_url})
    assert result.ok, result.failed
    lane_b = tmp_path_factory.mktemp("lane-tq") / "run"
    shutil.copytree(lane_a, lane_b)
    shutil.move(lane_b / "raw" / "latency" / "auto", lane_b / "raw" / "latency" / "turboquant_4bit_nc")
    info = json.loads((lane_b / "run.json").read_text())
    info["config"]["kv_cache_dtypes"] = ["turboquant_4bit_nc"]
    (lane_b / "run.json").write_text(json.dumps(info))
    return lane_a, lane_b


def test_merge_builds_one_report_with_both_lanes(two_lanes, tmp_path):
    lane_a, lane_b = two_lanes
    merged = tmp_path / "merged"
    result = merge_runs(merged, [lane_a, lane_b])
    assert sorted(result["copied"]) == ["raw/latency/auto/short_decode", "raw/latency/turboquant_4bit_nc/short_decode"]
    build_report(merged)
    table = pd.read_csv(merged / "latency.csv")
    assert list(table["kv_cache_dtype"]) == ["auto", "turboquant_4bit_nc"]
    source = pd.read_csv(lane_a / "latency.csv").iloc[0]
    for _, row in table.iterrows():  # the merge moves measurements, it never changes them
        assert row["ttft_ms_p50"] == pytest.approx(source["ttft_ms_p50"])
    info = json.loads((merged / "run.json").read_text())
    assert info["config"]["kv_cache_dtypes"] == ["auto", "turboquant_4bit_nc"]
    assert len(info["invocations"]) == 2 and "part_models" not in info
    assert "`turboquant_4bit_nc`" in (merged / "report.md").read_text()


def test_merge_refuses_a_cell_finished_twice(two_lanes, tmp_path):
    lane_a, _ = two_lanes
    with pytest.raises(MergeError, match="raw/latency/auto/short_decode is finished"):
        merge_runs(tmp_path / "merged", [lane_a, lane_a])


def test_merge_records_the_model_of_a_part_measured_elsewhere(two_lanes, tmp_path):
    lane_a, lane_b = two_lanes
    other = tmp_path / "quality-lane"
    shutil.copytree(lane_b, other)
    info = json.loads((other / "run.json").read_text())
    info.update(model="smollm2-135m")
    info["config"]["parts"] = ["quality"]
    (other / "run.json").write_text(json.dumps(info))
    merge_runs(tmp_path / "merged", [lane_a, other])
    merged = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert merged["part_models"] == {"quality": "smollm2-135m"}
    build_report(tmp_path / "merged")
    assert "Model for this section: `smollm2-135m`" in (tmp_path / "merged" / "report.md").read_text()


def test_merge_names_a_source_that_is_not_a_run(tmp_path):
    with pytest.raises(MergeError, match="no run.json"):
        merge_runs(tmp_path / "merged", [tmp_path])
