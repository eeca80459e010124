"""CPU tests of the GPU speed lane (tests/gpu/speed.py): maths, arguments, argv against vLLM 0.26.0."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "stacks")]
import speed  # noqa: E402
import vllm_cli  # noqa: E402


def test_decode_tpot_keeps_only_gaps_after_the_last_first_token():
    # two requests: first tokens at 1.0 s and 3.0 s; request 1 decodes while request 2 prefills
    ttfts = [1.0, 3.0]
    itls = [[0.5, 0.5, 0.5, 0.5, 0.1], [0.2, 0.2]]  # request 1 tokens at 1.5 2.0 2.5 3.0 3.1
    # after 3.0: request 1's 0.1 gap (3.1), request 2's 0.2 and 0.2 (3.2, 3.4)
    assert speed.decode_tpot_ms(ttfts, itls) == pytest.approx(200.0)
    assert speed.decode_tpot_ms([], []) is None
    assert speed.decode_tpot_ms([1.0], [[]]) is None


@pytest.mark.parametrize("text, ok", [("32768:8", (32768, 8)), ("1024:1", (1024, 1)), ("32K:8", None),
                                      ("8:1", None), ("1024:0", None)])
def test_workloads_parse_or_name_the_bad_value(text, ok):
    if ok:
        assert speed.parse_workload(text) == ok
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=text):
            speed.parse_workload(text)


def test_serve_and_bench_flags_exist_in_vllm_0_26_0():
    tree = vllm_cli.pristine_tree()
    if tree is None:
        pytest.fail("build/vllm-0.26.0/pristine not found: run `make patches-pristine`")
    serve = vllm_cli.serve_options(tree)
    argv = speed.serve_argv(Path("/m"), ["--language-model-only", "--gdn-prefill-backend", "triton"],
                            "turboquant_4bit_nc", 8000, 33088)
    missing = [f for f in vllm_cli.flags(argv) if f not in serve]
    assert not missing, missing
    bench = vllm_cli.bench_serve_options(tree)
    for flag in ("--random-input-len", "--random-output-len", "--ignore-eos", "--max-concurrency",
                 "--save-detailed", "--result-filename", "--request-rate"):
        assert flag in bench, flag


def test_upstream_kernels_are_the_series_before_the_tqstack_kernels():
    names = [n for n in (speed.REPO / "patches/vllm-0.26.0/series").read_text().split() if n.endswith(".patch")]
    kept = speed.upstream_series(names)
    assert speed.TQSTACK_KERNEL_PATCH not in kept and kept == names[: len(kept)]
    assert "0010-sliding-window-kv-budget.patch" in kept  # every gate fix stays
    with pytest.raises(ValueError, match="not in the series"):
        speed.upstream_series(kept)


def test_boundary_setting_is_passed_and_read_back_from_the_startup_log():
    argv = speed.serve_argv(Path("/m"), [], "turboquant_4bit_nc", 8000, 33088, boundary_layers=1)
    assert argv[argv.index("--turboquant-boundary-layers") + 1] == "1"
    assert "--turboquant-boundary-layers" not in speed.serve_argv(Path("/m"), [], "auto", 8000, 33088, 1)
    line = ("INFO 12-03 14:30:41 [config.py:282] TurboQuant boundary protection (--turboquant-boundary-layers 2): "
            "keeping layers [5, 11, 53, 59] in the model dtype, the first and last 2 of the TurboQuant-eligible")
    assert speed.boundary_from_log("x\n" + line) == {"turboquant_boundary_layers": 2,
                                                     "turboquant_bf16_layers": [5, 11, 53, 59]}
    assert speed.boundary_from_log("no such line") == {}
