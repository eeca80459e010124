"""tqstack TurboQuant kernels (patch 0012) on CPU.

The Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) from the patched tree's
own files and are compared with an independent fp64 reference that unpacks the cache bytes
with plain torch (tests/gpu/kernels/tq_reference.py). The same check runs on a GPU at full
sizes (tests/gpu/kernels/check_tq_kernels.py).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import REPO, run_in_vllm, vllm_python

CHECK = REPO / "tests/gpu/kernels/check_tq_kernels.py"


def _python() -> str:
    return str(vllm_python())


def test_interpreted_kernels_match_fp64_reference(patched_tree, tmp_path):
    out = tmp_path / "kernels.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1", "TQ_KERNEL_SOURCES": str(patched_tree)}
    env.pop("PYTHONPATH", None)  # the checker loads the kernel files without vLLM's package
    proc = subprocess.run([_python(), str(CHECK), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = [r for r in rows if r["kind"] == "correctness"]
    # every preset at head_dim 64 and 256 (GQA 2:1 and 2:1 with one KV head)
    assert {(r["preset"], r["head_dim"]) for r in checks} == {
        (p, d) for p in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
        for d in (64, 256)
    }
    # FP8 keys as an RTX 3090 (sm_86) stores them: Triton's e4b15 with tqstack's 2^-8 shift
    # (without it, keys beyond 1.75 come back as other numbers: NaN in this check)
    assert [r["head_dim"] for r in checks if r.get("fp8_e4b15") == 1] == [256]
    for r in checks:
        assert r["ok"], r
        assert r["sink_exact"] and r["all_written"], r
        assert r["decode_rel_err_max"] <= 1e-2 and r["dequant_rel_err_max"] <= 2e-3, r
    # Recent window (patch 0014): every preset at head_dim 64 (window 16), 4bit_nc and k8v4 at 256
    # with 32-token tiles and a window that is no multiple of the tile (48). Entries whose tags match
    # are read exactly (the decode matches the reference that takes them, and attention gets closer
    # to exact attention); another request's row and entries of a rewritten slot are not taken.
    windows = [r for r in rows if r["kind"] == "recent_window"]
    assert {(r["preset"], r["head_dim"]) for r in windows} == {
        (p, 64) for p in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
    } | {("turboquant_4bit_nc", 256), ("turboquant_k8v4", 256)}
    for r in windows:
        assert r["ok"], r
        assert r["entries_taken"] == r["entries_expected"] > 0, r
        # "nothing taken" equals the plain decode up to rounding, far below what the window changes
        assert max(r["other_row_rel_diff"], r["rewritten_slot_rel_diff"]) <= 0.1 * r["window_effect_rel"], r
        assert r["attention_rel_err_vs_exact_window"] < r["attention_rel_err_vs_exact_no_window"], r
    # Tensor parallelism: every rank's shard (its KV heads, their query heads, its own anchors and window)
    # decodes to exactly the unsharded result.
    splits = [r for r in rows if r["kind"] == "tp_split"]
    assert len(splits) == 2 and all(r["identical"] for r in splits), splits
    # Anchors (exact sink, centred keys) must cut the attention error on keys with a shared
    # offset and a dominant first token, for every preset, by at least half.
    gains = [r for r in rows if r["kind"] == "anchor_gain"]
    assert len(gains) == 4
    for r in gains:
        assert r["attention_rel_err_anchored"] < 0.5 * r["attention_rel_err_plain"], r


ROTATION = """
import json, torch
from vllm.v1.attention.ops.tqstack_turboquant import tq_rotation
out = {}
for d in (64, 256, 512):
    pi, pi_t = tq_rotation(d, "cpu")
    eye = torch.eye(d)
    again, _ = tq_rotation(d, "cpu")
    out[d] = {
        "orthogonal_err": float((pi @ pi_t - eye).abs().max()),
        "transpose_pair": bool(torch.equal(pi_t, pi.T)),
        "symmetric": bool(torch.equal(pi, pi.T)),
        "entries": sorted({round(abs(x) * d ** 0.5, 6) for x in pi.flatten().tolist()}),
        "deterministic": bool(torch.equal(pi, again)),
    }
try:
    tq_rotation(96, "cpu")
    out["non_power_of_two"] = "accepted"
except ValueError as e:
    out["non_power_of_two"] = str(e)
print(json.dumps(out))
"""


def test_rotation_is_signed_orthonormal_hadamard(patched_tree):
    res = run_in_vllm(patched_tree, ROTATION).json()
    for d in ("64", "256", "512"):
        r = res[d]
        assert r["orthogonal_err"] < 1e-6, r  # exact in fp32 up to rounding
        assert r["transpose_pair"] and r["deterministic"], r
        # Hadamard magnitudes, but not the symmetric unsigned Hadamard of 0.26.0
        assert r["entries"] == [1.0] and not r["symmetric"], r
    assert "power-of-two head size" in res["non_power_of_two"]


SOFTCAP = """
import json
from types import SimpleNamespace
import vllm.v1.attention.backends.turboquant_attn as tq_attn
# The constructor reads one engine setting; a CPU process has no engine config.
tq_attn.get_current_vllm_config = lambda: SimpleNamespace(
    attention_config=SimpleNamespace(tq_max_kv_splits_for_cuda_graph=32))
try:
    tq_attn.TurboQuantAttentionImpl(num_heads=8, head_size=256, scale=0.0625, num_kv_heads=1,
                                    kv_cache_dtype="turboquant_4bit_nc", logits_soft_cap=50.0)
    print(json.dumps({"error": None}))
except ValueError as e:
    print(json.dumps({"error": str(e)}))
"""


def test_softcap_refused_with_one_clear_error(patched_tree):
    err = run_in_vllm(patched_tree, SOFTCAP).json()["error"]
    assert err is not None
    assert "logits_soft_cap=50.0" in err and "turboquant_4bit_nc" in err
    assert "--kv-cache-dtype auto" in err


def test_pristine_ignores_softcap_silently(pristine_tree):
    # The bug the refusal removes: 0.26.0 accepts the soft cap and never applies it.
    assert run_in_vllm(pristine_tree, SOFTCAP).json()["error"] is None
