"""TurboQuant kernel check and micro-benchmark, no server start.

Correctness: for every preset and head dim 64/256/512, keys and values are stored with
tqstack's store kernel (anchors on), then
  * tqstack's decode kernel is compared with an independent fp64 reference
    (tq_reference: unpack the bytes with torch, exact attention), tolerance
    DECODE_TOL relative L2 (fp16 tensor-core operands);
  * the continuation-prefill dequantization is compared with the same reference
    (DEQUANT_TOL, fp16 output);
  * the sink must come back bit-exact and the centre must not change attention
    (the reference also reads mu + dequant).
Speed (--bench): per shape (model full layers, context, batch), µs per call of
  upstream's 0.26.0 TurboQuant decode, tqstack's decode, and a bf16 paged Triton
  decode over the same shape, with achieved bytes/s against a measured copy bandwidth
  (bandwidth_fraction = KV bytes read per second / bytes moved per second by a device copy,
  read + write; the committed runs 1-4 of 2026-12-03 divided by half the copy rate).

  python3 tests/gpu/kernels/check_tq_kernels.py [--bench] [--out results.jsonl]

Runs with a full vLLM on PYTHONPATH or, without one, from the kernel sources copied by
tests/gpu/kernels/stage_sources.sh (pure Triton files only).
Interpreter mode (TRITON_INTERPRET=1, CPU) runs the correctness part at small sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tq_reference as ref  # noqa: E402

DECODE_TOL = 1e-2  # fp16 operands on tensor cores, fp32 accumulation
DEQUANT_TOL = 2e-3  # fp16 rounding of dequantized K/V
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def import_kernels():
    try:
        import vllm  # noqa: F401

        source = "vllm"
    except ImportError:
        import stub_vllm

        stub_vllm.install(Path(os.environ.get("TQ_KERNEL_SOURCES", "build/tq-kernel-sources")))
        source = "staged sources"
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.v1.attention.ops import tqstack_turboquant as tq
    from vllm.v1.attention.ops import triton_turboquant_decode as upstream_decode

    return tq, upstream_decode, get_centroids, source


def make_cache(num_blocks, page, hk, d, preset, device):
    return ref.empty_cache(num_blocks, page, hk, preset, d, device)


def store_codebook(tq, preset, d, device):
    """Decision boundaries of the store codebook (FP8 keys: unused, any sorted table)."""
    key_bits = ref.PRESETS[preset][0]
    c = tq.tq_codebook(d, 4 if key_bits == 8 else key_bits).to(device)
    return (c[:-1] + c[1:]) / 2


def realistic_keys(n, hk, d, device, dtype, gen):
    """Keys with a shared per-channel offset and a large first (sink) token, as
    seen in Gemma-family models; values plain Gaussian."""
    offset = torch.randn(hk, d, device=device, generator=gen) * 3.0
    k = torch.randn(n, hk, d, device=device, generator=gen) + offset
    k[0] = k[0] * 4.0
    v = torch.randn(n, hk, d, device=device, generator=gen)
    return k.to(dtype), v.to(dtype)


def store_request(tq, cache, side, keys, values, block_row, preset, Pi_T, chunk, fp8_e4b15=None,
                  recent=None, row=0):
    """Store one request chunk by chunk through the anchor + store kernels; with a recent window,
    as the request in batch row `row` (the rows before it hold empty requests)."""
    key_bits, val_bits, nc = ref.PRESETS[preset]
    device = keys.device
    page = cache.shape[1]
    n = keys.shape[0]
    midpoints = store_codebook(tq, preset, keys.shape[-1], device)
    bt = block_row[None, :].to(torch.int32)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        qsl = torch.tensor([0, end - start], dtype=torch.int32, device=device)
        seq = torch.tensor([end], dtype=torch.int32, device=device)
        k, v = keys[start:end], values[start:end]
        tq.tq_write_anchors(k, v, side, qsl, seq, bt)
        blk = tq.token_anchor_blocks(end - start, qsl, bt)
        centre = side[blk, :, tq.ANCHOR_MU]
        pos = torch.arange(start, end, device=device)
        slots = (block_row[pos // page].long() * page + pos % page).to(torch.int64)
        window = {}
        if recent is not None:
            i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
            window = dict(recent=recent, token_req=torch.full((end - start,), row, dtype=torch.int32, device=device),
                          query_start_loc=i32([0] * (row + 1) + [end - start]), seq_lens=i32([0] * row + [end]))
        tq.tq_store(k, v, cache, slots, centre, Pi_T, midpoints, key_bits=key_bits,
                    value_quant_bits=val_bits, norm_correction=nc, fp8_e4b15=fp8_e4b15, **window)


def stored_batch(tq, preset, d, hk, seq_lens, page, device, dtype, gen, *, seed, fp8_e4b15=None, recent=None):
    """Requests of ``seq_lens`` (realistic keys) stored in thirds into one paged cache whose blocks are
    shuffled (block 0 left unused), each as batch row b. Returns cache, side, Pi, Pi_T, block table,
    blocks per request and the original (keys, values) per request."""
    blocks_per = [math.ceil(s / page) for s in seq_lens]
    num_blocks = sum(blocks_per) + 3
    cache = make_cache(num_blocks, page, hk, d, preset, device)
    side = torch.zeros(num_blocks, hk, 3, d, dtype=dtype, device=device)
    Pi, Pi_T = tq.tq_rotation(d, device)
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    bt = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32, device=device)
    kv, used = [], 0
    for b, s in enumerate(seq_lens):
        row = perm[used: used + blocks_per[b]].to(device)
        used += blocks_per[b]
        bt[b, : blocks_per[b]] = row.to(torch.int32)
        keys, values = realistic_keys(s, hk, d, device, dtype, gen)
        store_request(tq, cache, side, keys, values, row, preset, Pi_T, chunk=max(1, s // 3),
                      fp8_e4b15=fp8_e4b15, recent=recent, row=b)
        kv.append((keys, values))
    return cache, side, Pi, Pi_T, bt, blocks_per, kv


def check_case(tq, preset, d, hq, hk, seq_lens, page, device, dtype, gen, splits=32, fp8_e4b15=None):
    key_bits, val_bits, nc = ref.PRESETS[preset]
    B = len(seq_lens)
    cache, side, Pi, Pi_T, bt, _, kv = stored_batch(tq, preset, d, hk, seq_lens, page, device, dtype, gen, seed=1,
                                                    fp8_e4b15=fp8_e4b15)
    q = torch.randn(B, hq, d, device=device, dtype=dtype, generator=gen)
    scale = 1.0 / math.sqrt(d)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = torch.full((B, hq, d), float("nan"), dtype=dtype, device=device)
    tq.tq_decode(q, cache, side, bt, seq_t, Pi_T, scale, key_bits, val_bits, num_splits=splits, output=out,
                 fp8_e4b15=fp8_e4b15)
    errs, quant_errs, deq_errs = [], [], []
    sink_exact = True
    for b, s in enumerate(seq_lens):
        k_ref, v_ref = ref.dequantize_tokens(cache, bt[b], s, preset, Pi, side)
        o_ref = ref.attention(q[b], k_ref, v_ref, scale)
        errs.append(ref.relative_error(out[b], o_ref))
        keys, values = kv[b]
        o_exact = ref.attention(q[b], keys.double(), values.double(), scale)
        quant_errs.append(ref.relative_error(o_ref, o_exact))
        sink_exact &= bool(torch.equal(k_ref[0].to(dtype), keys[0]) and torch.equal(v_ref[0].to(dtype), values[0]))
        # continuation-prefill dequantization of the same request
        k_buf = torch.empty(hk, s, d, dtype=torch.float16, device=device)
        v_buf = torch.empty_like(k_buf)
        k_deq = torch.full((s, hk, d), float("nan"), dtype=torch.float32, device=device)
        v_deq = torch.full_like(k_deq, float("nan"))
        tq.tq_dequant_request(cache, bt[b], side, s, Pi, key_bits, val_bits, k_buf, v_buf, k_deq, v_deq,
                              fp8_e4b15=fp8_e4b15)
        nan_free_deq = bool(torch.isfinite(k_deq).all() and torch.isfinite(v_deq).all())
        sink_exact &= nan_free_deq
        deq_errs.append(max(ref.relative_error(k_deq, k_ref), ref.relative_error(v_deq, v_ref)))
    nan_free = bool(torch.isfinite(out).all())
    return {
        "preset": preset, "fp8_e4b15": fp8_e4b15, "head_dim": d, "num_heads": hq, "num_kv_heads": hk, "seq_lens": seq_lens,
        "page": page, "decode_rel_err_max": max(errs), "decode_tol": DECODE_TOL,
        "dequant_rel_err_max": max(deq_errs), "dequant_tol": DEQUANT_TOL,
        "quantization_rel_err_vs_exact_attention": max(quant_errs),
        "sink_exact": sink_exact, "all_written": nan_free,
        "ok": nan_free and sink_exact and max(errs) <= DECODE_TOL and max(deq_errs) <= DEQUANT_TOL,
    }


def recent_check(tq, preset, d, hq, hk, seq_lens, page, window, device, dtype, gen, splits=32):
    """Decode with a recent window against the fp64 reference that reads the window's format
    (tq_reference.apply_recent_window): entries whose tags match are taken exactly; rows of
    another request, and entries whose slot was rewritten since, are ignored."""
    key_bits, val_bits, nc = ref.PRESETS[preset]
    B = len(seq_lens)
    recent = tq.recent_window_empty(B + 1, window, hk, d, device)
    cache, side, Pi, Pi_T, bt, blocks_per, kv = stored_batch(tq, preset, d, hk, seq_lens, page, device, dtype, gen,
                                                             seed=2, recent=recent)
    q = torch.randn(B, hq, d, device=device, dtype=dtype, generator=gen)
    scale = 1.0 / math.sqrt(d)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    rows = torch.arange(B, dtype=torch.int32, device=device)

    def decode(q_, bt_, seq_, rows_):
        return tq.tq_decode(q_, cache, side, bt_, seq_, Pi_T, scale, key_bits, val_bits, num_splits=splits,
                            recent=None if rows_ is None else recent, recent_rows=rows_)

    out_win, out_plain = decode(q, bt, seq_t, rows), decode(q, bt, seq_t, None)
    # every request reading the next request's row (the last reads the empty row B): nothing matches
    out_moved = decode(q, bt, seq_t, rows + 1)
    errs, gains, taken = [], [], 0
    for b, s in enumerate(seq_lens):
        k_deq, v_deq = ref.dequantize_tokens(cache, bt[b], s, preset, Pi, side)
        k_ref, v_ref, n = ref.apply_recent_window(k_deq, v_deq, cache, bt[b], s, preset, Pi, side,
                                                  recent.entries, recent.tags, b)
        taken += n
        errs.append(ref.relative_error(out_win[b], ref.attention(q[b], k_ref, v_ref, scale)))
        keys, values = kv[b]
        exact = ref.attention(q[b], keys.double(), values.double(), scale)
        gains.append((ref.relative_error(out_win[b], exact), ref.relative_error(out_plain[b], exact)))
    expected = sum(min(window, s - 1) for s in seq_lens) * hk
    moved_diff = ref.relative_error(out_moved, out_plain)
    # Several queries of the last request in one row (a short continuation chunk through the decode
    # kernel): query j sees lengths s - m + 1 + j, the window holds positions up to s - 1.
    b, s = B - 1, seq_lens[-1]
    m = min(4, s)
    lens = torch.arange(s - m + 1, s + 1, dtype=torch.int32, device=device)
    q_chunk = torch.randn(m, hq, d, device=device, dtype=dtype, generator=gen)
    out_chunk = decode(q_chunk, bt[b: b + 1].expand(m, -1), lens, torch.full((m,), b, dtype=torch.int32,
                                                                               device=device))
    k_deq, v_deq = ref.dequantize_tokens(cache, bt[b], s, preset, Pi, side)
    for j in range(m):
        L = int(lens[j])
        k_ref, v_ref, _ = ref.apply_recent_window(k_deq[:L], v_deq[:L], cache, bt[b], L, preset, Pi, side,
                                                  recent.entries, recent.tags, b, ring_len=s)
        errs.append(ref.relative_error(out_chunk[j], ref.attention(q_chunk[j], k_ref, v_ref, scale)))
    # Rewrite request 0's slots with other keys, leaving its window entries behind (as when a block is
    # freed and reused): their slot tags still match, their fingerprints no longer do.
    s0 = seq_lens[0]
    keys, values = realistic_keys(s0, hk, d, device, dtype, gen)
    store_request(tq, cache, side, keys, values, bt[0, : blocks_per[0]].long(), preset, Pi_T, chunk=s0)
    stale_diff = ref.relative_error(decode(q[:1], bt[:1], seq_t[:1], rows[:1]), decode(q[:1], bt[:1], seq_t[:1], None))
    # Window positions go through their own pass (another split of the softmax), so "nothing taken" equals
    # the plain decode up to fp16 rounding of the partition, far below the window's own effect.
    window_effect = ref.relative_error(out_win, out_plain)
    ok = (max(errs) <= DECODE_TOL and taken == expected and moved_diff <= 1e-3 and stale_diff <= 1e-3
          and bool(torch.isfinite(out_win).all()))
    return {"kind": "recent_window", "preset": preset, "head_dim": d, "num_heads": hq, "num_kv_heads": hk,
            "seq_lens": seq_lens, "page": page, "window": window, "decode_rel_err_max": max(errs),
            "decode_tol": DECODE_TOL, "entries_taken": taken, "entries_expected": expected,
            "other_row_rel_diff": moved_diff, "rewritten_slot_rel_diff": stale_diff, "window_effect_rel": window_effect,
            "attention_rel_err_vs_exact_window": max(g[0] for g in gains),
            "attention_rel_err_vs_exact_no_window": max(g[1] for g in gains), "ok": ok}


def anchor_gain(tq, preset, d, seq_len, device, dtype, gen, trials=4):
    """Attention error against exact attention (fp64, original K/V), with and without
    anchors, on keys with a shared per-channel offset and a dominant first token;
    queries lean towards the sink, as in real attention."""
    key_bits, val_bits, nc = ref.PRESETS[preset]
    page, hk, hq = 16, 1, 4
    blocks = math.ceil(seq_len / page)
    Pi, Pi_T = tq.tq_rotation(d, device)
    midpoints = store_codebook(tq, preset, d, device)
    row = torch.arange(1, blocks + 1, device=device)
    bt = row[None].to(torch.int32)
    seq = torch.tensor([seq_len], dtype=torch.int32, device=device)
    errs = {"anchored": [], "plain": []}
    for _ in range(trials):
        keys, values = realistic_keys(seq_len, hk, d, device, dtype, gen)
        q = (0.0012 * keys[0].float() + torch.randn(hq, d, device=device, generator=gen)).to(dtype)[None]
        exact = ref.attention(q[0], keys.double(), values.double(), 1 / math.sqrt(d))
        for mode in errs:
            cache = make_cache(blocks + 1, page, hk, d, preset, device)
            side = torch.zeros(blocks + 1, hk, 3, d, dtype=dtype, device=device)
            if mode == "anchored":
                store_request(tq, cache, side, keys, values, row, preset, Pi_T, chunk=seq_len)
            else:
                slots = (row[torch.arange(seq_len, device=device) // page] * page
                         + torch.arange(seq_len, device=device) % page)
                tq.tq_store(keys, values, cache, slots, None, Pi_T, midpoints, key_bits=key_bits,
                            value_quant_bits=val_bits, norm_correction=nc)
            out = tq.tq_decode(q, cache, side if mode == "anchored" else None, bt, seq, Pi_T,
                               1 / math.sqrt(d), key_bits, val_bits, num_splits=4)
            errs[mode].append(ref.relative_error(out[0], exact))
    return {"kind": "anchor_gain", "preset": preset, "head_dim": d, "seq_len": seq_len,
            "attention_rel_err_anchored": sum(errs["anchored"]) / trials,
            "attention_rel_err_plain": sum(errs["plain"]) / trials}


def prefill_check(tq, d, hq, hk, q_lens, k_lens, device, dtype, gen):
    """tq_contiguous_attention (patch 0013) against fp64 causal attention, bottom-right aligned."""
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    starts = [0]
    for n in k_lens[:-1]:
        starts.append(starts[-1] + n)
    q = torch.randn(cu_q[-1], hq, d, device=device, generator=gen).to(dtype)
    k = torch.randn(sum(k_lens), hk, d, device=device, generator=gen).to(dtype)
    v = torch.randn(sum(k_lens), hk, d, device=device, generator=gen).to(dtype)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    out = tq.tq_contiguous_attention(q, k, v, i32(cu_q), i32(starts), i32(k_lens), max(q_lens), max(k_lens),
                                     d ** -0.5)
    errs = []
    for i, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        qi = q[cu_q[i]:cu_q[i + 1]].double()
        ki = k[starts[i]:starts[i] + nk].double().repeat_interleave(hq // hk, dim=1)
        vi = v[starts[i]:starts[i] + nk].double().repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * d ** -0.5
        allowed = torch.arange(nk, device=device)[None, :] <= (torch.arange(nq, device=device)[:, None] + nk - nq)
        ref_out = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), vi)
        errs.append(ref.relative_error(out[cu_q[i]:cu_q[i + 1]], ref_out))
    return {"kind": "prefill", "head_dim": d, "num_heads": hq, "num_kv_heads": hk, "q_lens": q_lens,
            "k_lens": k_lens, "rel_err_max": max(errs), "tol": DECODE_TOL, "ok": max(errs) <= DECODE_TOL}


def tp_split_check(tq, preset, d, hq, hk, tp, seq_len, device, dtype, gen):
    """Tensor parallelism: each rank holds hk/tp KV heads with their query heads, its own cache,
    anchors and recent window. Decoding every rank's shard and concatenating must equal the unsharded decode."""
    key_bits, val_bits, nc = ref.PRESETS[preset]
    page = 16
    blocks = math.ceil(seq_len / page)
    row = torch.arange(1, blocks + 1, device=device)
    bt = row[None].to(torch.int32)
    seq = torch.tensor([seq_len], dtype=torch.int32, device=device)
    Pi, Pi_T = tq.tq_rotation(d, device)
    keys, values = realistic_keys(seq_len, hk, d, device, dtype, gen)
    q = torch.randn(1, hq, d, device=device, generator=gen).to(dtype)

    def decode(k, v, qq):
        # each rank also holds the recent window of its own KV heads (the newest quarter of the request)
        cache = make_cache(blocks + 1, page, k.shape[1], d, preset, device)
        side = torch.zeros(blocks + 1, k.shape[1], 3, d, dtype=dtype, device=device)
        recent = tq.recent_window_empty(1, max(1, seq_len // 4), k.shape[1], d, device)
        store_request(tq, cache, side, k, v, row, preset, Pi_T, chunk=max(1, seq_len // 2), recent=recent)
        return tq.tq_decode(qq, cache, side, bt, seq, Pi_T, d ** -0.5, key_bits, val_bits, 8, recent=recent,
                            recent_rows=torch.zeros(1, dtype=torch.int32, device=device))

    full = decode(keys, values, q)
    hk_r, hq_r = hk // tp, hq // tp
    shards = [decode(keys[:, r * hk_r:(r + 1) * hk_r].contiguous(), values[:, r * hk_r:(r + 1) * hk_r].contiguous(),
                     q[:, r * hq_r:(r + 1) * hq_r].contiguous()) for r in range(tp)]
    sharded = torch.cat(shards, dim=1)
    diff = float((sharded.float() - full.float()).abs().max())
    # Same math per head; only GEMM rounding (rotation of a different number of rows) may differ.
    rel = ref.relative_error(sharded, full)
    return {"kind": "tp_split", "preset": preset, "head_dim": d, "num_heads": hq, "num_kv_heads": hk, "tp": tp,
            "max_abs_diff": diff, "rel_err": rel, "identical": diff == 0.0, "ok": rel <= DECODE_TOL}


def run_checks(tq, device, out_rows):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if not INTERPRET else torch.float16
    if INTERPRET:
        # the last shape runs the default 32-token decode tile at head_dim 256 (pages of 64 tokens)
        shapes = [(64, 4, 2, [5, 37], 16), (256, 2, 1, [40], 16), (256, 4, 1, [70], 64)]
    else:
        shapes = [(64, 8, 2, [1, 17, 700, 5000], 16), (256, 24, 4, [2, 300, 4100], 16),
                  (256, 8, 1, [2000], 3072), (512, 32, 4, [1, 129, 3000], 128), (512, 8, 1, [2500], 128)]
    ok = True
    for preset in ref.PRESETS:
        for d, hq, hk, seqs, page in shapes:
            row = check_case(tq, preset, d, hq, hk, seqs, page, device, dtype, gen)
            row["kind"] = "correctness"
            out_rows.append(row)
            ok &= row["ok"]
            print(f"{preset:20s} D={d:3d} Hq={hq:2d} Hk={hk} page={page:4d} decode err {row['decode_rel_err_max']:.2e} "
                  f"dequant err {row['dequant_rel_err_max']:.2e} quant-vs-exact {row['quantization_rel_err_vs_exact_attention']:.3f} "
                  f"sink exact {row['sink_exact']} -> {'ok' if row['ok'] else 'FAIL'}", flush=True)
    # FP8 keys as GPUs before sm_89 store them (e4b15 with a 2^-8 shift): the same bytes as e4m3, so the
    # same reference; keys with |k - mu| up to ~10 cover e4b15's 1.75 limit without the shift.
    d, hq, hk, seqs, page = shapes[1]
    try:
        row = check_case(tq, "turboquant_k8v4", d, hq, hk, seqs, page, device, dtype, gen, fp8_e4b15=1)
        row["kind"] = "correctness"
        out_rows.append(row)
        ok &= row["ok"]
        print(f"turboquant_k8v4 as e4b15 (sm < 8.9) D={d}: decode err {row['decode_rel_err_max']:.2e} "
              f"dequant err {row['dequant_rel_err_max']:.2e} -> {'ok' if row['ok'] else 'FAIL'}", flush=True)
    except Exception as error:  # a Triton build without e4b15 conversions for this GPU
        out_rows.append({"kind": "correctness", "preset": "turboquant_k8v4", "fp8_e4b15": 1,
                         "skipped": repr(error)[:300]})
        print(f"turboquant_k8v4 as e4b15: skipped ({error!r:.120})", flush=True)
    if not INTERPRET:
        try:
            for d, hq, hk, q_lens, k_lens in [(512, 32, 4, [2048, 300], [2048, 9000]), (256, 24, 4, [700], [5000]),
                                              (512, 8, 1, [1, 4096], [33, 4096])]:
                row = prefill_check(tq, d, hq, hk, q_lens, k_lens, device, dtype, gen)
                out_rows.append(row)
                ok &= row["ok"]
                print(f"prefill D={d} Hq={hq} Hk={hk} q={q_lens} k={k_lens}: err {row['rel_err_max']:.2e} "
                      f"-> {'ok' if row['ok'] else 'FAIL'}", flush=True)
        except ImportError as error:  # staged sources hold no unified attention: needs a full vLLM
            out_rows.append({"kind": "prefill", "skipped": f"needs a full vLLM install: {error}"})
            print(f"prefill checks skipped: {error}", flush=True)
    window_shapes = ([(64, 4, 2, [5, 37], 16, 16), (256, 4, 1, [70], 64, 48)] if INTERPRET else
                     [(64, 8, 2, [1, 17, 700], 16, 128), (256, 24, 4, [2, 300, 4100], 16, 128),
                      (512, 32, 4, [1, 129, 3000], 128, 128), (512, 8, 1, [2500], 128, 48)])
    for preset in ref.PRESETS:
        for i, (d, hq, hk, seqs, page, window) in enumerate(window_shapes):
            if INTERPRET and i and preset not in ("turboquant_4bit_nc", "turboquant_k8v4"):
                continue
            row = recent_check(tq, preset, d, hq, hk, seqs, page, window, device, dtype, gen)
            out_rows.append(row)
            ok &= row["ok"]
            print(f"{preset:20s} D={d:3d} recent window {window:3d}: decode err {row['decode_rel_err_max']:.2e}, "
                  f"entries taken {row['entries_taken']}/{row['entries_expected']}, other row / rewritten slot "
                  f"diff {row['other_row_rel_diff']:.1e} / {row['rewritten_slot_rel_diff']:.1e}, vs exact "
                  f"{row['attention_rel_err_vs_exact_window']:.4f} (no window "
                  f"{row['attention_rel_err_vs_exact_no_window']:.4f}) -> {'ok' if row['ok'] else 'FAIL'}",
                  flush=True)
    for preset in ("turboquant_4bit_nc", "turboquant_k8v4"):
        row = tp_split_check(tq, preset, 64 if INTERPRET else 512, 8, 4, 4 if not INTERPRET else 2,
                             40 if INTERPRET else 3000, device, dtype, gen)
        out_rows.append(row)
        ok &= row["ok"]
        print(f"{preset:20s} TP={row['tp']} shards vs unsharded: max |diff| {row['max_abs_diff']:.1e} "
              f"-> {'ok' if row['ok'] else 'FAIL'}", flush=True)
    for preset in ref.PRESETS:
        gain = anchor_gain(tq, preset, 256, 64 if INTERPRET else 2048, device, dtype, gen)
        out_rows.append(gain)
        print(f"{preset:20s} attention error vs exact: anchored {gain['attention_rel_err_anchored']:.4f}, "
              f"without anchors {gain['attention_rel_err_plain']:.4f}", flush=True)
    return ok


# --------------------------------------------------------------------------- speed


def copy_bandwidth(device):
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    import triton

    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)


def bench_shapes(quick):
    # (model, Hq, Hk, D): full-attention layers at TP=1
    models = [("gemma-4-31b", 32, 4, 512), ("qwen3.6-27b", 24, 4, 256)]
    contexts = [1024, 8192, 32768, 131072] if not quick else [1024, 32768]
    batches = [1, 8, 32] if not quick else [1, 8]
    for name, hq, hk, d in models:
        for ctx in contexts:
            for b in batches:
                if b * ctx > 32 * 32768:
                    continue
                yield name, hq, hk, d, ctx, b


def window_for_bench(tq, cache, bt, ctx, preset, d, hk, window=128):
    """A recent window whose entries match the newest `window` positions of every request."""
    b, page = bt.shape[0], cache.shape[1]
    recent = tq.recent_window_empty(b, window, hk, d, cache.device)
    recent.entries.normal_()
    pos = torch.arange(max(ctx - window, 0), ctx, device=cache.device)
    for r in range(b):
        blocks = bt[r, pos // page].long()
        fp = ref.fingerprint(ref.token_fields(cache, blocks, pos % page, preset, d))
        recent.tags[r, pos % window, :, 0] = (blocks * page + pos % page).to(torch.int32)[:, None]
        recent.tags[r, pos % window, :, 1] = fp
    return recent


def bench(tq, upstream, get_centroids, device, out_rows, quick, presets, tile_sweep=True):
    import triton
    from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

    bw = copy_bandwidth(device)
    print(f"device copy bandwidth (read + write): {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    page = 128
    for name, hq, hk, d, ctx, b in bench_shapes(quick):
        blocks = b * math.ceil(ctx / page)
        bt = (torch.randperm(blocks, device=device) + 1).to(torch.int32).reshape(b, -1)
        seq = torch.full((b,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16, generator=gen)
        scale = 1 / math.sqrt(d)
        # bf16 paged baseline: the same tokens in a bf16 cache
        kb = torch.randn(blocks + 1, page, hk, d, device=device, dtype=torch.bfloat16, generator=gen)
        vb = torch.randn_like(kb)
        o = torch.empty(b, hq, d, device=device, dtype=torch.bfloat16)
        splits = 32
        att_logits = torch.empty(b, hq, splits, d + 1, device=device, dtype=torch.float32)
        lse = torch.empty(b, hq, device=device, dtype=torch.float32)
        fn = lambda: decode_attention_fwd(q, kb, vb, o, lse, bt, seq, att_logits, splits, scale, page)  # noqa: E731
        rows = []
        try:
            t_bf16 = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            rows.append(("bf16", "triton_decode_attention", t_bf16, b * ctx * hk * d * 2 * 2))
        except Exception as e:  # a failing baseline must not cost the other rows
            out_rows.append({"kind": "speed-error", "model": name, "context": ctx, "batch": b,
                             "kernel": "triton_decode_attention", "error": repr(e)[:500]})
        del kb, vb
        for preset in presets:
            key_bits, val_bits, nc = ref.PRESETS[preset]
            cache = make_cache(blocks + 1, page, hk, d, preset, device)
            kps = d if key_bits == 8 else d * key_bits // 8 + 2  # upstream's slot: key bytes + fp16 norm
            lay = ref.layout(preset, d, page)
            reg = ref.regions(cache)
            reg.random_(0, 256)
            if key_bits == 8:  # finite FP8 keys
                reg[..., : lay["val_off"]] = torch.randint(0, 0x7E, reg[..., : lay["val_off"]].shape,
                                                           device=device, dtype=torch.uint8)
            # finite fp16 scales and zeros in every region (tqstack's format; upstream reads other bytes)
            meta = reg[..., lay["val_scale_off"]:]
            meta.copy_(torch.tensor([0x00, 0x20], dtype=torch.uint8, device=device).repeat(meta.shape[-1] // 2))
            side = torch.randn(blocks + 1, hk, 3, d, device=device, dtype=torch.bfloat16, generator=gen)
            Pi, Pi_T = tq.tq_rotation(d, device)
            centroids = get_centroids(d, val_bits if key_bits == 8 else key_bits).float().to(device)  # upstream
            mid_o = torch.empty(b, hq, splits, d, device=device, dtype=torch.float32)
            mid_l = torch.empty(b, hq, splits, device=device, dtype=torch.float32)
            out = torch.empty(b, hq, d, device=device, dtype=torch.bfloat16)
            fn_new = lambda: tq.tq_decode(q, cache, side, bt, seq, Pi_T, scale, key_bits,  # noqa: E731
                                          val_bits, splits, mid_o, mid_l, out)
            t_new = triton.testing.do_bench(fn_new, warmup=25, rep=100, return_mode="median")
            if preset == "turboquant_4bit_nc" and tile_sweep:
                # tile shapes around the default, same inputs: what the defaults are chosen from
                for tile in ((16, 4), (32, 4), (32, 8), (64, 8)):
                    fn_t = lambda: tq.tq_decode(q, cache, side, bt, seq, Pi_T, scale, key_bits,  # noqa: E731
                                                val_bits, splits, mid_o, mid_l, out, tile=tile)
                    try:
                        t_t = triton.testing.do_bench(fn_t, warmup=25, rep=100, return_mode="median")
                        out_rows.append({"kind": "tile", "model": name, "context": ctx, "batch": b, "head_dim": d,
                                         "kv_cache_dtype": preset, "tile_tokens": tile[0], "num_warps": tile[1],
                                         "us_per_call": t_t * 1e3})
                    except Exception as e:
                        out_rows.append({"kind": "tile", "model": name, "context": ctx, "batch": b,
                                         "tile_tokens": tile[0], "num_warps": tile[1], "error": repr(e)[:300]})
            if preset in ("turboquant_4bit_nc", "turboquant_k8v4"):
                # with the recent window (patch 0014): the newest 128 positions of every request match
                # their window entries, so the last tiles read both the cache and the window
                recent = window_for_bench(tq, cache, bt, ctx, preset, d, hk)
                rows_b = torch.arange(b, dtype=torch.int32, device=device)
                fn_w = lambda: tq.tq_decode(q, cache, side, bt, seq, Pi_T, scale, key_bits,  # noqa: E731
                                            val_bits, splits, mid_o, mid_l, out, recent=recent, recent_rows=rows_b)
                t_w = triton.testing.do_bench(fn_w, warmup=25, rep=100, return_mode="median")
                rows.append((preset, "tqstack+window", t_w, b * ctx * hk * cache.shape[-1]))
                del recent
            fn_old = lambda: upstream.triton_turboquant_decode_attention(  # noqa: E731
                q, cache, bt, seq, Pi, centroids, scale, 0 if key_bits == 8 else key_bits, kps, val_bits,
                key_fp8=key_bits == 8, norm_correction=nc, PiT=Pi_T, max_num_kv_splits=splits)
            nbytes = b * ctx * hk * cache.shape[-1]
            rows.append((preset, "tqstack", t_new, nbytes))
            try:
                t_old = triton.testing.do_bench(fn_old, warmup=25, rep=100, return_mode="median")
                rows.append((preset, "upstream-0.26.0", t_old, nbytes))
            except Exception as e:
                out_rows.append({"kind": "speed-error", "model": name, "context": ctx, "batch": b,
                                 "kernel": "upstream-0.26.0", "kv_cache_dtype": preset, "error": repr(e)[:500]})
        for kv_dtype, kernel, ms, nbytes in rows:
            rec = {"kind": "speed", "model": name, "num_heads": hq, "num_kv_heads": hk, "head_dim": d,
                   "context": ctx, "batch": b, "page": page, "kv_cache_dtype": kv_dtype, "kernel": kernel,
                   "us_per_call": ms * 1e3, "kv_bytes": nbytes, "achieved_gb_s": nbytes / (ms * 1e-3) / 1e9,
                   "copy_bandwidth_gb_s": bw / 1e9, "bandwidth_fraction": nbytes / (ms * 1e-3) / bw,
                   "gpu": torch.cuda.get_device_name(0)}
            out_rows.append(rec)
        line = " ".join(f"{k}/{kern[:3]} {ms * 1e3:7.1f}us" for k, kern, ms, _ in rows)
        print(f"{name} ctx={ctx:6d} B={b:2d}: {line}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="also time the kernels")
    ap.add_argument("--quick", action="store_true", help="fewer benchmark shapes")
    ap.add_argument("--no-check", action="store_true", help="skip correctness")
    ap.add_argument("--presets", default=",".join(ref.PRESETS))
    ap.add_argument("--out", type=Path, default=None, help="JSON lines results file")
    args = ap.parse_args()
    tq, upstream, get_centroids, source = import_kernels()
    device = "cpu" if INTERPRET else "cuda"
    rows: list[dict] = [{"kind": "meta", "source": source, "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}]
    ok = True
    try:
        if not args.no_check:
            ok = run_checks(tq, device, rows)
        if args.bench and not INTERPRET:
            bench(tq, upstream, get_centroids, device, rows, args.quick, args.presets.split(","))
    finally:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("w") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")
    print("kernel checks:", "all ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
