"""Gate 6 (patches 0005, 0013): TurboQuant prefill for head_dim 512 (Gemma 4 full-attention layers).

TurboQuant pins FlashAttention 2 (arg_utils) and TurboQuantAttentionImpl sent every first-chunk
prefill through `flash_attn_varlen_func` whenever flash_attn was present; FA2/FA3 serve
head_dim <= 256 only. The patched impl keeps flash_attn for head_dim <= 256, uses FA4 for 512 only
where its CuTe DSL really imports (Hopper), and otherwise the unified Triton attention kernel of the
unquantized layers (0013; 0005 had a per-request torch SDPA loop with K/V repeated per query head).

Path choice: the real TurboQuantAttentionImpl is constructed on vLLM's CudaPlatform with a given
capability (see test_gate2_backend_routing.CUDA_HOST_PREAMBLE; FA2/FA3 extensions count as
shipped, cute/interface.py exists, `cutlass` is not installed here, i.e. the "FA4 files present
but not importable" case of the GPU host). Numerics: the impl's real prefill (the unified Triton
kernel, run by Triton's interpreter on CPU tensors) is compared with a naive attention written here.
"""
from __future__ import annotations

import pytest

from conftest import run_in_vllm
from test_gate2_backend_routing import CUDA_HOST_PREAMBLE

PATH_CHOICE = CUDA_HOST_PREAMBLE + r'''
from vllm.config import AttentionConfig, DeviceConfig, VllmConfig, set_current_vllm_config
out = {}
for cap in ("8.6", "9.0", "12.0"):
    use_cuda_capability(*map(int, cap.split(".")))
    import vllm.v1.attention.backends.turboquant_attn as tq
    tq = importlib.reload(tq)  # _HAS_FLASH_ATTN is decided at import, per platform
    # TurboQuant's own override (arg_utils): flash_attn_version=2
    config = VllmConfig(device_config=DeviceConfig("cpu"),
                        attention_config=AttentionConfig(flash_attn_version=2))
    with set_current_vllm_config(config):
        for head_size in (256, 512):
            impl = tq.TurboQuantAttentionImpl(32, head_size, head_size ** -0.5, num_kv_heads=4,
                                              kv_cache_dtype="turboquant_4bit_nc")
            out[f"{cap}/{head_size}"] = {
                "has_flash_attn": tq._HAS_FLASH_ATTN,
                "prefill_with_flash_attn": getattr(impl, "prefill_with_flash_attn", None),
                "fa_version": impl.fa_version}
print(json.dumps(out))
'''

PREFILL_NUMERICS = r'''
import json, torch
import vllm.v1.attention.backends.turboquant_attn as tq
from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

torch.manual_seed(0)
HQ, HK, D = 8, 2, 512
scale = D ** -0.5


def reference(q, k, v):
    """Naive causal attention for one sequence whose queries are the last keys."""
    q_len, k_len = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HQ // HK, dim=1)  # query head h reads kv head h // (HQ // HK)
    v = v.repeat_interleave(HQ // HK, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    allowed = torch.arange(k_len)[None, :] <= (torch.arange(q_len)[:, None] + k_len - q_len)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


def max_error(out, q, k, v, cu_q, cu_k):
    errors = []
    for i in range(len(cu_q) - 1):
        ref = reference(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]])
        errors.append((out[cu_q[i]:cu_q[i + 1]] - ref).abs().max().item())
    return max(errors)


result = {}
def i32(values):
    return torch.tensor(values, dtype=torch.int32)


# 1. varlen first-chunk batch of 3 sequences, GQA 8:2, head 512
lens = [5, 11, 3]
cu = [0, 5, 16, 19]
q, k, v = (torch.randn(19, h, D) for h in (HQ, HK, HK))
out = tq.tq_contiguous_attention(q, k, v, i32(cu), i32(cu[:-1]), i32(lens), 11, 11, scale)
result["first_chunk_varlen"] = max_error(out, q, k, v, cu, cu)

# 2. continuation chunks: 3 new queries over 9 keys, 4 over 4 (bottom-right causal)
cu_q, cu_k = [0, 3, 7], [0, 9, 13]
q2 = torch.randn(7, HQ, D)
k2, v2 = torch.randn(13, HK, D), torch.randn(13, HK, D)
out2 = tq.tq_contiguous_attention(q2, k2, v2, i32(cu_q), i32(cu_k[:-1]), i32([9, 4]), 4, 9, scale)
result["continuation_varlen"] = max_error(out2, q2, k2, v2, cu_q, cu_k)

# 3. the impl's own prefill entry point on a first-chunk batch (no flash_attn on CPU -> Triton)
with set_current_vllm_config(VllmConfig(device_config=DeviceConfig("cpu"))):
    impl = tq.TurboQuantAttentionImpl(HQ, D, scale, num_kv_heads=HK,
                                      kv_cache_dtype="turboquant_4bit_nc")
seq_lens = torch.tensor(lens, dtype=torch.int32)
metadata = tq.TurboQuantMetadata(
    seq_lens=seq_lens, slot_mapping=torch.arange(19), block_table=torch.zeros(3, 1, dtype=torch.int32),
    query_start_loc=torch.tensor(cu, dtype=torch.int32), num_actual_tokens=19,
    max_query_len=max(lens), max_seq_len=max(lens), is_prefill=True,
    query_start_loc_cpu=torch.tensor(cu, dtype=torch.int32), seq_lens_cpu=seq_lens)
out3 = impl._prefill_attention(q, k, v, None, metadata, None, None)
result["impl_prefill_head512"] = max_error(out3, q, k, v, cu, cu)
result["impl_prefill_with_flash_attn"] = impl.prefill_with_flash_attn
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def patched_paths(patched_tree):
    run = run_in_vllm(patched_tree, PATH_CHOICE, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.json()


def test_patched_keeps_flash_attn_for_256_and_uses_triton_for_512(patched_paths):
    for cap in ("8.6", "9.0", "12.0"):
        assert patched_paths[f"{cap}/256"] == {
            "has_flash_attn": True, "prefill_with_flash_attn": True, "fa_version": 2}
        # sm_86 / sm_120 have no FA4; on Hopper the FA4 files exist but `cutlass` does not
        # import here, so FA4 must not be picked either.
        path_512 = patched_paths[f"{cap}/512"]
        assert path_512["has_flash_attn"] is True
        assert path_512["prefill_with_flash_attn"] is False


def test_pristine_sends_head512_to_fa2(pristine_tree):
    run = run_in_vllm(pristine_tree, PATH_CHOICE, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for cap in ("8.6", "9.0", "12.0"):
        # flash_attn present and FA version 2 at head_dim 512: the FA2 varlen kernel would run.
        assert run.json()[f"{cap}/512"] == {
            "has_flash_attn": True, "prefill_with_flash_attn": None, "fa_version": 2}


def test_head512_prefill_matches_reference(patched_tree):
    # Triton's interpreter runs the real kernels on CPU tensors; vLLM keeps Triton enabled with no
    # driver when CUDA_VISIBLE_DEVICES is empty (its distributed-start case).
    run = run_in_vllm(patched_tree, PREFILL_NUMERICS, timeout=600,
                      env={"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    result = run.json()
    assert result["impl_prefill_with_flash_attn"] is False
    for case in ("first_chunk_varlen", "continuation_varlen", "impl_prefill_head512"):
        assert result[case] < 1e-4, (case, result[case])
