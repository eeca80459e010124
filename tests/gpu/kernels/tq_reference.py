"""Independent fp64 reference for tqstack's TurboQuant cache format.

Reads the bytes of a paged TurboQuant cache with plain torch (no Triton), rebuilds every
token's key and value exactly as the format defines them, and computes exact attention in
float64. The kernels under test are compared with this, never with themselves.

Format. The cache is [blocks, Hk, page, slot] bytes (the backend views it as
[blocks, page, Hk, slot]); each (block, KV head) region of page * slot bytes holds, by field:
  [page x key row][page x value row][page x fp16 value scale][page x fp16 value zero]
  [page x fp16 key scale]   (the key scale only for 3/4-bit keys)
  key row, FP8 keys:     k - mu as float8 e4m3, element order
  key row, 3/4-bit keys: codes of R(k - mu)/|k - mu|; k = mu + scale * u(code) @ Pi with the
                         codebook u(x) = x + B x^3 + C x^5, x = code - (2^bits - 1) / 2
  value row:             3/4-bit codes; v = code * scale + zero
  4-bit rows: byte j = code[j] | code[j + D/2] << 4. 3-bit rows: each half (D/2 codes)
  packed LSB-first, 8 codes per 3 bytes, the second half after the first.
Anchors (side[block0, kv_head]): exact sink key, sink value, centre mu.
Recent window (entries [rows, W, Hk, 2, D] fp16, tags [rows, W, Hk, 2] int32): entry
(row, p % W, h) holds position p of the request in batch row `row`: the key in the stored frame
(R(k - mu), or k - mu for FP8 keys) and the value, tagged with the cache slot and the int32
fingerprint vs | vz << 16 (^ ks << 8 for 3/4-bit keys) of the fp16 bits of the record's value
scale, value zero and key scale. Readers take it for positions p >= max(seq_len - W, 1) only when
both tags match the slot and the record in the cache.
"""

from __future__ import annotations

import torch

PRESETS = {  # name: (key bits (8 = FP8), value bits, norm correction)
    "turboquant_k8v4": (8, 4, False),
    "turboquant_4bit_nc": (4, 4, True),
    "turboquant_k3v4_nc": (3, 4, True),
    "turboquant_3bit_nc": (3, 3, True),
}

CODEBOOK_POLY = {4: (4.91771731e-04, 1.12628446e-04), 3: (9.75969e-03, 8.8971e-04)}  # bits: (B, C)


def codebook(bits: int) -> torch.Tensor:
    """u(code) for every code, float64."""
    b, c = CODEBOOK_POLY[bits]
    x = torch.arange(2**bits, dtype=torch.float64) - (2**bits - 1) / 2
    return x + b * x**3 + c * x**5


def slot_bytes(preset: str, d: int) -> int:
    """Bytes per (token, KV head), as the backend sizes a slot (upstream's sizes, rounded even)."""
    key_bits, val_bits, _ = PRESETS[preset]
    kps = d if key_bits == 8 else d * key_bits // 8 + 2
    slot = kps + d * val_bits // 8 + 4
    return slot + slot % 2


def layout(preset: str, d: int, page: int) -> dict[str, int]:
    key_bits, val_bits, _ = PRESETS[preset]
    key_row = d if key_bits == 8 else d * key_bits // 8
    val_row = d * val_bits // 8
    vs = page * (key_row + val_row)
    return {"key_row": key_row, "val_row": val_row, "val_off": page * key_row, "val_scale_off": vs,
            "val_zero_off": vs + 2 * page, "key_scale_off": vs + 4 * page}


def empty_cache(num_blocks: int, page: int, hk: int, preset: str, d: int, device) -> torch.Tensor:
    """A zeroed cache as the backend holds it: [blocks, page, Hk, slot] view of [blocks, Hk, page, slot]."""
    return torch.zeros(num_blocks, hk, page, slot_bytes(preset, d), dtype=torch.uint8, device=device).transpose(1, 2)


def regions(kv_cache: torch.Tensor) -> torch.Tensor:
    """[blocks, Hk, page * slot] bytes: one row per (block, KV head) region."""
    nb, page, hk, slot = kv_cache.shape
    return kv_cache.transpose(1, 2).reshape(nb, hk, page * slot)


def unpack_codes(raw: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """raw: [..., row bytes] uint8 -> [..., d] int64 codes in element order."""
    r = raw.long()
    if bits == 4:
        return torch.cat([r & 0xF, r >> 4], dim=-1)
    half = d // 2
    idx = torch.arange(half, device=raw.device) * 3
    byte, shift = idx // 8, idx % 8

    def one(part):
        nxt = (byte + 1).clamp(max=part.shape[-1] - 1)
        return ((part[..., byte] | (part[..., nxt] << 8)) >> shift) & 0x7

    hb = half * 3 // 8
    return torch.cat([one(r[..., :hb]), one(r[..., hb:])], dim=-1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., d] codes -> [..., row bytes] uint8 (the inverse of unpack_codes)."""
    c = codes.long()
    d = c.shape[-1]
    half = d // 2
    if bits == 4:
        return (c[..., :half] | (c[..., half:] << 4)).to(torch.uint8)

    def one(part):
        g = part.reshape(*part.shape[:-1], half // 8, 8)
        p24 = (g << (torch.arange(8) * 3)).sum(-1)
        return torch.stack([p24 & 0xFF, (p24 >> 8) & 0xFF, (p24 >> 16) & 0xFF], dim=-1).reshape(
            *part.shape[:-1], half * 3 // 8)

    return torch.cat([one(c[..., :half]), one(c[..., half:])], dim=-1).to(torch.uint8)


def token_fields(kv_cache: torch.Tensor, blocks: torch.Tensor, pos: torch.Tensor, preset: str, d: int) -> dict:
    """Raw fields of tokens (block, position): key/value rows [L, Hk, bytes], fp16 scales [L, Hk]."""
    page = kv_cache.shape[1]
    lay = layout(preset, d, page)
    reg = regions(kv_cache)[blocks.long()]  # [L, Hk, page * slot]

    def rows(off, width):
        idx = off + pos.long()[:, None] * width + torch.arange(width, device=pos.device)[None, :]
        return reg.gather(2, idx[:, None, :].expand(-1, reg.shape[1], -1))

    def fp16(off):
        return rows(off, 2).contiguous().view(torch.float16).squeeze(-1)

    out = {"key": rows(0, lay["key_row"]), "value": rows(lay["val_off"], lay["val_row"]),
           "val_scale": fp16(lay["val_scale_off"]), "val_zero": fp16(lay["val_zero_off"])}
    if PRESETS[preset][0] != 8:
        out["key_scale"] = fp16(lay["key_scale_off"])
    return out


def write_fields(kv_cache: torch.Tensor, blocks: torch.Tensor, pos: torch.Tensor, preset: str, d: int,
                 fields: dict) -> None:
    """Place token fields (as token_fields returns them) into the cache."""
    page = kv_cache.shape[1]
    lay = layout(preset, d, page)
    reg = regions(kv_cache)  # a view: writes land in kv_cache

    def put(off, data):  # data [L, Hk, width] uint8
        width = data.shape[-1]
        for i in range(data.shape[0]):
            b, p = int(blocks[i]), int(pos[i])
            reg[b, :, off + p * width: off + (p + 1) * width] = data[i]

    def put16(off, x):
        put(off, x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2))

    put(0, fields["key"])
    put(lay["val_off"], fields["value"])
    put16(lay["val_scale_off"], fields["val_scale"])
    put16(lay["val_zero_off"], fields["val_zero"])
    if "key_scale" in fields:
        put16(lay["key_scale_off"], fields["key_scale"])


def dequantize_tokens(kv_cache, block_table_row, seq_len, preset, Pi, side=None):
    """Keys and values [seq_len, Hk, D] (float64) of one request, anchors applied."""
    key_bits, val_bits, _ = PRESETS[preset]
    page = kv_cache.shape[1]
    D = Pi.shape[0]
    pos = torch.arange(seq_len, device=kv_cache.device)
    f = token_fields(kv_cache, block_table_row[pos // page], pos % page, preset, D)
    if key_bits == 8:
        k = f["key"].contiguous().view(torch.float8_e4m3fn).double()
    else:
        u = codebook(key_bits).to(kv_cache.device)[unpack_codes(f["key"], key_bits, D)]
        k = (u * f["key_scale"].double()[..., None]) @ Pi.double()
    vcodes = unpack_codes(f["value"], val_bits, D).double()
    v = vcodes * f["val_scale"].double()[..., None] + f["val_zero"].double()[..., None]
    if side is not None:
        anchors = side[block_table_row[0].long()].double()  # [Hk, 3, D]
        k = k + anchors[:, 2][None]
        k[0] = anchors[:, 0]
        v[0] = anchors[:, 1]
    return k, v


def fingerprint(fields: dict) -> torch.Tensor:
    """int32 fingerprint [L, Hk] of token records (see the module docstring)."""
    def bits(x):
        return x.contiguous().view(torch.int16).long() & 0xFFFF

    fp = bits(fields["val_scale"]) | (bits(fields["val_zero"]) << 16)
    if "key_scale" in fields:
        fp = fp ^ (bits(fields["key_scale"]) << 8)
    return ((fp + 2**31) % 2**32 - 2**31).to(torch.int32)  # two's complement, as the kernels' int32


def apply_recent_window(k, v, kv_cache, block_table_row, seq_len, preset, Pi, side, entries, tags, row,
                        ring_len=None):
    """Replace, in dequantized k/v [seq_len, Hk, D] (float64), the positions that a reader takes from
    the recent window: p in [max(seq_len - W, 1), seq_len) whose entry tags match. ring_len: the
    request length when the window was last written (its entries hold positions up to ring_len - 1).
    Returns (k, v, number of (position, head) pairs taken from the window)."""
    key_bits = PRESETS[preset][0]
    page, window, D = kv_cache.shape[1], entries.shape[1], Pi.shape[0]
    lo = max(seq_len - window, 1)
    if ring_len is not None:
        lo = max(lo, ring_len - window)
    if lo >= seq_len:
        return k, v, 0
    pos = torch.arange(lo, seq_len, device=kv_cache.device)
    blocks = block_table_row[pos // page].long()
    f = token_fields(kv_cache, blocks, pos % page, preset, D)
    ent = entries[row, pos % window].double()  # [L, Hk, 2, D]
    tag = tags[row, pos % window]  # [L, Hk, 2]
    hit = (tag[..., 0].long() == (blocks * page + pos % page)[:, None]) & (tag[..., 1] == fingerprint(f))
    frame = ent[:, :, 0]
    exact_k = frame if key_bits == 8 else frame @ Pi.double()
    if side is not None:
        exact_k = exact_k + side[block_table_row[0].long()].double()[:, 2][None]
    k, v = k.clone(), v.clone()
    k[lo:] = torch.where(hit[..., None], exact_k, k[lo:])
    v[lo:] = torch.where(hit[..., None], ent[:, :, 1], v[lo:])
    return k, v, int(hit.sum())


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
