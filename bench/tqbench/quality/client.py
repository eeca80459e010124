"""Small synchronous client for the vLLM OpenAI-compatible server (quality and capacity parts).

Uses the server's own ``/tokenize`` and ``/detokenize`` so that token counts are the served
model's, whatever tokenizer it has.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterable, TypeVar

import httpx
from tqdm import tqdm

from tqbench.context import Endpoint

T = TypeVar("T")


class ServerError(RuntimeError):
    """The server answered with an error (``status`` = HTTP code) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def run_concurrently(items: Iterable[T], work: Callable[[T], dict[str, Any]], sink: Callable[[dict[str, Any]], None],
                     *, concurrency: int, desc: str) -> int:
    """Run ``work`` on items with ``concurrency`` threads, passing each result to ``sink`` as it arrives.

    The first exception cancels what has not started and is re-raised (what finished is kept).
    """
    items = list(items)
    pool = ThreadPoolExecutor(max(1, concurrency))
    futures = [pool.submit(work, item) for item in items]
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False):
            sink(future.result())
    except BaseException:
        # Do not wait for requests in flight (Ctrl-C must be prompt); they end when the server stops.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return len(items)


class ServerClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float = 600.0, max_connections: int = 64):
        self.endpoint = endpoint
        self._http = httpx.Client(
            base_url=endpoint.base_url.rstrip("/"),
            headers=endpoint.headers(),
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise ServerError(f"POST {self.endpoint.base_url}{path} failed: {exc!r}") from exc
        if response.status_code != 200:
            raise ServerError(f"POST {path} -> HTTP {response.status_code}: {response.text[:500]}",
                              status=response.status_code)
        return response.json()

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        body = self._post("/tokenize", {"model": self.endpoint.model, "prompt": text,
                                        "add_special_tokens": add_special_tokens})
        return list(body["tokens"])

    def special_prefix(self) -> list[int]:
        """The ids the server's tokenizer puts before any text prompt (e.g. Gemma's BOS); [] for most BPE models."""
        plain = self.tokenize("x")
        full = self.tokenize("x", add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def detokenize(self, tokens: list[int]) -> str:
        return self._post("/detokenize", {"model": self.endpoint.model, "tokens": tokens})["prompt"]

    def max_model_len(self) -> int | None:
        body = self._post("/tokenize", {"model": self.endpoint.model, "prompt": "x"})
        return body.get("max_model_len")

    def complete(self, prompt: str | list[int], **params: Any) -> dict[str, Any]:
        """One non-streaming ``/v1/completions`` call; returns the whole response body."""
        return self._post("/v1/completions", {"model": self.endpoint.model, "prompt": prompt, **params})

    def chat(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        return self._post("/v1/chat/completions", {"model": self.endpoint.model, "messages": messages, **params})

    def metrics_text(self) -> str:
        try:
            response = self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise ServerError(f"GET {self.endpoint.base_url}/metrics failed: {exc!r}") from exc
        if response.status_code != 200:
            raise ServerError(f"GET /metrics -> HTTP {response.status_code}", status=response.status_code)
        return response.text
