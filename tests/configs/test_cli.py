"""The tqconfig CLI and the make targets users type."""
from __future__ import annotations

import json
import subprocess

from typer.testing import CliRunner

import tqconfig
from tqconfig.cli import app

from conftest import REPO

runner = CliRunner()


def test_list_shows_every_stack():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in tqconfig.list_stacks():
        assert name in result.stdout


def test_show_json_has_serve_args():
    result = runner.invoke(app, ["show", "rtx5060ti-x4-gemma4-31b", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["serve_args"][0] == "RedHatAI/gemma-4-31B-it-FP8-block"
    assert info["environment"]["NCCL_P2P_DISABLE"] == "1"


def test_plan_prints_table_and_exits_zero_when_it_fits():
    result = runner.invoke(app, ["plan", "rtx3090-x1-qwen3.6-27b", "--layers"])
    assert result.exit_code == 0, result.output
    assert "max concurrency" in result.stdout and "P6" in result.stdout and "yes" in result.stdout
    assert "TurboQuant recent window (the newest 128 tokens" in " ".join(result.stdout.split())


def test_plan_exits_one_when_it_does_not_fit():
    result = runner.invoke(app, ["plan", "rtx5060ti-x4-gemma4-31b", "--kv-cache-dtype", "auto"])
    assert result.exit_code == 1 and "NO" in result.stdout


def test_plan_json_round_trips():
    result = runner.invoke(app, ["plan", "arc-b70-gemma4-e4b", "--json"])
    assert result.exit_code == 0
    plan = tqconfig.CapacityPlan.model_validate_json(result.stdout)
    assert plan.turboquant_layers == [11, 17]  # boundary 1 (0011): cache-owning full layers 5 and 23 stay bf16
    assert plan.turboquant_boundary_layers == 1
    assert plan.turboquant_recent_window_bytes == 2 * 2 * (4 * 512 + 8) * 16 * 128  # 2 layers, 2 heads, 16 seqs


def test_plan_takes_another_boundary_setting():
    result = runner.invoke(app, ["plan", "arc-b70-gemma4-e4b", "--json", "--turboquant-boundary-layers", "0"])
    assert result.exit_code == 0
    plan = tqconfig.CapacityPlan.model_validate_json(result.stdout)
    assert plan.turboquant_layers == [5, 11, 17, 23] and plan.turboquant_boundary_layers == 0
    bad = runner.invoke(app, ["plan", "arc-b70-gemma4-e4b", "--turboquant-boundary-layers", "-1"])
    assert bad.exit_code == 2 and "turboquant_boundary_layers" in bad.output and "non-negative" in bad.output


def test_plan_refuses_k8v4_on_3090():
    result = runner.invoke(app, ["plan", "rtx3090-x1-gemma4-e4b", "--kv-cache-dtype", "turboquant_k8v4"])
    assert result.exit_code == 2 and "refused on rtx3090-x1" in result.output


def test_render_compose_check_passes_on_committed_files():
    result = runner.invoke(app, ["render-compose", "--check"])
    assert result.exit_code == 0, result.output


def test_preflight_plans_the_env_boundary_setting(tmp_path):
    env = tmp_path / ".env"
    env.write_text("TQ_KV_BOUNDARY_LAYERS=0\n")
    result = runner.invoke(app, ["preflight", "rtx5060ti-x4-gemma4-31b", "--env-file", str(env)])
    default = runner.invoke(app, ["preflight", "rtx5060ti-x4-gemma4-31b", "--env-file", str(tmp_path / "none")])
    assert result.exit_code == 0 and default.exit_code == 0
    assert "2.42x" in result.output and "1.72x" in default.output


def test_preflight_rejects_bad_env_dtype(tmp_path):
    env = tmp_path / ".env"
    env.write_text("TQ_KV_CACHE_DTYPE=turboquant_k8v4\n")
    result = runner.invoke(app, ["preflight", "rtx3090-x2-qwen3.6-27b", "--env-file", str(env)])
    assert result.exit_code == 2 and "turboquant_k8v4" in result.output and "sm_86" in result.output


def test_make_up_with_unknown_stack_prints_valid_names():
    result = subprocess.run(["make", "-s", "up", "STACK=rtx4090-nope"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "unknown stack 'rtx4090-nope'" in result.stderr
    assert "rtx3090-x1-qwen3.6-27b" in result.stderr


def test_make_up_without_stack_prints_valid_names():
    result = subprocess.run(["make", "-s", "up"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "STACK is not set" in result.stderr and "arc-b70-gemma4-e4b" in result.stderr
