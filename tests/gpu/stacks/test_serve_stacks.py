"""CPU checks of serve_stacks.py: the argv it runs on the GPU host is the stack's own argv from
configs/ (tqconfig) with only the documented host changes, every flag exists in vLLM 0.26.0, the
KV budget is the planner's, and the startup-log parser reads vLLM 0.26.0's own log format."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_stacks  # noqa: E402
import tqconfig  # noqa: E402
import vllm_cli  # noqa: E402

HOST_CHANGES = {"<model>", "--revision", "--load-format", "--kv-cache-memory-bytes", "--tensor-parallel-size",
                "--language-model-only", "--gdn-prefill-backend", "--enforce-eager", "--host", "--port"}
CUDA_STACKS = serve_stacks.cuda_stacks()


def test_cuda_stacks_are_the_nvidia_ones_with_the_tp4_gemma_first():
    nvidia = {n for n in tqconfig.list_stacks() if tqconfig.load_stack(n).hardware.vendor == "nvidia"}
    assert set(CUDA_STACKS) == nvidia and "arc-b70-gemma4-e4b" not in CUDA_STACKS
    assert CUDA_STACKS[0].startswith("rtx5060ti-x4-")  # TP=4 stacks first: the 4-GPU host is scarce


@pytest.mark.parametrize("gpus", [1, 4])
@pytest.mark.parametrize("name", CUDA_STACKS)
def test_run_argv_is_the_stack_argv_plus_explained_host_changes(name, gpus, tmp_path):
    plan = serve_stacks.plan_stack(name, gpus=gpus, model_dir=tmp_path / "m", port=8123, flashinfer=False)
    stack = tqconfig.load_stack(name)
    assert plan.stack_argv == stack.serve_args()
    before = serve_stacks.parse_options(plan.stack_argv[1:])
    after = serve_stacks.parse_options(plan.argv[1:])
    changed = {d["option"] for d in plan.argv_diff}
    assert changed <= HOST_CHANGES, f"unexpected changes {changed - HOST_CHANGES}"
    assert all(d["why"] for d in plan.argv_diff), "every change says why"
    for option, value in before.items():  # everything else is exactly the stack's
        if option not in changed:
            assert after[option] == value, option
    assert plan.argv[0] == str(tmp_path / "m") and "--revision" not in after
    assert after["--load-format"] == "dummy" and after["--port"] == "8123"
    assert after["--kv-cache-dtype"] == stack.serving.kv_cache_dtype
    assert after["--max-model-len"] == str(stack.serving.max_model_len)
    assert after["--language-model-only"] is True
    assert ("--gdn-prefill-backend" in after) == stack.architecture.is_hybrid
    assert plan.environment["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, range(plan.run_tp)))


def test_kv_budget_is_the_planners_per_gpu_budget_scaled_to_the_run_tp(tmp_path):
    stack = tqconfig.load_stack("rtx5060ti-x4-gemma4-31b")
    per_gpu = stack.plan().kv_cache_memory_bytes
    at_tp4 = serve_stacks.plan_stack(stack.name, gpus=4, model_dir=tmp_path, port=1, flashinfer=False)
    assert at_tp4.run_tp == 4 and at_tp4.kv_cache_memory_bytes == per_gpu
    assert serve_stacks.parse_options(at_tp4.argv[1:])["--tensor-parallel-size"] == "4"
    run, card = at_tp4.prediction["run"], at_tp4.prediction["stack_card"]
    # the same plan, except that with the KV memory given (as the run passes it) the recent window's
    # memory comes on top of it instead of out of vLLM's profiled budget
    assert {**run, "reasons": None} == card | {"kv_cache_memory_bytes": per_gpu, "reasons": None}
    window = "TurboQuant recent window"
    assert [r for r in run["reasons"] if not r.startswith(window)] == [
        r for r in card["reasons"] if not r.startswith(window)]
    assert [r.endswith("on top of the given KV-cache memory") for r in run["reasons"] if r.startswith(window)] == [True]
    assert [r.endswith("inside vLLM's memory profile") for r in card["reasons"] if r.startswith(window)] == [True]
    at_tp1 = serve_stacks.plan_stack(stack.name, gpus=1, model_dir=tmp_path, port=1, flashinfer=False)
    assert at_tp1.run_tp == 1 and at_tp1.kv_cache_memory_bytes == per_gpu * 4
    # same total KV memory: the prediction at TP=1 holds about the same tokens as at TP=4
    ratio = at_tp1.prediction["run"]["kv_cache_tokens"] / at_tp4.prediction["run"]["kv_cache_tokens"]
    assert 0.9 < ratio < 1.1


def test_flashinfer_and_eager_and_multimodal_switches(tmp_path):
    plan = serve_stacks.plan_stack("rtx5060ti-x4-qwen3.6-27b", gpus=4, model_dir=tmp_path, port=1, flashinfer=True,
                                   keep_multimodal=True, enforce_eager=True)
    options = serve_stacks.parse_options(plan.argv[1:])
    assert "--gdn-prefill-backend" not in options and "--language-model-only" not in options
    assert options["--enforce-eager"] is True


@pytest.mark.parametrize("name", CUDA_STACKS)
def test_every_flag_exists_in_vllm_0_26_0(name, tmp_path):
    # the stacks serve the patched engine (their --turboquant-boundary-layers comes from patch 0011)
    tree = vllm_cli.patched_tree()
    if tree is None:
        pytest.fail("patched vLLM 0.26.0 tree not found: run `make patches-trees` or set TQ_VLLM_PATCHED")
    known = vllm_cli.serve_options(tree)
    plan = serve_stacks.plan_stack(name, gpus=1, model_dir=tmp_path, port=1, flashinfer=False, enforce_eager=True)
    unknown = [f for f in vllm_cli.flags(plan.argv) if f not in known]
    assert not unknown, f"not vLLM 0.26.0 serve options: {unknown}"
    assert "--not-a-vllm-flag" not in known


def test_server_log_parser_reads_vllm_0_26_0_format():
    tree = vllm_cli.pristine_tree()
    if tree is None:
        pytest.fail("unpacked vLLM 0.26.0 wheel not found: run `make patches-pristine` or set TQ_VLLM_PRISTINE")
    source = (tree / "vllm" / "v1" / "core" / "kv_cache_utils.py").read_text()
    # Render the two log lines with vLLM's own format strings and arguments' formatting.
    size_fmt = re.search(r'"(GPU KV cache size: %s tokens)"', source).group(1)
    concurrency_fmt = re.search(r'"(Maximum concurrency for %s tokens per request: %.2fx)"', source).group(1)
    log = "\n".join([
        "INFO 11-21 10:00:00 [kv_cache_utils.py:1] " + size_fmt % f"{527_063:,}",
        "INFO 11-21 10:00:00 [kv_cache_utils.py:1] " + concurrency_fmt % (f"{262_144:,}", 2.0106),
        "(Worker_TP1) INFO ... " + size_fmt % f"{1:,}",  # TP workers repeat it; the first wins
    ])
    facts = serve_stacks.parse_server_log(log)
    assert facts == {"kv_cache_tokens": 527063, "max_concurrency": 2.01, "concurrency_for_tokens": 262144,
                     "estimated_max_model_len": None}


def test_cache_config_info_from_prometheus_text():
    text = ('# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
            'vllm:cache_config_info{block_size="784",cache_dtype="turboquant_4bit_nc",num_gpu_blocks="1210"} 1.0\n')
    assert serve_stacks.cache_config_info(text) == {"block_size": "784", "cache_dtype": "turboquant_4bit_nc",
                                                    "num_gpu_blocks": "1210"}


def test_argv_diff_names_removed_added_and_changed_options():
    diff = serve_stacks.argv_diff(["m", "--a", "1", "--b", "--c", "x"], ["n", "--a", "2", "--c", "x", "--d"],
                                  {"--a": "why a"})
    assert diff == [
        {"option": "<model>", "stack": "m", "run": "n", "why": ""},
        {"option": "--a", "stack": "1", "run": "2", "why": "why a"},
        {"option": "--b", "stack": True, "run": None, "why": ""},
        {"option": "--d", "stack": None, "run": True, "why": ""},
    ]


def test_unknown_stack_is_refused_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        serve_stacks.main(["--stacks", "rtx9090-x1-nope", "--dry-run"])
    err = capsys.readouterr().err
    assert "rtx9090-x1-nope" in err and "rtx3090-x1-qwen3.6-27b" in err
