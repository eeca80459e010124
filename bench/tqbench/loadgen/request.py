"""One streamed ``/v1/completions`` request, recorded with raw timestamps of every SSE chunk.

The record keeps everything the latency metrics need (and nothing pre-aggregated), so metrics
can be recomputed from raw data at any time:

- ``start_ns``: ``time.perf_counter_ns()`` just before the request is sent (CLOCK_MONOTONIC on
  Linux, comparable across processes of one host); ``start_unix_ns``: wall clock at that moment.
- ``chunk_ns`` / ``chunk_tokens``: arrival time of every SSE message that carries ``choices`` and
  the number of new completion tokens it carried (from ``continuous_usage_stats``; 1 when the
  server sends no usage per chunk).
- ``end_ns``: arrival of the last ``choices`` message (the ``vllm bench serve`` E2EL end point);
  on failure, the moment the failure was seen.
- ``prompt_tokens`` / ``completion_tokens``: the server's final usage numbers.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx


def completion_payload(model: str, prompt: str | list[int], output_len: int, temperature: float = 0.0) -> dict:
    """Request body: exactly ``output_len`` tokens (ignore_eos + min_tokens), usage on every chunk."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "min_tokens": output_len,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def stream_completion(
    client: httpx.Client,
    base_url: str,
    payload: dict,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Send one streaming completion and return its raw timing record (never raises for HTTP errors)."""
    request_id = request_id or uuid.uuid4().hex
    record: dict[str, Any] = {
        "request_id": request_id,
        "server_id": None,
        "ok": False,
        "status": None,
        "error": None,
        "chunk_ns": [],
        "chunk_tokens": [],
        "first_token_ns": None,
        "end_ns": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "text_chars": 0,
    }
    send_headers = {**(headers or {}), "X-Request-Id": request_id}
    seen_tokens = 0
    usage_per_chunk = False
    record["start_unix_ns"] = time.time_ns()
    record["start_ns"] = start_ns = time.perf_counter_ns()
    try:
        with client.stream(
            "POST", f"{base_url}/v1/completions", json=payload, headers=send_headers, timeout=timeout_s
        ) as response:
            record["status"] = response.status_code
            if response.status_code != 200:
                body = response.read().decode(errors="replace")
                record["error"] = f"HTTP {response.status_code}: {body[:500]}"
                record["end_ns"] = time.perf_counter_ns()
                return record
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments (pings)
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter_ns()
                message = json.loads(data)
                if "error" in message and not message.get("choices"):
                    record["error"] = f"server error in stream: {message['error']}"
                    break
                record["server_id"] = record["server_id"] or message.get("id")
                usage = message.get("usage") or {}
                if message.get("choices"):
                    if usage.get("completion_tokens") is not None:
                        usage_per_chunk = True
                        delta = usage["completion_tokens"] - seen_tokens
                        seen_tokens = usage["completion_tokens"]
                    else:
                        delta = 1
                    record["chunk_ns"].append(now)
                    record["chunk_tokens"].append(delta)
                    record["text_chars"] += len(message["choices"][0].get("text") or "")
                    if record["first_token_ns"] is None:
                        record["first_token_ns"] = now
                    record["end_ns"] = now
                if usage:
                    record["prompt_tokens"] = usage.get("prompt_tokens", record["prompt_tokens"])
                    record["completion_tokens"] = usage.get("completion_tokens", record["completion_tokens"])
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["usage_per_chunk"] = usage_per_chunk
    if record["error"] is None and record["first_token_ns"] is None:
        record["error"] = "stream ended without any chunk carrying choices"
    if record["error"] is not None or record["end_ns"] is None:
        record["end_ns"] = time.perf_counter_ns()  # a failed request ends when the failure is seen
    record["ok"] = record["error"] is None
    return record
