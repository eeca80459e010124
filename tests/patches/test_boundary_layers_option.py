"""0011: --turboquant-boundary-layers, boundary protection as an engine option.

Real vLLM 0.26.0 code of the patched tree: the `vllm serve` argument parser (make_arg_parser on a
FlexibleArgumentParser), EngineArgs.from_cli_args and create_engine_config on the full-size configs
(configs/hf) and a Gemma 3 270M config (fixtures/gemma-3-270m). See boundary_option_probe.py for
what runs and what is stubbed. Eligible layers are the cache-owning full-attention layers:
  Gemma 4 31B  5, 11, ..., 59 (50 sliding layers)
  Gemma 3 270M 5, 11, 17 (15 sliding layers)
  Qwen3.6-27B  3, 7, ..., 63 (48 Gated DeltaNet layers)
  Gemma 4 E4B  5, 11, 17, 23 (29, 35, 41 read layer 23's cache: YOCO)
"""
from __future__ import annotations

import os

import pytest
from conftest import REPO, run_in_vllm

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "31b": (os.path.join(REPO, "configs", "hf", "gemma-4-31b-it"), "Gemma4ForCausalLM"),
    "e4b": (os.path.join(REPO, "configs", "hf", "gemma-4-e4b-it"), "Gemma4ForCausalLM"),
    "qwen": (os.path.join(REPO, "configs", "hf", "qwen3.6-27b"), "Qwen3NextForCausalLM"),
    "g3": (os.path.join(HERE, "fixtures", "gemma-3-270m"), "Gemma3ForCausalLM"),
    "tiny": (os.path.join(REPO, "tests", "fixtures", "tiny-configs", "tiny_gemma4"), "Gemma4ForCausalLM"),
}
FULL_31B = list(range(5, 60, 6))
OPTION = "--turboquant-boundary-layers"


def _case(label: str, model: str, n: str | None = None, dtype: str = "turboquant_4bit_nc",
          argv: tuple[str, ...] = (), env: dict | None = None) -> dict:
    config_dir, architecture = CONFIGS[model]
    extra = [*argv] + ([OPTION, n] if n is not None else [])
    return {"label": label, "config_dir": config_dir, "architecture": architecture,
            "kv_cache_dtype": dtype, "argv": extra, "env": env or {}}


CASES = [
    *(_case(f"31b/{n}", "31b", n) for n in ("0", "1", "2", "3", "9")),
    _case("31b/unset", "31b"),
    _case("31b/k3v4-1", "31b", "1", dtype="turboquant_k3v4_nc"),
    _case("31b/1+user-7", "31b", "1", argv=("--kv-cache-dtype-skip-layers", "7")),
    _case("31b/auto-1", "31b", "1", dtype="auto"),
    *(_case(f"g3/{n}", "g3", n) for n in ("0", "1", "2")),
    _case("g3/unset", "g3"),
    *(_case(f"qwen/{n}", "qwen", n, argv=("--mamba-ssm-cache-dtype", "float32")) for n in ("0", "1", "2", "4", "5")),
    *(_case(f"e4b/{n}", "e4b", n) for n in ("0", "1", "2")),
    _case("tiny/unset", "tiny"),
    _case("31b/bad-negative", "31b", "-1"),
    _case("31b/bad-word", "31b", "two"),
    _case("31b/env-1", "31b", env={"TQ_BOUNDARY_LAYERS": "1"}),
    _case("31b/env-bad", "31b", env={"TQ_BOUNDARY_LAYERS": "two"}),
    _case("31b/env-and-option", "31b", "2", env={"TQ_BOUNDARY_LAYERS": "0"}),
]
HELP_QUERIES = ["turboquant-boundary-layers", "CacheConfig"]

_RESULTS: dict[str, dict] = {}


def results(tree) -> dict:
    if str(tree) not in _RESULTS:
        code = (f"import sys; sys.path.insert(0, {HERE!r})\n"
                f"import boundary_option_probe as p\np.main({CASES!r}, {HELP_QUERIES!r})")
        cache_root = os.path.join(REPO, "build", "vllm-kv-probe-cache")
        run = run_in_vllm(tree, code, timeout=1200, env={"VLLM_CACHE_ROOT": cache_root})
        out = run.json()
        out["cases"] = {c["label"]: c for c in out["cases"]}
        _RESULTS[str(tree)] = out
    return _RESULTS[str(tree)]


def _ok(result: dict) -> dict:
    assert result["ok"], result.get("traceback") or result.get("error")
    return result


def _indices(skip_layers: list[str]) -> list[int]:
    return [int(e) for e in skip_layers if e.isdigit()]


def test_option_in_serve_help(patched_tree):
    shown = results(patched_tree)["help"]
    text = shown["turboquant-boundary-layers"]["text"]
    assert shown["turboquant-boundary-layers"]["exit"] == 0
    assert OPTION in text and "TurboQuant-eligible" in text and "0 disables" in text
    cache_group = shown["CacheConfig"]["text"]
    assert OPTION in cache_group and "--kv-cache-dtype-skip-layers" in cache_group


def test_pristine_has_no_option(pristine_tree):
    code = ("import json\nfrom vllm.config.cache import CacheConfig\n"
            "from vllm.engine.arg_utils import EngineArgs\n"
            "print(json.dumps([hasattr(EngineArgs, 'turboquant_boundary_layers'),"
            " 'turboquant_boundary_layers' in CacheConfig.__dataclass_fields__]))")
    assert run_in_vllm(pristine_tree, code).json() == [False, False]


@pytest.mark.parametrize("n,protected", [
    ("0", []), ("1", [5, 59]), ("2", [5, 11, 53, 59]),
    ("3", [5, 11, 53, 59]),  # capped: at most half of the 10 eligible layers
    ("9", [5, 11, 53, 59]),
])
def test_gemma4_31b_protects_full_attention_layers(patched_tree, n, protected):
    result = _ok(results(patched_tree)["cases"][f"31b/{n}"])
    assert result["parsed"] == result["engine_arg"] == result["cache_config"] == int(n)
    assert result["skip_layers"] == [str(i) for i in protected] + ["sliding_window"]
    if protected:
        assert set(protected) <= set(FULL_31B)  # never a sliding layer (0, 1, 58 were, before 0011)


def test_unset_means_two(patched_tree):
    cases = results(patched_tree)["cases"]
    unset = _ok(cases["31b/unset"])
    assert unset["parsed"] is None and unset["cache_config"] == 2
    assert unset["skip_layers"] == ["5", "11", "53", "59", "sliding_window"]
    assert _ok(cases["g3/unset"])["skip_layers"] == ["5", "17", "sliding_window"]


def test_other_presets_and_user_skips(patched_tree):
    cases = results(patched_tree)["cases"]
    assert _ok(cases["31b/k3v4-1"])["skip_layers"] == ["5", "59", "sliding_window"]
    assert _ok(cases["31b/1+user-7"])["skip_layers"] == ["5", "7", "59", "sliding_window"]
    # without a TurboQuant dtype the option changes nothing
    auto = _ok(cases["31b/auto-1"])
    assert auto["skip_layers"] == [] and auto["cache_config"] == 1


def test_single_full_layer_is_never_protected(patched_tree):
    # tiny Gemma 4 (layers 0-4 sliding, 5 full): half of one eligible layer rounds to none, so the
    # default keeps its only full layer on TurboQuant (before 0011 it needed TQ_BOUNDARY_LAYERS=0)
    result = _ok(results(patched_tree)["cases"]["tiny/unset"])
    assert result["cache_config"] == 2 and result["skip_layers"] == ["sliding_window"]
    assert any("no layer protected" in line and "capped from 2" in line for line in result["log"])


@pytest.mark.parametrize("n,protected", [("0", []), ("1", [5, 17]), ("2", [5, 17])])
def test_gemma3_270m_protects_first_and_last_full_layers(patched_tree, n, protected):
    result = _ok(results(patched_tree)["cases"][f"g3/{n}"])
    assert result["skip_layers"] == [str(i) for i in protected] + ["sliding_window"]


@pytest.mark.parametrize("n,protected", [
    ("0", []), ("1", [3, 63]), ("2", [3, 7, 59, 63]), ("4", [3, 7, 11, 15, 51, 55, 59, 63]),
    ("5", [3, 7, 11, 15, 51, 55, 59, 63]),  # capped at 8 of 16
])
def test_qwen_hybrid(patched_tree, n, protected):
    result = _ok(results(patched_tree)["cases"][f"qwen/{n}"])
    assert result["skip_layers"] == [str(i) for i in protected]


@pytest.mark.parametrize("n,skips", [
    ("0", []),
    # 5 and 23 protected; 0008 adds 23's YOCO readers 29, 35, 41; TurboQuant stays on 11 and 17
    ("1", [5, 23, 29, 35, 41]),
    ("2", [5, 23, 29, 35, 41]),  # capped: 4 eligible layers, at most 2 protected
])
def test_gemma4_e4b_with_yoco_alignment(patched_tree, n, skips):
    result = _ok(results(patched_tree)["cases"][f"e4b/{n}"])
    assert result["skip_layers"] == [str(i) for i in skips] + ["sliding_window"]
    if skips:
        assert any("share one KV cache" in line and "[23, 29, 35, 41]" in line for line in result["log"])


def test_info_line_names_protected_layers(patched_tree):
    cases = results(patched_tree)["cases"]
    line = next(line for line in cases["31b/1"]["log"] if "boundary protection" in line)
    assert line.startswith("INFO") and OPTION + " 1" in line and "[5, 59]" in line
    assert "[5, 11, 17, 23, 29, 35, 41, 47, 53, 59]" in line  # the eligible layers
    capped = next(line for line in cases["31b/3"]["log"] if "boundary protection" in line)
    assert "capped from 3" in capped and "[5, 11, 53, 59]" in capped
    off = next(line for line in cases["31b/0"]["log"] if "boundary protection" in line)
    assert "disabled" in off


def test_startup_config_line_shows_option_and_skip_list(patched_tree):
    line = _ok(results(patched_tree)["cases"]["31b/1"])["config_line"]
    assert "turboquant_boundary_layers=1" in line
    assert "kv_cache_dtype_skip_layers=['5', '59', 'sliding_window']" in line


@pytest.mark.parametrize("label,shown", [("31b/bad-negative", "'-1'"), ("31b/bad-word", "'two'")])
def test_bad_cli_value_is_one_clear_error(patched_tree, label, shown):
    result = results(patched_tree)["cases"][label]
    assert not result["ok"] and result["error_type"] == "SystemExit" and result["exit"] == 2
    assert result["error"].startswith(f"vllm serve: error: argument {OPTION}: must be a non-negative integer")
    assert "must be a non-negative integer" in result["error"] and shown in result["error"]
    assert "0 disables" in result["error"]


def test_bad_python_api_value(patched_tree):
    code = ("import json\nfrom vllm.config.cache import CacheConfig\n"
            "try:\n    CacheConfig(turboquant_boundary_layers=-2)\n    print(json.dumps('accepted'))\n"
            "except ValueError as e:\n    print(json.dumps(str(e)))")
    message = run_in_vllm(patched_tree, code).json()
    assert "--turboquant-boundary-layers" in message and "non-negative integer, got -2" in message


def test_deprecated_environment_variable(patched_tree):
    cases = results(patched_tree)["cases"]
    env = _ok(cases["31b/env-1"])
    assert env["cache_config"] == 1 and env["skip_layers"] == ["5", "59", "sliding_window"]
    assert any(line.startswith("WARNING") and "TQ_BOUNDARY_LAYERS is deprecated" in line and OPTION in line
               for line in env["log"])
    bad = cases["31b/env-bad"]
    assert not bad["ok"] and bad["error_type"] == "ValueError"
    assert "TQ_BOUNDARY_LAYERS='two'" in bad["error"] and OPTION in bad["error"]
    both = _ok(cases["31b/env-and-option"])
    assert both["cache_config"] == 2 and both["skip_layers"] == ["5", "11", "53", "59", "sliding_window"]
    assert any("Ignoring the deprecated TQ_BOUNDARY_LAYERS='0'" in line for line in both["log"])


def test_matches_the_tqconfig_planner(patched_tree):
    """configs/tqconfig's planner picks the same bf16 full-attention layers as the engine."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        from tqconfig.architecture import load_architecture
        from tqconfig.planner import boundary_protected_layers
    except ImportError as exc:  # pragma: no cover - pydantic/yaml missing in this venv
        pytest.skip(f"tqconfig not importable here: {exc}")
    cases = results(patched_tree)["cases"]
    for model in ("31b", "g3", "qwen", "e4b"):
        arch = load_architecture(os.path.join(CONFIGS[model][0], "config.json"))
        for n in ("0", "1", "2"):
            engine = _indices(_ok(cases[f"{model}/{n}"])["skip_layers"])
            planner = boundary_protected_layers(arch, int(n))
            owners = {layer.index for layer in arch.attention_layers if layer.owns_kv}
            assert [i for i in engine if i in owners] == planner, (model, n)

