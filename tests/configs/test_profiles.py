"""Profiles load into the stable API; bad profiles fail with one error naming file, field and valid values."""
from __future__ import annotations

import json

import pytest
import yaml

import tqconfig

REQUIRED_STACKS = {
    "rtx5060ti-x4-gemma4-31b", "rtx3090-x1-qwen3.6-27b", "rtx3090-x2-qwen3.6-27b",
    "arc-b70-gemma4-e4b", "rtx5060ti-x4-qwen3.6-27b", "rtx3090-x1-gemma4-e4b",
}


def test_required_stacks_exist():
    assert REQUIRED_STACKS <= set(tqconfig.list_stacks())


@pytest.mark.parametrize("name", tqconfig.list_stacks())
def test_stack_api(name):
    stack = tqconfig.load_stack(name)
    argv = stack.serve_args()
    assert argv[0] == stack.model.hf_id  # model first
    assert argv[argv.index("--kv-cache-dtype") + 1] == stack.serving.kv_cache_dtype
    assert argv[argv.index("--max-model-len") + 1] == str(stack.serving.max_model_len)
    # every stack states its TurboQuant boundary protection (patch 0011's engine option)
    assert stack.serving.turboquant_boundary_layers is not None
    assert argv[argv.index("--turboquant-boundary-layers") + 1] == str(stack.serving.turboquant_boundary_layers)
    assert stack.plan().turboquant_boundary_layers == stack.serving.turboquant_boundary_layers
    assert argv[argv.index("--tensor-parallel-size") + 1] == str(stack.serving.tensor_parallel_size)
    assert argv[argv.index("--served-model-name") + 1] == stack.model.served_model_name
    assert json.loads(argv[argv.index("--default-chat-template-kwargs") + 1]) == {"enable_thinking": False}
    env = stack.environment()
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,lora_hf_hub_resolver"  # gate 3 allowlist
    if stack.hardware.gpu_count > 1:
        assert env["NCCL_P2P_DISABLE"] == "1" and "--disable-custom-all-reduce" in argv
    assert isinstance(stack.model, tqconfig.ModelProfile) and isinstance(stack.hardware, tqconfig.Hardware)
    assert stack.served_model_name == stack.model.served_model_name and stack.compose_file.is_file()


def test_serve_args_overrides():
    stack = tqconfig.load_stack("rtx3090-x1-qwen3.6-27b")
    argv = stack.serve_args(kv_cache_dtype="turboquant_3bit_nc", max_model_len=4096, port=8123,
                            gpu_memory_utilization=0.5, enable_prefix_caching=None, enforce_eager=True,
                            model="/models/local")
    assert argv[0] == "/models/local"
    assert argv[argv.index("--kv-cache-dtype") + 1] == "turboquant_3bit_nc"
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv.count("--gpu-memory-utilization") == 1 and argv[argv.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "--enforce-eager" in argv and "--no-enable-prefix-caching" not in argv
    assert "--language-model-only" in argv


def test_turboquant_k8v4_refused_on_rtx3090_by_serve_args():
    stack = tqconfig.load_stack("rtx3090-x2-qwen3.6-27b")
    with pytest.raises(tqconfig.KvCacheDtypeRefused) as info:
        stack.serve_args(kv_cache_dtype="turboquant_k8v4")
    message = str(info.value)
    assert "turboquant_k8v4" in message and "FP8" in message and "sm_86" in message
    assert "turboquant_4bit_nc" in message  # names what is valid


def test_unknown_kv_dtype_names_valid_ones():
    with pytest.raises(tqconfig.KvCacheDtypeRefused, match="Valid on rtx5060ti-x4: auto, fp8, turboquant_k8v4"):
        tqconfig.load_stack("rtx5060ti-x4-gemma4-31b").serve_args(kv_cache_dtype="int4")


def test_unknown_stack_lists_valid_names():
    with pytest.raises(tqconfig.UnknownProfile) as info:
        tqconfig.load_stack("rtx4090-x1-llama")
    assert "rtx3090-x1-qwen3.6-27b" in str(info.value) and "rtx4090-x1-llama" in str(info.value)


def _edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _error(loader, name) -> tqconfig.ProfileError:
    with pytest.raises(tqconfig.ProfileError) as info:
        loader(name)
    return info.value


BAD_STACKS = [
    # (edit, field, words the message must contain)
    (lambda d: d["serving"].update(kv_cache_dtyp="auto"), "serving.kv_cache_dtyp", ["unknown field", "kv_cache_dtype"]),
    (lambda d: d["serving"].update(kv_cache_dtype="int4"), "serving.kv_cache_dtype", ["turboquant_4bit_nc"]),
    (lambda d: d["serving"].update(kv_cache_dtype="turboquant_k8v4"), "serving.kv_cache_dtype", ["sm_86", "refused"]),
    (lambda d: d["serving"].update(tensor_parallel_size=4), "serving.tensor_parallel_size", ["1..1"]),
    (lambda d: d["serving"].update(max_model_len="long"), "serving.max_model_len", ["integer"]),
    (lambda d: d["serving"].pop("max_num_seqs"), "serving.max_num_seqs", ["required"]),
    (lambda d: d.update(hardware="rtx4090-x1"), "hardware", ["rtx3090-x1", "rtx5060ti-x4"]),
    (lambda d: d.update(model="llama-70b"), "model", ["qwen3.6-27b"]),
    (lambda d: d.update(name="other-name"), "name", ["file name"]),
    (lambda d: d["serving"].update(gpu_memory_utilization=1.5), "serving.gpu_memory_utilization", ["0.98"]),
    (lambda d: d["serving"].update(turboquant_boundary_layers=-1), "serving.turboquant_boundary_layers",
     ["greater than or equal to 0"]),
]


@pytest.mark.parametrize("edit,field,words", BAD_STACKS, ids=[b[1] + str(i) for i, b in enumerate(BAD_STACKS)])
def test_bad_stack_profile_gives_one_clear_error(config_tree, edit, field, words):
    path = config_tree / "stacks" / "rtx3090-x1-qwen3.6-27b.yaml"
    _edit(path, edit)
    error = _error(tqconfig.load_stack, "rtx3090-x1-qwen3.6-27b")
    message = str(error)
    assert message.startswith("stacks/rtx3090-x1-qwen3.6-27b.yaml") or "rtx3090-x1-qwen3.6-27b.yaml" in message
    assert error.field == field, message
    for word in words:
        assert word in message, message


BAD_HARDWARE = [
    (lambda d: d.update(vendor="amd"), "vendor", ["'nvidia'", "'intel'"]),
    (lambda d: d.update(arch="ampere"), "arch", ["sm_<NN>"]),
    (lambda d: d.update(gpu_count=0), "gpu_count", ["greater than or equal to 1"]),
    (lambda d: d["defaults"].update(gpu_mem_util=0.9), "defaults.gpu_mem_util", ["gpu_memory_utilization"]),
    (lambda d: d.update(supported_kv_cache_dtypes=["auto", "turboquant_k8v4"]), "(top level)", ["both as supported and as refused"]),
]


@pytest.mark.parametrize("edit,field,words", BAD_HARDWARE, ids=[b[1] for b in BAD_HARDWARE])
def test_bad_hardware_profile_gives_one_clear_error(config_tree, edit, field, words):
    _edit(config_tree / "hardware" / "rtx3090-x1.yaml", edit)
    error = _error(tqconfig.load_hardware, "rtx3090-x1")
    assert error.field == field, str(error)
    assert "hardware/rtx3090-x1.yaml" in str(error)
    for word in words:
        assert word in str(error), str(error)


BAD_MODELS = [
    (lambda d: d.update(revision="main"), "revision", ["pattern"]),
    (lambda d: d.update(hf_config="qwen3-27b"), "hf_config", ["qwen3.6-27b", "gemma-4-31b-it"]),
    (lambda d: d["weights"].pop("sharded_gib"), "weights.sharded_gib", ["required"]),
    (lambda d: d["chat"].update(thinking=False), "chat.thinking", ["default_chat_template_kwargs"]),
]


@pytest.mark.parametrize("edit,field,words", BAD_MODELS, ids=[b[1] for b in BAD_MODELS])
def test_bad_model_profile_gives_one_clear_error(config_tree, edit, field, words):
    _edit(config_tree / "models" / "qwen3.6-27b.yaml", edit)
    error = _error(tqconfig.load_model, "qwen3.6-27b")
    assert error.field == field, str(error)
    assert "models/qwen3.6-27b.yaml" in str(error)
    for word in words:
        assert word in str(error), str(error)


def test_yaml_syntax_error_names_the_file(config_tree):
    (config_tree / "stacks" / "rtx3090-x1-gemma4-e4b.yaml").write_text("serving: [unclosed\n")
    error = _error(tqconfig.load_stack, "rtx3090-x1-gemma4-e4b")
    assert "rtx3090-x1-gemma4-e4b.yaml" in str(error) and "YAML" in str(error)
