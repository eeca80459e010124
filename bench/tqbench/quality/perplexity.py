"""Perplexity from prompt log-probabilities (``prompt_logprobs`` on ``/v1/completions``).

The corpus (the essays) is cut into fixed windows of the server's token ids, each sent as a
token-id prompt of ``window_tokens`` tokens with ``max_tokens=1``. A window starts as a text prompt would:
with the tokens the server's tokenizer puts before text (Gemma's BOS; none for most BPE models), then
every later token is scored; without such a prefix the window's first token is the unscored context.
(Gemma models read position 0 as an attention sink: a window without BOS would measure a model state no
real request has.) PPL is token-weighted over all windows: exp(sum of NLL / number of scored tokens).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqbench.quality.client import ServerClient, run_concurrently
from tqbench.quality.essays import corpus_sha256, essays_text
from tqbench.quality.settings import PerplexitySettings
from tqbench.records import append_jsonl, read_jsonl

RAW_FILE = "perplexity.jsonl"
PIECE_CHARS = 4000


def corpus_windows(client: ServerClient, window_tokens: int, max_windows: int) -> list[list[int]]:
    """Non-overlapping windows of the essays' token ids (paragraph pieces tokenized one by one), each led by
    the tokenizer's special prefix (see the module doc) and ``window_tokens`` long in all."""
    prefix = client.special_prefix()
    window_tokens -= len(prefix)
    tokens: list[int] = []
    piece = ""
    need = window_tokens * max_windows
    for paragraph in essays_text().split("\n\n"):
        piece += paragraph + "\n\n"
        if len(piece) >= PIECE_CHARS:
            tokens += client.tokenize(piece)
            piece = ""
            if len(tokens) >= need:
                break
    else:
        if piece:
            tokens += client.tokenize(piece)
    return [prefix + tokens[i:i + window_tokens]
            for i in range(0, len(tokens) - window_tokens + 1, window_tokens)][:max_windows]


def token_logprobs(body: dict[str, Any], prompt: list[int]) -> list[float]:
    """Log-probability of each prompt token after the first, picked by token id from vLLM's prompt_logprobs."""
    entries = body["choices"][0].get("prompt_logprobs")
    if not entries or len(entries) != len(prompt):
        raise RuntimeError(f"server returned {len(entries or [])} prompt_logprobs for a {len(prompt)}-token prompt; "
                           "it must support vLLM's prompt_logprobs extension")
    values = []
    for token_id, entry in zip(prompt[1:], entries[1:]):
        chosen = entry.get(str(token_id))
        if chosen is None:
            raise RuntimeError(f"prompt_logprobs entry lacks the prompt token {token_id}: {list(entry)[:5]}")
        values.append(float(chosen["logprob"]))
    return values


def run(client: ServerClient, raw_dir: Path, settings: PerplexitySettings, seed: int, max_model_len: int | None) -> dict:
    raw_path = raw_dir / RAW_FILE
    window = settings.window_tokens
    if max_model_len is not None and window + 1 > max_model_len:
        raise ValueError(f"quality.perplexity.window_tokens={window} needs max_model_len > {window}, "
                         f"the server has {max_model_len}")
    done = {r["window"] for r in read_jsonl(raw_path)}
    windows = corpus_windows(client, window, settings.max_windows) if len(done) < settings.max_windows else []
    corpus = corpus_sha256()

    def score(index: int) -> dict[str, Any]:
        prompt = windows[index]
        body = client.complete(prompt, max_tokens=1, temperature=0.0, prompt_logprobs=0, seed=seed)
        logprobs = token_logprobs(body, prompt)
        nll = -sum(logprobs)
        return {"task": "perplexity", "window": index, "corpus": settings.corpus, "corpus_sha256": corpus,
                "window_tokens": len(prompt), "scored_tokens": len(logprobs), "nll_sum": nll,
                "ppl": math.exp(nll / len(logprobs))}

    todo = [i for i in range(len(windows)) if i not in done]
    run_concurrently(todo, score, lambda rec: append_jsonl(raw_path, rec), concurrency=settings.concurrency,
                     desc="perplexity")
    records = list(read_jsonl(raw_path))
    tokens = sum(r["scored_tokens"] for r in records)
    return {"ppl_windows": len(records), "ppl": math.exp(sum(r["nll_sum"] for r in records) / tokens) if tokens else None}
