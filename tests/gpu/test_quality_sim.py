"""CPU tests of tests/gpu/kernels/quality_sim.py's pure parts (no Triton, no model)."""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))
import quality_sim as qs  # noqa: E402
import tq_reference as ref  # noqa: E402


def test_cached_prefix_paths():
    # prefill: a chunk reads earlier chunks from the cache, itself raw; the first chunk is all raw
    assert qs.cached_prefix(10, 4, "prefill").tolist() == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    # decode: after the first chunk, every key up to the query itself comes from the cache
    assert qs.cached_prefix(10, 4, "decode").tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 9, 10]
    # what-if paths: the own token exact; the 16 most recent tokens exact
    assert qs.cached_prefix(10, 4, "decode_self").tolist() == [0, 0, 0, 0, 4, 5, 6, 7, 8, 9]
    window = qs.cached_prefix(40, 4, "decode_w16").tolist()
    assert window[:4] == [0, 0, 0, 0] and window[4:16] == [0] * 12 and window[16:19] == [1, 2, 3]
    with pytest.raises(ValueError):
        qs.cached_prefix(10, 4, "both")


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_codes_matches_reference_unpacking(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), generator=torch.Generator().manual_seed(bits))
    packed = ref.pack_codes(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(ref.unpack_codes(packed, bits, 64), codes)
    if bits == 4:  # byte j holds element j (low nibble) and element j + D/2 (high nibble)
        assert int(packed[0, 3]) == int(codes[0, 3]) | int(codes[0, 35]) << 4


def test_fields_land_in_their_block_region():
    """A token's fields go to its (block, KV head) region and come back unchanged; other
    regions stay untouched."""
    preset, d, page, hk = "turboquant_4bit_nc", 64, 16, 2
    cache = ref.empty_cache(3, page, hk, preset, d, "cpu")
    gen = torch.Generator().manual_seed(1)
    fields = {"key": torch.randint(0, 256, (2, hk, 32), generator=gen, dtype=torch.uint8),
              "value": torch.randint(0, 256, (2, hk, 32), generator=gen, dtype=torch.uint8),
              "val_scale": torch.rand(2, hk, generator=gen).half(), "val_zero": torch.rand(2, hk, generator=gen).half(),
              "key_scale": torch.rand(2, hk, generator=gen).half()}
    blocks, pos = torch.tensor([2, 0]), torch.tensor([5, 15])
    ref.write_fields(cache, blocks, pos, preset, d, fields)
    back = ref.token_fields(cache, blocks, pos, preset, d)
    for name, x in fields.items():
        assert torch.equal(back[name], x), name
    assert int(ref.regions(cache)[1].count_nonzero()) == 0
    lay = ref.layout(preset, d, page)
    assert int(ref.regions(cache)[2, 1, 5 * 32]) == int(fields["key"][0, 1, 0])  # key row 5 of head 1
    assert lay["key_scale_off"] + 2 * page <= page * cache.shape[-1]  # fits the block's bytes


@pytest.mark.parametrize("preset", list(ref.PRESETS))
def test_store_fields_round_trip_with_anchors(preset):
    gen = torch.Generator().manual_seed(0)
    n, hk, d = 40, 2, 64
    key = (torch.randn(n, hk, d, generator=gen) + 3 * torch.randn(hk, d, generator=gen)).bfloat16()
    value = torch.randn(n, hk, d, generator=gen).bfloat16()
    key_bits, val_bits, _ = ref.PRESETS[preset]
    eye = torch.eye(d)  # identity rotation
    side = torch.zeros(1, hk, 3, d, dtype=torch.bfloat16)
    side[0, :, 0], side[0, :, 1] = key[0], value[0]
    side[0, :, 2] = key[1:].float().mean(0).bfloat16()
    fields = qs.store_fields(key, value, side[0, :, 2][None].expand(n, hk, d), preset, eye)
    cache = ref.empty_cache(3, qs.PAGE, hk, preset, d, "cpu")
    pos = torch.arange(n)
    ref.write_fields(cache, pos // qs.PAGE, pos % qs.PAGE, preset, d, fields)
    k, v = ref.dequantize_tokens(cache, torch.arange(3), n, preset, eye, side)
    assert torch.equal(k[0].bfloat16(), key[0]) and torch.equal(v[0].bfloat16(), value[0])  # exact sink
    # values: uniform quantization error at most half a step (+ fp16 rounding of scale/zero)
    step = (value.float().amax(-1) - value.float().amin(-1)) / ((1 << val_bits) - 1)
    assert ((v[1:] - value[1:].double()).abs().amax(-1) <= step[1:] * 0.55 + 1e-2).all()
    # keys: the centre is restored; the error is what the codebook allows for a centred key
    err = (k[1:] - key[1:].double()).norm(dim=-1) / (key[1:].double() - side[0, :, 2].double()).norm(dim=-1)
    assert float(err.mean()) < {8: 0.05, 4: 0.15, 3: 0.25}[key_bits]


@pytest.mark.parametrize("bits", [3, 4])
def test_codebook_polynomial_is_close_to_lloyd_max(bits):
    """The fitted codebook's mean squared error on a Gaussian is within 1 % of Lloyd-Max's
    (Monte Carlo, 2^20 samples)."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = ref.codebook(bits) * qs.CODEBOOK_GAMMA[bits]
    mid = (u[:-1] + u[1:]) / 2
    mse_poly = float(((u[torch.searchsorted(mid, x)] - x) ** 2).mean())
    lloyd = {3: 0.03454776, 4: 0.00950101}[bits]  # Lloyd-Max MSE for N(0, 1)
    assert mse_poly < lloyd * 1.01 + 3e-4, mse_poly
