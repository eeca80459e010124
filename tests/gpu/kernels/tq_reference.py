"""Independent fp64 reference for tqstack's TurboQuant cache format.

Unpacks the bytes of a paged TurboQuant cache with plain torch (no Triton), rebuilds
every token's key and value exactly as the format defines them, and computes exact
attention in float64. The kernels under test are compared with this, never with
themselves.

Slot layout per (block, position, kv head), `key_packed_size` + value bytes:
  3/4-bit keys: indices of R(k - mu)/|k - mu| packed LSB-first, then an fp16 scale
                (|k - mu| / |c| for the norm-corrected presets): k = mu + scale * c @ Pi
  FP8 keys:     k - mu as float8 e4m3
  values:       3/4-bit codes packed LSB-first, fp16 scale, fp16 zero: v = code * scale + zero
Anchors (side[block0, kv_head]): exact sink key, sink value, centre mu.
"""

from __future__ import annotations

import math

import torch

PRESETS = {
    "turboquant_k8v4": (8, 4, False),
    "turboquant_4bit_nc": (4, 4, True),
    "turboquant_k3v4_nc": (3, 4, True),
    "turboquant_3bit_nc": (3, 3, True),
}


def unpack_codes(raw: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """raw: [..., nbytes] uint8 -> [..., count] int64 codes, LSB-first."""
    r = raw.long()
    bit = torch.arange(count, device=raw.device) * bits
    byte, shift = bit // 8, bit % 8
    lo = r[..., byte]
    hi = r[..., (byte + 1).clamp(max=r.shape[-1] - 1)]
    return ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)


def fp16_at(raw: torch.Tensor, offset: int) -> torch.Tensor:
    pair = raw[..., offset : offset + 2].contiguous()
    return pair.view(torch.float16).squeeze(-1).double()


def dequantize_tokens(kv_cache, block_table_row, seq_len, preset, centroids, Pi, side=None):
    """Keys and values [seq_len, Hk, D] (float64) of one request, anchors applied."""
    key_bits, val_bits, _ = PRESETS[preset]
    num_blocks, page, hk, _slot = kv_cache.shape
    D = Pi.shape[0]
    pos = torch.arange(seq_len, device=kv_cache.device)
    blocks = block_table_row[pos // page].long()
    slots = kv_cache[blocks, pos % page]  # [L, Hk, slot]
    if key_bits == 8:
        kps = D
        k = slots[..., :D].contiguous().view(torch.float8_e4m3fn).double()
    else:
        mse_bytes = math.ceil(D * key_bits / 8)
        kps = mse_bytes + 2
        codes = unpack_codes(slots[..., :mse_bytes], key_bits, D)
        scale = fp16_at(slots, mse_bytes)
        k = (centroids.double()[codes] * scale[..., None]) @ Pi.double()
    vbytes = math.ceil(D * val_bits / 8)
    vcodes = unpack_codes(slots[..., kps : kps + vbytes], val_bits, D).double()
    v = vcodes * fp16_at(slots, kps + vbytes)[..., None] + fp16_at(slots, kps + vbytes + 2)[..., None]
    if side is not None:
        anchors = side[block_table_row[0].long()].double()  # [Hk, 3, D]
        k = k + anchors[:, 2][None]
        k[0] = anchors[:, 0]
        v[0] = anchors[:, 1]
    return k, v


def attention(q, k, v, scale):
    """q [Hq, D], k/v [L, Hk, D] -> [Hq, D], float64, GQA by head groups."""
    hq, hk = q.shape[0], k.shape[1]
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("hd,lhd->hl", q.double(), k) * scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
