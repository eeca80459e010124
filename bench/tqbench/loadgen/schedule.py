"""Open-loop arrival times with the semantics of ``vllm bench serve --request-rate/--burstiness``.

Inter-arrival gaps are gamma distributed with shape = burstiness and scale = 1/(rate*burstiness)
(burstiness 1 = Poisson, < 1 burstier, > 1 more regular, inf = constant spacing). As in vLLM the
cumulative schedule is rescaled so the last arrival lands exactly at N/rate, which keeps the offered
load identical across seeds.
"""
from __future__ import annotations

import math

import numpy as np


def arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start of the run at which each request arrives (all 0 for rate = inf)."""
    if num_requests <= 0:
        raise ValueError("num_requests must be positive")
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be positive")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    offsets = np.cumsum(gaps)
    offsets *= (num_requests / request_rate) / offsets[-1]
    return offsets.tolist()
