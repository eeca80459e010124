"""GSM8K exact match, scored the way lm-evaluation-harness's ``gsm8k`` task (v3) scores it.

What is reused from lm-eval (installed ``--no-deps``, pinned below) rather than rewritten:
  * the task YAML itself (``lm_eval/tasks/gsm8k/gsm8k.yaml``): prompt template, stop
    sequences, few-shot count, metric options (``regexes_to_ignore``, ``ignore_case``) and the
    two filter pipelines (strict-match, flexible-extract);
  * the filter classes named in that YAML (``regex``, ``take_first``) from lm-eval's registry;
  * the few-shot sampler (``ContextSampler`` seeded with lm-eval's default 1234, drawn per
    question in test-set order, so question i gets the same shots as in an lm-eval run).
``exact_match`` mirrors ``lm_eval.api.metrics.exact_match_hf_evaluate``; that module imports
sacrebleu at load time, which is too heavy to pull in for six lines (tests pin its behaviour).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from tqbench.quality.client import ServerClient, ServerError, run_concurrently
from tqbench.quality.settings import Gsm8kSettings
from tqbench.records import append_jsonl, read_jsonl

LM_EVAL_PIN = "lm-eval==0.4.13"
LM_EVAL_FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED

# The canonical GSM8K files (MIT) with pinned hashes; the HF dataset lm-eval reads is built from them.
# Both splits are committed under bench/data/gsm8k (with the MIT licence), so no download is needed in
# a checkout; the URL is the fallback for an installed package without the repository beside it.
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "data" / "gsm8k"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
GSM8K_SHA256 = {
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
}
DEFAULT_CACHE = Path.home() / ".cache" / "tqstack" / "gsm8k"
RAW_FILE = "gsm8k.jsonl"


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.filters  # noqa: F401  (registers the filter classes by name)
        from lm_eval.api.registry import get_filter
        from lm_eval.api.samplers import ContextSampler
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise RuntimeError(
            f"GSM8K scoring reuses lm-evaluation-harness; install it with `pip install --no-deps {LM_EVAL_PIN}` "
            f"(numpy is its only import-time dependency here): {exc}"
        ) from exc
    return lm_eval, get_filter, ContextSampler


@lru_cache(maxsize=1)
def task_config() -> dict[str, Any]:
    """lm-eval's own gsm8k task YAML, as shipped in the installed package."""
    lm_eval, _, _ = _lm_eval()
    path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    config = yaml.safe_load(path.read_text())
    if config.get("task") != "gsm8k" or config.get("output_type") != "generate_until":
        raise RuntimeError(f"{path} is not the gsm8k generate_until task this scorer was written for")
    return config


def _metric_options() -> dict[str, Any]:
    (metric,) = [m for m in task_config()["metric_list"] if m["metric"] == "exact_match"]
    return metric


def exact_match(prediction: str, reference: str) -> bool:
    """lm-eval ``exact_match`` with the gsm8k task's options (regexes stripped from both sides first)."""
    options = _metric_options()
    for pattern in options.get("regexes_to_ignore") or []:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if options.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    if options.get("ignore_punctuation"):
        raise RuntimeError("gsm8k.yaml asks for ignore_punctuation, which this scorer does not mirror")
    return prediction == reference


def extract_answers(completion: str) -> dict[str, str]:
    """Run every filter pipeline of the task YAML (strict-match, flexible-extract) on one completion."""
    _, get_filter, _ = _lm_eval()
    extracted = {}
    for pipeline in task_config()["filter_list"]:
        responses: list = [[completion]]
        for step in pipeline["filter"]:
            kwargs = {k: v for k, v in step.items() if k != "function"}
            responses = list(get_filter(step["function"])(**kwargs).apply(responses, [{}]))
        extracted[pipeline["name"]] = responses[0]
    return extracted


def score(completion: str, reference_answer: str) -> dict[str, Any]:
    extracted = extract_answers(completion)
    return {
        "strict": extracted["strict-match"],
        "flexible": extracted["flexible-extract"],
        "exact_match_strict": exact_match(extracted["strict-match"], reference_answer),
        "exact_match_flexible": exact_match(extracted["flexible-extract"], reference_answer),
    }


def doc_to_text(doc: dict[str, str]) -> str:
    template = task_config()["doc_to_text"]  # "Question: {{question}}\nAnswer:"
    return template.replace("{{question}}", doc["question"])


def build_prompt(doc: dict[str, str], shots: list[dict[str, str]]) -> str:
    """lm-eval's plain-text context: shots joined with target_delimiter " " and fewshot_delimiter "\\n\\n"."""
    parts = [f"{doc_to_text(shot)} {shot['answer']}\n\n" for shot in shots]
    return "".join(parts) + doc_to_text(doc)


def fewshot_for_all(test_docs: list[dict], train_docs: list[dict], num_fewshot: int) -> list[list[dict]]:
    """Shots per test question, drawn as lm-eval draws them (one seeded sampler, questions in order)."""
    _, _, ContextSampler = _lm_eval()
    sampler = ContextSampler(train_docs, rnd=LM_EVAL_FEWSHOT_SEED)
    return [list(sampler.sample(num_fewshot)) for _ in test_docs]


def _read_split(path: Path) -> list[dict[str, str]]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _verified(path: Path, split: str) -> bool:
    return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == GSM8K_SHA256[split]


def load_split(split: str, data_dir: Path | None = None) -> list[dict[str, str]]:
    """``data_dir/{split}.jsonl`` if given, else the copy committed in bench/data/gsm8k (sha256 checked),
    else the pinned download cached under ~/.cache/tqstack/gsm8k."""
    if data_dir is not None:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"gsm8k.data_dir: {path} does not exist (expected GSM8K {split}.jsonl there)")
        return _read_split(path)
    bundled = BUNDLED_DIR / f"{split}.jsonl"
    if _verified(bundled, split):
        return _read_split(bundled)
    path = DEFAULT_CACHE / f"{split}.jsonl"
    if not _verified(path, split):
        url = GSM8K_URL.format(split=split)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as exc:
            raise RuntimeError(f"GSM8K {split}: {bundled} is missing or altered and the download from {url} "
                               f"failed ({exc}). Set quality.gsm8k.data_dir or TQBENCH_GSM8K_DIR to a folder "
                               f"with test.jsonl and train.jsonl.") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != GSM8K_SHA256[split]:
            raise RuntimeError(f"GSM8K {split} from {url} has sha256 {digest}, expected {GSM8K_SHA256[split]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return _read_split(path)


def select_questions(n_total: int, subset: int | None, seed: int) -> list[int]:
    if subset is None or subset >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), subset))


def run(client: ServerClient, raw_dir: Path, settings: Gsm8kSettings, seed: int) -> dict[str, Any]:
    test_docs = load_split("test", settings.data_dir)
    train_docs = load_split("train", settings.data_dir)
    shots = fewshot_for_all(test_docs, train_docs, settings.num_fewshot)
    chosen = select_questions(len(test_docs), settings.subset, seed)
    raw_path = raw_dir / RAW_FILE
    done = {rec["doc_id"] for rec in read_jsonl(raw_path)}
    todo = [i for i in chosen if i not in done]
    stop = list(task_config()["generation_kwargs"]["until"])

    def ask(doc_id: int) -> dict[str, Any]:
        doc = test_docs[doc_id]
        prompt = build_prompt(doc, shots[doc_id])
        record: dict[str, Any] = {"task": "gsm8k", "doc_id": doc_id, "reference": doc["answer"].split("#### ")[-1]}
        try:
            body = client.complete(prompt, max_tokens=settings.max_tokens, temperature=0.0, stop=stop, seed=seed)
        except ServerError as exc:
            if exc.status is None or exc.status >= 500:
                raise
            record["error"] = str(exc)
            return record
        choice = body["choices"][0]
        record.update(completion=choice["text"], finish_reason=choice.get("finish_reason"),
                      prompt_tokens=body.get("usage", {}).get("prompt_tokens"),
                      completion_tokens=body.get("usage", {}).get("completion_tokens"))
        record.update(score(choice["text"], doc["answer"]))
        return record

    run_concurrently(todo, ask, lambda rec: append_jsonl(raw_path, rec),
                     concurrency=settings.concurrency, desc="gsm8k")
    records = [r for r in read_jsonl(raw_path) if "error" not in r]
    n = len(records)
    strict = sum(r["exact_match_strict"] for r in records) / n if n else math.nan
    return {"gsm8k_n": n, "gsm8k_strict": strict}
