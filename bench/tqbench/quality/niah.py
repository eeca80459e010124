"""Needle in a haystack over a context-length x depth grid, RULER ``niah_single_2`` / ``niah_multikey_1`` style.

Haystack: the Paul Graham essays. Needle: "One of the special magic numbers for {key} is: {value}."
with a 7-digit value. With ``needles > 1`` the other keys are distractors at seeded random depths
(multi-key NIAH, the variant that detects KV-quantisation drift that single-needle NIAH misses).
A probe passes when the generated text contains the queried value; the score is pass@total.

Lengths are the served model's tokens: the haystack is cut on the server's own token ids
(``/tokenize`` / ``/detokenize``), and each record keeps the prompt length the server reports.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tqbench.quality.client import ServerClient, ServerError, run_concurrently
from tqbench.quality.essays import essays_text
from tqbench.quality.settings import NiahSettings
from tqbench.records import append_jsonl, read_jsonl

RAW_FILE = "niah.jsonl"
INTRO = ("Some special magic numbers are hidden within the following text. "
         "Make sure to memorize it. I will quiz you about the numbers afterwards.\n")
KEYS = ("amber", "basil", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
        "lantern", "meadow", "nimbus", "orchid", "pepper", "quartz", "raven", "saffron", "thistle", "umber",
        "velvet", "willow", "xenon", "yarrow", "zephyr", "acorn", "bramble", "cinder", "drift", "falcon", "glacier")


def needle(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}. "


def question(key: str, chat: bool) -> str:
    if chat:
        return f"\nWhat is the special magic number for {key} mentioned in the provided text? Answer with the number only."
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


class Haystack:
    """Server token ids of the essays, long enough for the largest context (repeated if needed)."""

    PIECE_CHARS = 4000  # tokenized piecewise: /tokenize may refuse texts longer than max_model_len

    def __init__(self, client: ServerClient, min_tokens: int):
        self.client = client
        self.tokens: list[int] = []
        paragraphs = essays_text().split("\n\n")
        piece = ""
        index = 0
        while len(self.tokens) < min_tokens:
            piece += paragraphs[index % len(paragraphs)] + "\n\n"
            index += 1
            if len(piece) >= self.PIECE_CHARS or index % len(paragraphs) == 0:
                self.tokens += client.tokenize(piece)
                piece = ""

    def text(self, start: int, end: int) -> str:
        return self.client.detokenize(self.tokens[start:end]) if end > start else ""


def _snap_to_sentence(before: str, after: str) -> tuple[str, str]:
    """Move a cut to the end of the previous sentence (as Kamradt's NIAH does), if one is near."""
    cut = before.rfind(". ")
    if cut == -1 or len(before) - cut > 400:
        return before, after
    return before[: cut + 1], before[cut + 1:] + after


def build_probe(haystack: Haystack, context_length: int, depth: float, needles: int, rng: random.Random,
                chat: bool, count_tokens) -> dict[str, Any] | None:
    keys = rng.sample(KEYS, needles)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    overhead = count_tokens(INTRO + question(keys[0], chat)) + sum(count_tokens(needle(k, v)) for k, v in zip(keys, values))
    budget = context_length - overhead
    if budget <= 0:
        return None
    positions = [round(depth / 100 * budget)] + [rng.randint(0, budget) for _ in keys[1:]]
    order = sorted(range(needles), key=lambda i: (positions[i], i))
    pieces, start = [], 0
    for i in order:
        pieces.append(haystack.text(start, positions[i]))
        start = positions[i]
    pieces.append(haystack.text(start, budget))
    for j in range(len(pieces) - 1):  # snap every cut back to a sentence end
        pieces[j], pieces[j + 1] = _snap_to_sentence(pieces[j], pieces[j + 1])
    body = pieces[0] + "".join(needle(keys[i], values[i]) + pieces[n + 1] for n, i in enumerate(order))
    return {"prompt": INTRO + body + question(keys[0], chat), "key": keys[0], "value": values[0],
            "distractors": dict(zip(keys[1:], values[1:]))}


def run(client: ServerClient, raw_dir: Path, settings: NiahSettings, seed: int, max_model_len: int | None) -> dict:
    raw_path = raw_dir / RAW_FILE
    done = {(r["context_length"], r["depth"], r["trial"]) for r in read_jsonl(raw_path)}
    cells = [(c, d, t) for c in settings.context_lengths for d in settings.depths for t in range(settings.trials)]
    todo = [cell for cell in cells if cell not in done]
    fits = [c for c in settings.context_lengths if max_model_len is None or c + settings.max_tokens <= max_model_len]
    haystack = Haystack(client, max(fits)) if fits and todo else None
    token_counts: dict[str, int] = {}

    def count_tokens(text: str) -> int:
        if text not in token_counts:
            token_counts[text] = len(client.tokenize(text))
        return token_counts[text]

    def probe(cell: tuple[int, float, int]) -> dict[str, Any]:
        context_length, depth, trial = cell
        record: dict[str, Any] = {"task": "niah", "context_length": context_length, "depth": depth, "trial": trial,
                                  "needles": settings.needles, "chat": settings.chat}
        if context_length not in fits:
            record["skipped"] = f"context {context_length} + max_tokens {settings.max_tokens} > max_model_len {max_model_len}"
            return record
        rng = random.Random(f"niah-{seed}-{context_length}-{depth}-{trial}-{settings.needles}")
        built = build_probe(haystack, context_length, depth, settings.needles, rng, settings.chat, count_tokens)
        if built is None:
            record["skipped"] = f"context {context_length} is shorter than the needle and question"
            return record
        params = {"max_tokens": settings.max_tokens, "temperature": 0.0, "seed": seed}
        try:
            if settings.chat:
                body = client.chat([{"role": "user", "content": built["prompt"]}],
                                   chat_template_kwargs={"enable_thinking": False}, **params)
                text = body["choices"][0]["message"].get("content") or ""
            else:
                body = client.complete(built["prompt"], **params)
                text = body["choices"][0]["text"]
        except ServerError as exc:
            if exc.status is None or exc.status >= 500:
                raise
            record["error"] = str(exc)
            return record
        record.update(key=built["key"], value=built["value"], distractors=built["distractors"], completion=text,
                      prompt_tokens=body.get("usage", {}).get("prompt_tokens"), passed=built["value"] in text)
        return record

    run_concurrently(todo, probe, lambda rec: append_jsonl(raw_path, rec), concurrency=settings.concurrency,
                     desc="niah")
    scored = [r for r in read_jsonl(raw_path) if "passed" in r]
    return {"niah_n": len(scored), "niah_passed": sum(r["passed"] for r in scored)}
