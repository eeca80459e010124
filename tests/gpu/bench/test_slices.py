"""CPU checks of the sliced complete run (bench_session.py --slice, gpu-complete.yaml, assemble.py): the slices
cover the matrix once, their server and client flags exist in vLLM 0.26.0, the capacity slice's KV pool admits a
request at its probe length (tqconfig's planner), and assemble.py merges slices measured in different runs into
one report and fidelity.json with tqbench's own merge, report and fidelity code, refusing a cell measured twice."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "stacks")]

import assemble  # noqa: E402
import bench_session  # noqa: E402
import vllm_cli  # noqa: E402
from test_fidelity import harness_records, vllm_bench_result, write_harness_run  # noqa: E402
from tqbench.context import Endpoint  # noqa: E402
from tqbench.runner import write_run_info  # noqa: E402
from tqbench.servers import EndpointTarget  # noqa: E402
from tqconfig.bench import load_bench_config  # noqa: E402


def complete() -> dict:
    return yaml.safe_load(bench_session.COMPLETE_CONFIG.read_text())


def test_slices_cover_every_scenario_once_and_capacity_once():
    config = load_bench_config(bench_session.COMPLETE_CONFIG)  # the harness's own validation
    assert config.kv_cache_dtypes == ["auto", "turboquant_k8v4", "turboquant_4bit_nc"]
    names = [s.name for s in config.latency.scenarios]
    sliced = [name for chosen in bench_session.SLICES.values() for name in chosen.scenarios]
    assert sorted(sliced) == sorted(names) and len(sliced) == len(set(sliced))
    assert [n for n, s in bench_session.SLICES.items() if "capacity" in s.parts] == ["capacity"]
    # the five named scenarios and the long-context ones of configs/bench/default.yaml, same ISL/OSL/C
    default = {s.name: s for s in load_bench_config("default").latency.scenarios}
    assert set(names) == set(default)
    for scenario in config.latency.scenarios:
        base = default[scenario.name]
        assert (scenario.input_len, scenario.output_len, scenario.concurrency) == \
            (base.input_len, base.output_len, base.concurrency), scenario.name
        assert scenario.num_prompts % scenario.concurrency == 0  # whole closed-loop waves
    from tqbench.capacity import CapacitySettings

    CapacitySettings(**config.part_settings("capacity"))


def test_quality_beside_each_model_fits_its_quality_model():
    """Every NIAH probe plus its answer fits the quality model's --max-model-len; the config is the harness's."""
    for name, (folder, config_path, server_args) in bench_session.QUALITY.items():
        quality = load_bench_config(config_path)
        assert quality.parts == ["quality"], name
        max_len = int(server_args.split("--max-model-len ")[1].split()[0])
        assert max(quality.part_settings("quality")["niah"]["context_lengths"]) + 32 <= max_len, name
        assert folder.name == name
    gemma = load_bench_config(bench_session.QUALITY["gemma3-270m"][1]).part_settings("quality")
    assert max(gemma["niah"]["context_lengths"]) >= 30_000  # long context on the head_dim-256 path


@pytest.mark.parametrize("model", sorted(bench_session.MODELS))
def test_slice_commands_use_only_vllm_0_26_0_flags(model, tmp_path):
    tree = vllm_cli.pristine_tree()
    if tree is None:
        pytest.fail("unpacked vLLM 0.26.0 wheel not found: run `make patches-pristine` or set TQ_VLLM_PRISTINE")
    serve_known, bench_known = vllm_cli.serve_options(tree), vllm_cli.bench_serve_options(tree)
    for name in bench_session.SLICES:
        args = bench_session.slice_server_args(bench_session.MODELS[model], name)
        argv = bench_session.server_argv("python3", tmp_path, "turboquant_4bit_nc", 8000, flashinfer=False,
                                         enforce_eager=False, server_args=args, served_name=model)
        assert [f for f in vllm_cli.flags(argv) if f not in serve_known] == [], name
        values = dict(zip(argv, argv[1:]))
        assert values["--served-model-name"] == model
        if name == "capacity":
            assert "--kv-cache-memory-bytes" in values and "--gpu-memory-utilization" not in values
        else:  # decode CUDA graphs, without torch.compile, and room for the 128K scenario
            assert json.loads(values["--compilation-config"]) == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
            assert int(values["--max-model-len"]) >= 130816 + 256
    for scenario in complete()["latency"]["scenarios"]:
        argv = bench_session.vllm_bench_argv("python3", scenario, base_url="http://127.0.0.1:1", tokenizer=tmp_path,
                                             dtype="auto", seed=0, num_warmups=2, result_dir=tmp_path, served_name=model)
        assert [f for f in vllm_cli.flags(argv) if f not in bench_known] == []
        assert dict(zip(argv, argv[1:]))["--model"] == model


@pytest.mark.parametrize("model,profile", [("qwen3.6-27b", "qwen3.6-27b"), ("gemma-4-31b", "gemma4-31b")])
def test_capacity_pool_admits_a_request_at_its_probe_length(model, profile):
    import tqconfig

    plan = tqconfig.plan_capacity(tqconfig.load_model(profile), tqconfig.load_hardware("rtx5060ti-x4"),
                                  kv_cache_dtype="auto", max_model_len=bench_session.CAPACITY_MAX_MODEL_LEN,
                                  gpu_memory_utilization=0.9, tensor_parallel_size=1, max_num_seqs=64,
                                  max_num_batched_tokens=8192, language_model_only=True,
                                  kv_cache_memory_bytes=bench_session.MODELS[model].capacity_kv_bytes)
    assert plan.max_concurrency >= 1, plan


def resolved(*argv: str) -> argparse.Namespace:
    """bench_session's own parser and slice resolution, as main() runs them."""
    parser = bench_session.build_parser()
    args = parser.parse_args(list(argv))
    bench_session.resolve_slice(parser, args)
    return args


def test_slice_settings_follow_the_slice():
    named = resolved("--model", "gemma-4-31b", "--slice", "named-a", "--enforce-eager")
    assert named.scenarios == ["short_decode", "decode_heavy"] and named.parts == ["latency"]
    assert named.repeats == 3 and named.vllm_bench and not named.enforce_eager
    assert named.quality_model == "" and named.hf_config == "gemma-4-31b-it" and named.served_name == "gemma-4-31b"
    assert named.state == Path("/tmp/tq-bench/gemma-4-31b/named-a")
    assert named.bench_config == bench_session.COMPLETE_CONFIG
    capacity = resolved("--model", "qwen3.6-27b", "--slice", "capacity", "--repeats", "2")
    assert capacity.parts == ["capacity"] and capacity.repeats == 2
    assert capacity.quality_model == "/tmp/tqmodels/hf/smollm2-135m" and capacity.quality_config == bench_session.QUALITY_CONFIG
    gemma = resolved("--model", "gemma-4-31b", "--slice", "capacity")  # Gemma's family beside Gemma 4
    assert gemma.quality_model == "/tmp/tqmodels/hf/gemma3-270m" and gemma.quality_config.name == "gpu-quality-gemma3.yaml"
    assert "--max-model-len 32768" in gemma.quality_server_args
    assert resolved("--model", "gemma-4-31b", "--slice", "capacity", "--quality-model", "").quality_model == ""
    assert not resolved("--model", "qwen3.6-27b", "--slice", "long-128k").vllm_bench
    lane = resolved()  # the two-GPU lane as before
    assert (lane.scenarios, lane.parts, lane.repeats, lane.bench_config) == (None, None, 2, bench_session.CONFIG)
    assert lane.served_name == "qwen3.6-27b" and lane.state == Path("/tmp/tq-bench")
    assert (lane.quality_model, lane.quality_config, lane.quality_server_args) == (
        str(bench_session.QUALITY_MODEL), bench_session.QUALITY_CONFIG, bench_session.QUALITY_SERVER_ARGS)


def test_slice_without_model_and_unknown_slice_are_refused(capsys):
    with pytest.raises(SystemExit):
        resolved("--slice", "named-a")
    assert "--model gemma-4-31b or qwen3.6-27b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_session.main(["--slice", "named-c", "--model", "gemma-4-31b", "--dry-run"])
    assert "invalid choice: 'named-c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_session.main(["--slice", "named-a", "--model", "gemma-4-31b", "--dtypes", "fp8", "--dry-run"])
    assert "not in gpu-complete.yaml kv_cache_dtypes" in capsys.readouterr().err


def scenario(name: str) -> dict:
    shape = next(s for s in complete()["latency"]["scenarios"] if s["name"] == name)
    return {**shape, "request_rate": math.inf, "burstiness": 1.0}


def slice_tarball(root: Path, label: str, model: str, dtype: str, name: str, *, tpot: float, bench_tpot: float,
                  repeat2_tpot: float | None = None) -> Path:
    """A slice's bench-run.tar.gz as bench_session.py packs it: run.json written by the harness's runner,
    latency cell and latency.csv by its records and report code, `vllm bench serve` results beside."""
    run = root / label / "work" / f"2026-12-04-h200-{model}"
    shape = scenario(name)
    config = load_bench_config(bench_session.COMPLETE_CONFIG).select(kv_cache_dtypes=[dtype], parts=["latency"],
                                                                    scenarios=[name])
    run.mkdir(parents=True)
    write_run_info(run, config, EndpointTarget(Endpoint("http://127.0.0.1:8000", model)), {"model": model})
    n, osl = shape["num_prompts"], 9
    write_harness_run(run, dtype, {**shape, "output_len": osl}, harness_records([100.0 + i for i in range(n)], tpot, osl,
                                                                                 shape["input_len"]))
    bench_shape = {**shape, "output_len": osl}
    vllm_bench_result(run / "vllm-bench" / dtype / f"{name}.json", ttfts_ms=[100.0 + i for i in range(n)],
                      tpot_ms=bench_tpot, scenario=bench_shape)
    if repeat2_tpot is not None:  # a second interleaved pair, as the session keeps it
        rep = root / label / "rep2"
        write_harness_run(rep, dtype, {**shape, "output_len": osl},
                          harness_records([100.0 + i for i in range(n)], tpot, osl, shape["input_len"]))
        (run / "fidelity-reps" / dtype).mkdir(parents=True)
        (run / "fidelity-reps" / dtype / f"{name}.rep2.csv").write_text((rep / "latency.csv").read_text())
        vllm_bench_result(run / "vllm-bench" / dtype / f"{name}.rep2.json", ttfts_ms=[100.0 + i for i in range(n)],
                          tpot_ms=repeat2_tpot, scenario=bench_shape)
    (run / "session-skips.jsonl").write_text(json.dumps({"kv_cache_dtype": dtype, "step": "harness x repeat 3",
                                                         "why": "deadline"}) + "\n")
    out = root / label / "out"
    out.mkdir()
    with tarfile.open(out / "bench-run.tar.gz", "w:gz") as tar:
        tar.add(run, arcname=run.name)
    return out / "bench-run.tar.gz"


def test_assemble_merges_slices_from_separate_runs(tmp_path):
    dest = tmp_path / "results" / "2026-12-04-h200-gemma-4-31b"
    first = slice_tarball(tmp_path, "run1", "gemma-4-31b", "auto", "short_decode", tpot=20.0, bench_tpot=20.2,
                          repeat2_tpot=20.4)
    second = slice_tarball(tmp_path, "run2", "gemma-4-31b", "turboquant_4bit_nc", "short_decode", tpot=18.0,
                           bench_tpot=18.0)
    assert assemble.main([str(dest), str(first)]) == 0
    assert assemble.main([str(dest), str(second)]) == 0  # a later session adds its slice
    import pandas as pd

    table = pd.read_csv(dest / "latency.csv")
    assert sorted(table["kv_cache_dtype"]) == ["auto", "turboquant_4bit_nc"]
    tpot = dict(zip(table["kv_cache_dtype"], table["tpot_ms_p50"]))
    assert tpot["auto"] == pytest.approx(20.0) and tpot["turboquant_4bit_nc"] == pytest.approx(18.0)
    result = json.loads((dest / "fidelity.json").read_text())
    entries = {e["kv_cache_dtype"]: e for e in result["scenarios"]}
    assert entries["auto"]["tpot"]["per_repeat_ratio"] == [pytest.approx(20 / 20.2, abs=1e-4),
                                                          pytest.approx(20 / 20.4, abs=1e-4)]
    assert entries["auto"]["tpot"]["ratio_spread"] == pytest.approx(20 / 20.2 - 20 / 20.4, abs=2e-4)
    assert entries["turboquant_4bit_nc"]["tpot"]["median_ratio"] == pytest.approx(1.0)
    skips = [json.loads(line) for line in (dest / "session-skips.jsonl").read_text().splitlines()]
    assert [s["slice"] for s in skips] == ["out/bench-run.tar.gz"] * 2
    report = (dest / "report.md").read_text()
    assert "`turboquant_4bit_nc`" in report
    # the rest of gpu-complete.yaml is named as missing, dtype by dtype
    assert ("Not measured in this run (`session-skips.jsonl` records the steps a GPU session had no time for): "
            "`auto`: decode_heavy, mixed, long_prefill, high_load, long_context_32k_c1, long_context_32k_c8, "
            "long_context_128k_c1; `turboquant_k8v4`: all 8 scenarios; `turboquant_4bit_nc`: decode_heavy,") in report
    info = json.loads((dest / "run.json").read_text())
    assert info["model"] == "gemma-4-31b" and info["config"]["kv_cache_dtypes"] == ["auto", "turboquant_4bit_nc"]


def test_assemble_refuses_a_cell_twice_or_another_model_and_keeps_dest(tmp_path, capsys):
    dest = tmp_path / "results" / "2026-12-04-h200-gemma-4-31b"
    first = slice_tarball(tmp_path, "run1", "gemma-4-31b", "auto", "mixed", tpot=20.0, bench_tpot=20.0)
    assert assemble.main([str(dest), str(first)]) == 0
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    again = slice_tarball(tmp_path, "run2", "gemma-4-31b", "auto", "mixed", tpot=21.0, bench_tpot=21.0)
    assert assemble.main([str(dest), str(again)]) == 2
    assert "raw/latency/auto/mixed is finished" in capsys.readouterr().err
    other = slice_tarball(tmp_path, "run3", "qwen3.6-27b", "turboquant_k8v4", "mixed", tpot=20.0, bench_tpot=20.0)
    assert assemble.main([str(dest), str(other)]) == 2
    assert "measured model 'qwen3.6-27b', but 2026-12-04-h200-gemma-4-31b holds 'gemma-4-31b'" in capsys.readouterr().err
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == before
    assert assemble.main([str(dest), str(tmp_path / "missing.tar.gz")]) == 2
    assert "no such file" in capsys.readouterr().err
