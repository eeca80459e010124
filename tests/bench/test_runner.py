"""The matrix runner against real servers: resume, failures, launched servers, Ctrl-C, clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from tqconfig.bench import load_bench_config

from tqbench.context import Endpoint
from tqbench.records import read_jsonl
from tqbench.runner import open_failures, run_matrix
from tqbench.servers import EndpointTarget, LaunchTarget, ServerError, check_endpoint, is_healthy

REPO = Path(__file__).resolve().parents[2]


def latency_only(**scenario):
    config = load_bench_config("ci").select(parts=["latency"], scenarios=["short_decode"])
    if scenario:
        latency = config.latency.model_copy(update={"scenarios": [config.latency.scenarios[0].model_copy(update=scenario)]})
        config = config.model_copy(update={"latency": latency})
    return config


def test_run_then_resume_skips_finished_cells(vllm_cpu_server, tmp_path):
    config = latency_only()
    first = run_matrix(config, EndpointTarget(vllm_cpu_server), tmp_path)
    assert first.ok and first.done == [("auto", "latency")]
    raw = tmp_path / "raw" / "latency" / "auto" / "short_decode" / "requests.jsonl"
    lines_before = raw.read_text()
    assert len(lines_before.splitlines()) == 6 + 1  # num_prompts + warm-up

    second = run_matrix(config, EndpointTarget(vllm_cpu_server), tmp_path)
    assert second.ok and second.done == [] and second.skipped == [("auto", "latency")]
    assert raw.read_text() == lines_before  # nothing re-sent
    run_info = json.loads((tmp_path / "run.json").read_text())
    assert len(run_info["invocations"]) == 2
    server_facts = json.loads((tmp_path / "raw" / "server" / "auto.json").read_text())
    assert server_facts["cache_config_info"]["cache_dtype"] == "auto" and server_facts["vllm_version"]
    assert (tmp_path / "report.md").exists()


def test_unreachable_endpoint_is_a_recorded_failure(tmp_path):
    dead = Endpoint("http://127.0.0.1:9", "tiny-qwen3")
    with pytest.raises(ServerError, match="cannot reach the server at http://127.0.0.1:9"):
        check_endpoint(dead)
    result = run_matrix(latency_only(), EndpointTarget(dead), tmp_path)
    assert not result.ok and result.failed[0][:2] == ("auto", "latency")
    failures = open_failures(tmp_path)
    assert failures[0]["kind"] == "server_error" and "cannot reach" in failures[0]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "**FAIL** `auto`" in report and "_No latency data" in report


def test_server_that_exits_at_start_is_recorded_with_its_log(tmp_path):
    script = "import sys; print('fake startup failure for', sys.argv[1]); sys.exit(3)"
    target = LaunchTarget(lambda kv: [sys.executable, "-c", script, kv], "http://127.0.0.1:9", "m",
                          health_timeout_s=30)
    config = load_bench_config("ci").select(kv_cache_dtypes=["auto", "turboquant_4bit_nc"], parts=["latency"])
    result = run_matrix(config, target, tmp_path)
    assert [f[:2] for f in result.failed] == [("auto", "latency"), ("turboquant_4bit_nc", "latency")]
    assert "exited with code 3" in result.failed[1][2]
    assert "fake startup failure for turboquant_4bit_nc" in (tmp_path / "logs" / "server-turboquant_4bit_nc.log").read_text()


def bench_conftest(request):
    """tests/bench/conftest.py as loaded by pytest (its server recipe: python, model, arguments)."""
    for plugin in request.config.pluginmanager.get_plugins():
        if hasattr(plugin, "VLLMCPU_PYTHON") and hasattr(plugin, "SERVER_ARGS"):
            return plugin
    pytest.fail("tests/bench/conftest.py (vllm-cpu server recipe) is not loaded")


def _kill_server_when(requests: Path, lines: int, port: int, deadline_s: float = 600) -> None:
    """Kill the launched server's process group (started by the runner under test) mid-scenario."""
    import psutil

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if requests.exists() and len(requests.read_text().splitlines()) >= lines:
            for proc in psutil.process_iter(["cmdline"]):
                cmdline = proc.info["cmdline"] or []
                if "--port" in cmdline and str(port) in cmdline and "--kv-cache-dtype" in cmdline:
                    os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
                    return
        time.sleep(0.2)


def test_launches_a_server_per_dtype_and_survives_one_dying(tmp_path, request):
    """Launch path with real vllm-cpu servers: one per dtype, logged and stopped; the second is
    killed mid-scenario, which is recorded while the first dtype's results stay in the report."""
    recipe = bench_conftest(request)
    recipe._require_env()
    port = recipe.free_port()
    argv = [str(recipe.VLLMCPU_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(recipe.TINY_MODEL),
            "--served-model-name", recipe.SERVED_NAME, "--load-format", "dummy", "--host", "127.0.0.1",
            "--port", str(port), *recipe.SERVER_ARGS]
    target = LaunchTarget(lambda kv: [*argv, "--kv-cache-dtype", kv], f"http://127.0.0.1:{port}", recipe.SERVED_NAME,
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
                          health_timeout_s=300)
    config = latency_only(num_prompts=24, output_len=32, concurrency=2).select(kv_cache_dtypes=["auto", "bfloat16"])
    doomed = tmp_path / "raw" / "latency" / "bfloat16" / "short_decode" / "requests.jsonl"
    killer = threading.Thread(target=_kill_server_when, args=(doomed, 4, port), daemon=True)
    killer.start()
    result = run_matrix(config, target, tmp_path)
    killer.join(timeout=5)

    assert result.done == [("auto", "latency")]
    assert [f[:2] for f in result.failed] == [("bfloat16", "latency")]
    assert "/health" in result.failed[0][2] or "failed" in result.failed[0][2]
    for dtype in ("auto", "bfloat16"):
        log = (tmp_path / "logs" / f"server-{dtype}.log").read_text()
        assert f"--kv-cache-dtype {dtype}" in log and "Application startup complete" in log
    assert not is_healthy(f"http://127.0.0.1:{port}", timeout_s=3)  # nothing left running
    assert 4 <= len(doomed.read_text().splitlines()) and not (doomed.parent / "DONE").exists()
    latency = pd.read_csv(tmp_path / "latency.csv")
    assert list(latency["kv_cache_dtype"]) == ["auto"]  # only finished scenarios are tabled
    report = (tmp_path / "report.md").read_text()
    assert "Unfinished cells" in report and "`bfloat16` / latency: part_error" in report


def test_ctrl_c_leaves_a_partial_valid_report(vllm_cpu_server, tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "tqbench.cli", "run", "--config", "ci", "--endpoint", vllm_cpu_server.base_url,
            "--model", vllm_cpu_server.model, "--parts", "latency", "--run-dir", str(run_dir)]
    # a long scenario so that the interrupt lands mid-run
    config = load_bench_config("ci").model_dump(mode="json")
    config["latency"]["scenarios"] = [{"name": "long", "input_len": 32, "output_len": 64, "num_prompts": 400,
                                       "concurrency": 2}]
    config_path = tmp_path / "long.yaml"
    config_path.write_text(json.dumps(config))  # JSON is valid YAML
    argv[argv.index("ci")] = str(config_path)
    # A shell that starts a job in the background without job control (nohup ... &, some CI runners) sets SIGINT
    # to "ignore", and a Python child then never sees Ctrl-C: give the runner the default disposition, as a
    # terminal would.
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    requests = run_dir / "raw" / "latency" / "auto" / "long" / "requests.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not requests.exists() or len(requests.read_text().splitlines()) < 4):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t_signal = time.monotonic()
    try:  # a liveness bound, not a speed target: it exits within a second on an idle machine
        output = proc.communicate(timeout=300)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        tail = proc.communicate()[0].decode(errors="replace")[-3000:]
        pytest.fail(f"tqbench did not exit within 300 s of Ctrl-C; its output ends with:\n{tail}")
    print(f"exited {time.monotonic() - t_signal:.1f} s after Ctrl-C")
    assert proc.returncode == 130, output
    failures = list(read_jsonl(run_dir / "raw" / "failures.jsonl"))
    assert failures and failures[-1]["kind"] in ("interrupted", "part_error")
    assert any(f["kind"] == "interrupted" for f in failures)
    report = (run_dir / "report.md").read_text()
    assert "Unfinished cells" in report and "## 3. PERFORMANCE" in report
    assert (run_dir / "manifest.json").exists()
    kept = [r for r in read_jsonl(requests)]
    assert 4 <= len(kept) < 401  # what was measured before the interrupt is kept


def test_cli_errors_are_one_clear_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tqbench.cli", *args], cwd=REPO, capture_output=True, text=True)

    unreachable = cli("run", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--kv", "auto")
    assert unreachable.returncode == 2 and "cannot reach the server at http://127.0.0.1:9" in unreachable.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkv_cache_dtypes: [auto, turboquant_5bit]\nparts: [capacity]\n")
    wrong_dtype = cli("run", "--config", str(bad), "--endpoint", "http://127.0.0.1:9", "--model", "m", "--kv", "auto")
    assert wrong_dtype.returncode == 2
    assert "field 'kv_cache_dtypes'" in wrong_dtype.stderr and "turboquant_4bit_nc" in wrong_dtype.stderr
    no_target = cli("run", "--config", "ci")
    assert no_target.returncode == 2 and "exactly one target" in no_target.stderr
    bad_part = cli("run", "--config", "ci", "--parts", "latency,speed", "--endpoint", "http://127.0.0.1:9", "--model", "m")
    assert bad_part.returncode == 2 and "'parts.1'" in bad_part.stderr
    not_a_run = cli("report", str(tmp_path))
    assert not_a_run.returncode == 2 and "not a tqbench run directory" in not_a_run.stderr


def test_bad_long_context_and_probe_settings_name_the_field(tmp_path):
    from tqconfig.bench import BenchConfigError, load_bench_config

    from tqbench.runner import validate_part_settings

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkv_cache_dtypes: [auto]\nparts: [latency]\nlatency:\n  scenarios:\n"
                   "    - {name: lc, input_len: 32768, output_len: 256, num_prompts: 1, concurrency: 1, when_too_long: drop}\n")
    with pytest.raises(BenchConfigError, match=r"field 'latency\.scenarios\.0\.when_too_long'.*'fail' or 'skip'"):
        load_bench_config(bad)
    config = load_bench_config("ci").model_dump()
    config["capacity"] = {"probe_context_lens": [1024, "max_len"]}
    bad.write_text(__import__("yaml").safe_dump(config))
    with pytest.raises(ValueError, match=r"capacity\.probe_context_lens: .*>= 64 tokens or 'max_model_len', got \['max_len'\]"):
        validate_part_settings(load_bench_config(bad))
