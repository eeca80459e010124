"""GSM8K scoring against lm-eval's documented gsm8k behaviour, and the quality statistics."""
from __future__ import annotations

import math

import pytest

from tqbench.metrics.quality import perplexity_row, proportion_row, summarize, summarize_niah_grid
from tqbench.quality import gsm8k
from tqbench.quality.settings import QualitySettingsError, parse_quality_settings
from tqbench.records import append_jsonl

REF_18 = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


@pytest.mark.parametrize(
    ("completion", "reference", "strict", "flexible", "strict_ok", "flexible_ok"),
    [
        # The 5-shot format: the model ends with "#### N", both filters agree.
        (" She makes 9 * 2 = $18.\n#### 18", REF_18, "18", "18", True, True),
        # No "####": strict-match falls back to lm-eval's "[invalid]", flexible takes the last number and
        # "$", "," and a trailing "." are ignored before comparing.
        (" The answer is $1,234.", "#### 1234", "[invalid]", "$1,234.", False, True),
        # strict takes the first "####" number; flexible the last number anywhere.
        (" #### 5 apples, then 12 more", "#### 5", "5", "12", True, False),
        (" #### 3\n#### 4", "#### 4", "3", "4", False, True),
        # Negative numbers keep their sign.
        (" so she loses 3.\n#### -3", "#### -3", "-3", "-3", True, True),
        # Only a trailing "." is stripped, so "18.00" != "18" (lm-eval scores this wrong too).
        (" #### 18.00", REF_18, "18.00", "18.00", False, False),
        # A single digit is matched by the second alternative of the flexible regex.
        (" She has 7 apples left", "#### 7", "[invalid]", "7", False, True),
        # Commas are ignored on both sides.
        (" #### 1,000", "#### 1000", "1,000", "1,000", True, True),
    ],
)
def test_gsm8k_scores_like_lm_eval(completion, reference, strict, flexible, strict_ok, flexible_ok):
    scored = gsm8k.score(completion, reference)
    assert scored["strict"] == strict
    assert scored["flexible"] == flexible
    assert scored["exact_match_strict"] is strict_ok
    assert scored["exact_match_flexible"] is flexible_ok


def test_task_config_is_lm_eval_gsm8k_v3():
    config = gsm8k.task_config()
    assert config["metadata"]["version"] == 3.0
    assert config["num_fewshot"] == 5
    assert config["generation_kwargs"]["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert [f["name"] for f in config["filter_list"]] == ["strict-match", "flexible-extract"]


def test_prompt_is_lm_eval_plain_fewshot_context():
    shots = [{"question": "q1?", "answer": "a1\n#### 1"}, {"question": "q2?", "answer": "a2\n#### 2"}]
    prompt = gsm8k.build_prompt({"question": "q?", "answer": "#### 3"}, shots)
    assert prompt == "Question: q1?\nAnswer: a1\n#### 1\n\nQuestion: q2?\nAnswer: a2\n#### 2\n\nQuestion: q?\nAnswer:"


def test_fewshot_and_subset_are_seeded(gsm8k_dir):
    test, train = gsm8k.load_split("test", gsm8k_dir), gsm8k.load_split("train", gsm8k_dir)
    assert (len(test), len(train)) == (1319, 7473)
    first = gsm8k.fewshot_for_all(test[:20], train, 5)
    again = gsm8k.fewshot_for_all(test[:20], train, 5)
    assert first == again and all(len(shots) == 5 for shots in first)
    assert first[0] != first[1]  # drawn per question, as lm-eval's sampler does
    subset = gsm8k.select_questions(len(test), 200, seed=0)
    assert len(set(subset)) == 200 and subset == sorted(subset) == gsm8k.select_questions(len(test), 200, seed=0)
    assert subset != gsm8k.select_questions(len(test), 200, seed=1)


def test_proportion_stderr_matches_lm_eval_formula():
    row = proportion_row("auto", "gsm8k", "exact_match_strict", [True, False, True, True])
    assert row["value"] == 0.75 and row["n"] == 4
    assert row["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert row["ci_low"] == pytest.approx(0.75 - 1.959964 * row["stderr"], abs=1e-6)
    assert row["ci_high"] == 1.0  # clipped


def test_perplexity_is_token_weighted():
    records = [{"scored_tokens": 100, "nll_sum": 200.0}, {"scored_tokens": 300, "nll_sum": 900.0}]
    row = perplexity_row("auto", records)
    assert row["value"] == pytest.approx(math.exp(1100 / 400))
    assert row["n"] == 400 and row["ci_low"] < row["value"] < row["ci_high"]


def test_summaries_from_hand_built_records(tmp_path):
    cell = tmp_path / "raw" / "quality" / "auto"
    for doc_id, ok in enumerate([True, False, False]):
        append_jsonl(cell / "gsm8k.jsonl", {"doc_id": doc_id, "exact_match_strict": ok, "exact_match_flexible": True})
    append_jsonl(cell / "gsm8k.jsonl", {"doc_id": 9, "error": "HTTP 400"})
    for depth, passed in [(0, True), (50, False), (0, True)]:
        append_jsonl(cell / "niah.jsonl", {"context_length": 512, "depth": depth, "trial": 0, "passed": passed})
    append_jsonl(cell / "niah.jsonl", {"context_length": 8192, "depth": 0, "trial": 0, "skipped": "too long"})
    frame = summarize(tmp_path).set_index(["task", "metric"])
    assert frame.loc[("gsm8k", "exact_match_strict"), "value"] == pytest.approx(1 / 3)
    assert frame.loc[("gsm8k", "exact_match_flexible"), "n"] == 3
    assert frame.loc[("niah", "pass_rate"), "value"] == pytest.approx(2 / 3)
    grid = summarize_niah_grid(tmp_path).set_index("depth")
    assert grid.loc[0, "passed"] == 2 and grid.loc[0, "total"] == 2 and grid.loc[50, "pass_rate"] == 0


@pytest.mark.parametrize(("raw", "field"), [
    ({"gsm8k": {"subsett": 5}}, "quality.gsm8k.subsett"),
    ({"niah": {"depths": [0, 150]}}, "quality.niah.depths"),
    ({"tasks": ["gsm8k", "mmlu"]}, "quality.tasks.1"),
])
def test_bad_settings_name_the_field(raw, field):
    with pytest.raises(QualitySettingsError, match=field.replace(".", r"\.")):
        parse_quality_settings(raw)
