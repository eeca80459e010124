"""compose/: committed files equal the rendered ones, and the real docker compose v2 binary accepts them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

import tqconfig
from tqconfig import compose

from conftest import REPO

STACKS = tqconfig.list_stacks()


def _compose(binary: Path, *args: str, cwd: Path | None = None, env_file: Path | None = None) -> subprocess.CompletedProcess:
    command = [str(binary)]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/home/tester"})


def test_committed_compose_files_equal_rendered():
    assert compose.stale_files() == []


@pytest.mark.parametrize("stack", STACKS)
def test_compose_file_passes_docker_compose_config(compose_binary, stack):
    result = _compose(compose_binary, "-f", str(REPO / "compose" / f"{stack}.yaml"), "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("stack", STACKS)
def test_resolved_compose_matches_stack(compose_binary, stack):
    s = tqconfig.load_stack(stack)
    result = _compose(compose_binary, "-f", str(REPO / "compose" / f"{stack}.yaml"), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["vllm"]
    assert service["command"] == s.serve_args(host="0.0.0.0", port=8000)  # defaults == the configs
    assert service["image"] == s.hardware.image
    assert service["build"]["dockerfile"] == s.hardware.dockerfile
    assert service["ipc"] == "host"
    assert service["ports"][0]["host_ip"] == "127.0.0.1" and service["ports"][0]["target"] == 8000
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["environment"]["VLLM_PLUGINS"] == s.environment()["VLLM_PLUGINS"]
    targets = {v["target"] for v in service["volumes"]}
    assert {"/home/vllm/.cache/huggingface", "/home/vllm/.cache/vllm", "/home/vllm/.cache/triton"} <= targets
    if s.hardware.vendor == "nvidia":
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": s.serving.tensor_parallel_size, "capabilities": ["gpu"]}]
    else:
        assert service["devices"][0]["source"] == "/dev/dri"


def test_env_file_knobs_reach_the_command(compose_binary, tmp_path):
    env = tmp_path / "tq.env"
    env.write_text("TQ_KV_CACHE_DTYPE=turboquant_3bit_nc\nTQ_MAX_MODEL_LEN=65536\nTQ_PORT=9001\n"
                   "TQ_BIND=0.0.0.0\nVLLM_API_KEY=secret\nNCCL_P2P_DISABLE=0\nTQ_HF_CACHE=/srv/hf\n"
                   "TQ_KV_BOUNDARY_LAYERS=3\n")
    result = _compose(compose_binary, "-f", str(REPO / "compose" / "rtx3090-x2-qwen3.6-27b.yaml"),
                      "config", "--format", "json", env_file=env)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["vllm"]
    command = service["command"]
    assert command[command.index("--kv-cache-dtype") + 1] == "turboquant_3bit_nc"
    assert command[command.index("--max-model-len") + 1] == "65536"
    assert command[command.index("--turboquant-boundary-layers") + 1] == "3"
    assert service["ports"][0]["published"] == "9001" and service["ports"][0]["host_ip"] == "0.0.0.0"
    assert service["environment"]["VLLM_API_KEY"] == "secret"
    assert service["environment"]["NCCL_P2P_DISABLE"] == "0"
    assert any(v["source"] == "/srv/hf" for v in service["volumes"])


def test_env_example_is_all_comments_or_known_knobs():
    knobs = set()
    for line in (REPO / "compose" / ".env.example").read_text().splitlines():
        if line.startswith("#") and "=" in line and line[1:2].isupper():
            knobs.add(line[1:].split("=", 1)[0])
    rendered = "".join(compose.render(tqconfig.load_stack(s)) for s in STACKS)
    for knob in knobs:
        assert "${" + knob in rendered, f"{knob} in .env.example is not used by any compose file"


def test_compose_binary_rejects_a_broken_file(compose_binary, tmp_path):
    """Negative control: the validator is real, a wrong type fails."""
    broken = yaml.safe_load((REPO / "compose" / "rtx3090-x1-gemma4-e4b.yaml").read_text())
    broken["services"]["vllm"]["ports"] = "8000:8000"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = _compose(compose_binary, "-f", str(path), "config", "-q")
    assert result.returncode != 0 and "ports" in result.stderr


def test_stale_compose_file_is_detected(config_tree, tmp_path):
    stack_file = config_tree / "stacks" / "rtx3090-x1-gemma4-e4b.yaml"
    stack_file.write_text(stack_file.read_text().replace("max_num_seqs: 8", "max_num_seqs: 6"))
    (tmp_path / "compose").mkdir()
    for path in (REPO / "compose").glob("*.yaml"):
        (tmp_path / "compose" / path.name).write_text(path.read_text())
    assert compose.stale_files() == ["rtx3090-x1-gemma4-e4b.yaml: differs from the configs"]
