"""Pure logic of the bidirectionality proof (no GPU, no vLLM): what the kernel should change.

The Triton kernel's mask on a Gemma 4 sliding layer is ``(causal AND window) OR (mm_prefix AND
window)`` (MM_PREFIX_CLAMP_SW). Dropping the ranges changes a query row exactly when some key it
could then no longer see exists: a later key of the same image range. So for a range (s, e)
(inclusive, vLLM's ``extract_embeds_range``) the rows that must differ are positions s..e-1; the
last image token and every text token must be bit-identical.
"""
from __future__ import annotations


def image_ranges(token_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """Inclusive (start, end) runs of ``image_token_id`` in a prompt, as vLLM derives them."""
    ranges, start = [], None
    for pos, tok in enumerate(token_ids):
        if tok == image_token_id and start is None:
            start = pos
        elif tok != image_token_id and start is not None:
            ranges.append((start, pos - 1))
            start = None
    if start is not None:
        ranges.append((start, len(token_ids) - 1))
    return ranges


def expected_bidirectional_positions(ranges: list[tuple[int, int]], sliding_window: int) -> set[int]:
    """Positions whose sliding-layer output must change when the ranges are removed."""
    if sliding_window <= 1:
        raise ValueError(f"sliding_window must be > 1, got {sliding_window}")
    positions: set[int] = set()
    for start, end in ranges:
        if end < start:
            raise ValueError(f"range ({start}, {end}): end before start")
        # A later in-range key k > p is always inside the window's past bound (p - k < 0 < W).
        positions.update(range(start, end))
    return positions


def row_positions(query_start_loc: list[int], seq_lens: list[int]) -> list[tuple[int, int]]:
    """(request index, absolute position) of each query row of a batch."""
    rows = []
    for req, (q0, q1) in enumerate(zip(query_start_loc[:-1], query_start_loc[1:])):
        context = seq_lens[req] - (q1 - q0)
        rows.extend((req, context + i) for i in range(q1 - q0))
    return rows


def reference_mask(num_tokens: int, ranges: list[tuple[int, int]], sliding_window: int):
    """Boolean [q, k] mask of a Gemma 4 sliding layer (torch), the kernel's rule in tensor form."""
    import torch

    q = torch.arange(num_tokens)[:, None]
    k = torch.arange(num_tokens)[None, :]
    in_window = (q - k) < sliding_window
    mask = (k <= q) & in_window
    for start, end in ranges:
        mask |= (q >= start) & (q <= end) & (k >= start) & (k <= end) & in_window
    return mask


def judge_sliding_layer(diff_by_position: dict[int, float], expected: set[int], tolerance: float) -> dict:
    """Verdict for one layer from the max |with - without| per position of the image request."""
    differ = {p for p, d in diff_by_position.items() if d > tolerance}
    identical_max = max((d for p, d in diff_by_position.items() if p not in expected), default=0.0)
    expected_min = min((diff_by_position.get(p, 0.0) for p in expected), default=0.0)
    return {
        "bidirectional": bool(expected) and differ == expected,
        "differ_positions": _spans(sorted(differ)),
        "expected_positions": _spans(sorted(expected)),
        "max_diff_outside_expected": identical_max,
        "min_diff_at_expected": expected_min,
        "outside_bit_identical": identical_max == 0.0,
    }


def _spans(positions: list[int]) -> list[list[int]]:
    """[[first, last], ...] runs, compact for the JSON record."""
    spans: list[list[int]] = []
    for p in positions:
        if spans and spans[-1][1] == p - 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return spans
