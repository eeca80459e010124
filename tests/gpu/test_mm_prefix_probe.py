"""CPU tests of the image-bidirectionality probe (tests/gpu/mm_prefix_probe.py).

Pure logic runs anywhere; the processor test needs the patched vLLM tree and transformers 5.14.1
(`.venv-vllm`, PYTHONPATH=build/vllm-0.26.0/patched) plus an importable torchvision (the GPU host has
0.26.0; on this CPU machine a CUDA torchvision wheel needs its two op schemas declared first), and
is skipped with the reason otherwise.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mm_prefix.expect import (expected_bidirectional_positions, image_ranges, judge_sliding_layer,  # noqa: E402
                              reference_mask, row_positions)
from mm_prefix.fixture import build_tokenizer_json, special_token_ids  # noqa: E402

TINY = json.loads((HERE.parents[0] / "fixtures" / "tiny-configs" / "tiny_gemma4" / "config.json").read_text())


def test_image_ranges_and_expected_positions():
    ids = [5, 6, 1000] + [1002] * 4 + [1001, 7]
    assert image_ranges(ids, 1002) == [(3, 6)]
    assert expected_bidirectional_positions([(3, 6)], 512) == {3, 4, 5}
    with pytest.raises(ValueError, match="sliding_window"):
        expected_bidirectional_positions([(3, 6)], 0)


def test_expected_positions_are_the_rows_the_reference_mask_changes():
    torch = pytest.importorskip("torch")
    ranges = [(3, 8), (12, 14)]
    with_ranges = reference_mask(20, ranges, sliding_window=4)
    without = reference_mask(20, [], sliding_window=4)
    changed = set(torch.nonzero((with_ranges != without).any(dim=1)).flatten().tolist())
    assert changed == expected_bidirectional_positions(ranges, 4)
    # The window still bounds the image block (Gemma 4 clamps it): query 8 cannot see key 3.
    assert not with_ranges[8, 3] and with_ranges[3, 8]


def test_row_positions_and_verdict():
    assert row_positions([0, 3, 5], [3, 10]) == [(0, 0), (0, 1), (0, 2), (1, 8), (1, 9)]
    diffs = {0: 0.0, 1: 0.5, 2: 0.25, 3: 0.0}
    verdict = judge_sliding_layer(diffs, {1, 2}, 0.0)
    assert verdict["bidirectional"] and verdict["outside_bit_identical"]
    assert verdict["differ_positions"] == [[1, 2]]
    assert not judge_sliding_layer({0: 0.1, 1: 0.5, 2: 0.25}, {1, 2}, 0.0)["bidirectional"]


def test_tokenizer_puts_gemma4_markers_at_config_ids():
    pytest.importorskip("tokenizers")
    data = build_tokenizer_json(TINY)
    vocab = data["model"]["vocab"]
    assert len(vocab) == TINY["text_config"]["vocab_size"]
    assert vocab["<|image|>"] == 1002 and vocab["<|image>"] == 1000 and vocab["<image|>"] == 1001
    assert {t["content"] for t in data["added_tokens"]} >= {"<|image|>", "<|audio|>", "<pad>"}


def test_missing_special_id_names_the_field():
    broken = dict(TINY)
    del broken["image_token_id"]
    with pytest.raises(ValueError, match="image_token_id"):
        special_token_ids(broken)


def test_list_prints_the_plan_without_a_gpu():
    run = subprocess.run([sys.executable, str(HERE / "mm_prefix_probe.py"), "--list", "--with-31b"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "end-to-end image request" in run.stdout
    assert "patched/tiny_gemma4/turboquant_4bit_nc" in run.stdout and "gemma-4-31b-it" in run.stdout


def test_vllm_gemma4_processor_accepts_the_offline_folder(tmp_path):
    """The real patched vLLM multimodal processor expands one image into boi + N image tokens + eoi."""
    pytest.importorskip("torchvision", reason="Gemma4Processor imports torchvision")
    pytest.importorskip("vllm", reason="needs PYTHONPATH=build/vllm-0.26.0/patched in .venv-vllm")
    import numpy as np
    from PIL import Image
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from mm_prefix.fixture import prepare_model_dir

    folder = prepare_model_dir(HERE.parents[0] / "fixtures" / "tiny-configs" / "tiny_gemma4" / "config.json",
                               tmp_path / "tiny")
    config = ModelConfig(model=str(folder), tokenizer=str(folder), max_model_len=4096, dtype="bfloat16")
    assert config.is_mm_prefix_lm
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    image = Image.fromarray((np.random.RandomState(0).rand(96, 128, 3) * 255).astype("uint8"))
    out = processor("w5 w6 <|image|> w7 w8", processor.info.parse_mm_data({"image": [image]}))
    ids = out["prompt_token_ids"]
    (start, end), = out["mm_placeholders"]["image"][0].extract_embeds_range()
    assert ids[:2] == [5, 6] and ids[start - 1] == 1000 and ids[end + 1] == 1001 and ids[-2:] == [7, 8]
    assert image_ranges(ids, 1002) == [(start, end)] and end - start + 1 > 1


def test_judge_finds_the_image_request_wherever_the_scheduler_put_it():
    """GPU run 2026-11-21: the text request came first in the batch; the verdict must not assume index 0."""
    from mm_prefix_probe import judge_case

    types = ["sliding_attention", "full_attention"]
    sliding = {"layer": 0, "impl": "TritonAttentionImpl", "kv_cache_dtype": "auto",
               "mm_prefix_range_tensor": [[[0, 0]], [[31, 296]]],
               "rerun_without_ranges": {"0": {"bidirectional": False, "outside_bit_identical": True},
                                        "1": {"bidirectional": True, "outside_bit_identical": True}}}
    full = {"layer": 1, "impl": "TurboQuantAttentionImpl", "kv_cache_dtype": "turboquant_4bit_nc",
            "mm_prefix_range_tensor": None}
    record = {"image_ranges": [[31, 296]], "layers": [sliding, full]}
    assert judge_case(record, types)["verdict"] == "bidirectional_proven"
    # a range on the text request too, or a sliding layer that stayed causal, is not a proof
    both = dict(sliding, mm_prefix_range_tensor=[[[31, 296]], [[31, 296]]])
    assert judge_case(dict(record, layers=[both, full]), types)["verdict"] == "not_proven"
    causal = dict(sliding, rerun_without_ranges={"1": {"bidirectional": False, "outside_bit_identical": True}})
    assert judge_case(dict(record, layers=[causal, full]), types)["verdict"] == "not_proven"
