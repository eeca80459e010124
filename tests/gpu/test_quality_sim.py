"""CPU tests of tests/gpu/kernels/quality_sim.py's pure parts (no Triton, no model)."""
import math
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
    with pytest.raises(ValueError):
        qs.cached_prefix(10, 4, "both")


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_codes_matches_reference_unpacking(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), generator=torch.Generator().manual_seed(bits))
    packed = qs.pack_codes(codes, bits)
    assert packed.shape == (5, math.ceil(64 * bits / 8))
    assert torch.equal(ref.unpack_codes(packed, bits, 64), codes)


@pytest.mark.parametrize("preset", list(ref.PRESETS))
def test_store_slots_round_trip_with_anchors(preset):
    gen = torch.Generator().manual_seed(0)
    n, hk, d = 40, 2, 64
    key = (torch.randn(n, hk, d, generator=gen) + 3 * torch.randn(hk, d, generator=gen)).bfloat16()
    value = torch.randn(n, hk, d, generator=gen).bfloat16()
    key_bits, val_bits, _ = ref.PRESETS[preset]
    bits = val_bits if key_bits == 8 else key_bits
    # a Lloyd-Max-like codebook for unit vectors in d dimensions, identity rotation
    centroids = torch.linspace(-2.0, 2.0, 1 << bits) / math.sqrt(d)
    eye = torch.eye(d)
    side = torch.zeros(1, hk, 3, d, dtype=torch.bfloat16)
    side[0, :, 0], side[0, :, 1] = key[0], value[0]
    side[0, :, 2] = key[1:].float().mean(0).bfloat16()
    slots = qs.store_slots(key, value, side[0, :, 2][None].expand(n, hk, d), preset, eye, centroids)
    assert slots.shape == (n, hk, qs.slot_layout(preset, d)["slot"])
    cache = torch.zeros(3, qs.PAGE, hk, slots.shape[-1], dtype=torch.uint8)
    cache.view(-1, hk, slots.shape[-1])[:n] = slots
    k, v = ref.dequantize_tokens(cache, torch.arange(3), n, preset, centroids, eye, side)
    assert torch.equal(k[0].bfloat16(), key[0]) and torch.equal(v[0].bfloat16(), value[0])  # exact sink
    # values: uniform quantization error at most half a step (+ fp16 rounding of scale/zero)
    step = (value.float().amax(-1) - value.float().amin(-1)) / ((1 << val_bits) - 1)
    assert ((v[1:] - value[1:].double()).abs().amax(-1) <= step[1:] * 0.55 + 1e-2).all()
    # keys: the centre is restored, the error is a fraction of the centred key
    err = (k[1:] - key[1:].double()).norm(dim=-1) / (key[1:].double() - side[0, :, 2].double()).norm(dim=-1)
    assert float(err.mean()) < (0.1 if key_bits == 8 else 0.8)
