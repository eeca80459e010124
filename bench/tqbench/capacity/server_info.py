"""What the server says about its KV cache: Prometheus ``/metrics`` and the startup log."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# vLLM <= 0.2x logs two lines, newer vLLM one line ("CPU KV cache size: ..., Maximum concurrency ...").
_LOG_TOKENS = re.compile(r"(?P<device>\w+) KV cache size: (?P<tokens>[\d,]+) tokens")
_LOG_CONCURRENCY = re.compile(r"Maximum concurrency for (?P<len>[\d,]+) tokens per request: (?P<x>[\d.]+)x")


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL.findall(match["labels"] or "")}
        try:
            samples.append(Sample(match["name"], labels, float(match["value"])))
        except ValueError:
            continue
    return samples


def metric_sum(samples: list[Sample], name: str) -> float | None:
    """Sum over label sets (engines) of one metric; None when the server does not export it."""
    values = [s.value for s in samples if s.name == name]
    return sum(values) if values else None


def load_state(samples: list[Sample]) -> dict[str, float | None]:
    preemptions = metric_sum(samples, "vllm:num_preemptions_total")
    if preemptions is None:
        preemptions = metric_sum(samples, "vllm:num_preemptions")
    return {
        "running": metric_sum(samples, "vllm:num_requests_running"),
        "waiting": metric_sum(samples, "vllm:num_requests_waiting"),
        "preemptions": preemptions,
        "kv_cache_usage": metric_sum(samples, "vllm:kv_cache_usage_perc"),
    }


def cache_config_info(samples: list[Sample]) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (num_gpu_blocks, block_size, cache_dtype, ...) of engine 0."""
    infos = [s.labels for s in samples if s.name == "vllm:cache_config_info"]
    infos.sort(key=lambda labels: labels.get("engine", ""))
    return dict(infos[0]) if infos else {}


def parse_server_log(path: Path | None) -> dict[str, Any]:
    """KV-cache figures vLLM logs at startup (last occurrence wins: a log may hold several boots)."""
    if path is None or not Path(path).exists():
        return {}
    found: dict[str, Any] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if m := _LOG_TOKENS.search(line):
            found["log_kv_cache_tokens"] = int(m["tokens"].replace(",", ""))
            found["log_kv_device"] = m["device"]
        if m := _LOG_CONCURRENCY.search(line):
            found["log_max_concurrency"] = float(m["x"])
            found["log_concurrency_len"] = int(m["len"].replace(",", ""))
    return found


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def server_capacity(info: dict[str, str], log: dict[str, Any], max_model_len: int | None) -> dict[str, Any]:
    """Reconcile /metrics and the log into kv_cache_tokens and max_concurrency (with where each came from).

    Order of trust: the log line (what users compare with), then the cache_config_info labels that
    newer vLLM exports, then num_gpu_blocks x block_size (exact only for one KV-cache group).
    """
    blocks, block_size = _int(info.get("num_gpu_blocks")), _int(info.get("block_size"))
    if "log_kv_cache_tokens" in log:
        tokens, source = log["log_kv_cache_tokens"], "server log"
    elif _int(info.get("kv_cache_size_tokens")):
        tokens, source = _int(info["kv_cache_size_tokens"]), "metrics kv_cache_size_tokens"
    elif blocks and block_size:
        tokens, source = blocks * block_size, "metrics num_gpu_blocks x block_size"
    else:
        tokens, source = None, "unknown"
    if "log_max_concurrency" in log:
        concurrency = log["log_max_concurrency"]
    elif _float(info.get("kv_cache_max_concurrency")):
        concurrency = _float(info["kv_cache_max_concurrency"])
    else:
        concurrency = tokens / max_model_len if tokens and max_model_len else None
    return {"kv_cache_tokens": tokens, "kv_cache_tokens_source": source, "max_concurrency": concurrency,
            "num_gpu_blocks": blocks, "block_size": block_size, "max_model_len": max_model_len,
            "cache_dtype": info.get("cache_dtype")}
