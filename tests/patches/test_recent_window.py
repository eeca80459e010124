"""Patch 0014: TurboQuant's recent window, through the engine's own attention implementation on CPU.

The real TurboQuantAttentionImpl (patched tree) is built under a VllmConfig with max_num_seqs 4; its
do_kv_cache_update and forward run under a forward context as the model runner calls them, with the
Triton kernels in Triton's interpreter. Two steps of two requests: first chunks, then a mixed batch
(request A decodes in batch row 0 while request B's 3-token continuation chunk, batch row 1, runs
through the decode kernel). Every position of both requests lies inside the 128-token window, so
attention must equal exact attention over the original keys and values (fp64 reference, tolerance
1e-2 relative: fp16 window entries, fp16 tensor-core operands), while the same cache read without
the window is off by quantization (~0.16 here). The window must be allocated when the layer is
built (so vLLM's memory profile counts it), be absent from KV-sharing readers, and be logged; and
when the model runner swaps or condenses batch rows, each window row must follow its request.
"""
from __future__ import annotations

import pytest

from conftest import REPO, run_in_vllm

SCRIPT = r'''
import json, math, os, sys, torch
sys.path.insert(0, os.environ["TQ_REFERENCE_DIR"])
import tq_reference as ref
import vllm.v1.attention.backends.turboquant_attn as tq
from vllm.config import DeviceConfig, SchedulerConfig, VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context

torch.manual_seed(0)
HQ, HK, D, PAGE, PRESET = 4, 2, 64, 16, "turboquant_4bit_nc"
scale = D ** -0.5
config = VllmConfig(device_config=DeviceConfig("cpu"),
                    scheduler_config=SchedulerConfig(max_num_seqs=4, max_model_len=4096, is_encoder_decoder=False))
out = {}
with set_current_vllm_config(config):
    impl = tq.TurboQuantAttentionImpl(HQ, D, scale, num_kv_heads=HK, kv_cache_dtype=PRESET)
    reader = tq.TurboQuantAttentionImpl(HQ, D, scale, num_kv_heads=HK, kv_cache_dtype=PRESET,
                                        kv_sharing_target_layer_name="model.layers.0.self_attn.attn")
out["window_shape"] = list(impl._recent.entries.shape)
out["tags_shape"] = list(impl._recent.tags.shape)
out["tags_empty"] = bool((impl._recent.tags == -1).all())
out["reader_has_own_window"] = reader._recent is not None

layer = torch.nn.Module()
layer.layer_name = "model.layers.0.self_attn.attn"
cache = ref.empty_cache(12, PAGE, HK, PRESET, D, "cpu").transpose(1, 2)  # as vLLM allocates it
i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
bt = i32([[1, 2, 0], [5, 3, 7]])  # request A in batch row 0, B in row 1
keys = {r: torch.randn(n, HK, D) * 2 + torch.randn(HK, D) for r, n in (("A", 21), ("B", 43))}
vals = {r: torch.randn(n, HK, D) for r, n in (("A", 21), ("B", 43))}


def slots(row, positions):
    return torch.tensor([int(bt[row, p // PAGE]) * PAGE + p % PAGE for p in positions])


def step(parts, num_decodes):
    """parts: (request, row, first position, number of tokens, seq_len); runs the store and the forward."""
    qsl = [0]
    for _, _, _, n, _ in parts:
        qsl.append(qsl[-1] + n)
    k = torch.cat([keys[r][p:p + n] for r, _, p, n, _ in parts])
    v = torch.cat([vals[r][p:p + n] for r, _, p, n, _ in parts])
    q = torch.randn(k.shape[0], HQ, D)
    sm = torch.cat([slots(row, range(p, p + n)) for _, row, p, n, _ in parts])
    seq = i32([s for *_, s in parts])
    meta = tq.TurboQuantMetadata(
        seq_lens=seq, slot_mapping=sm, block_table=bt[[row for _, row, *_ in parts]],
        query_start_loc=i32(qsl), num_actual_tokens=k.shape[0], max_query_len=max(n for *_, n, _ in parts),
        max_seq_len=int(seq.max()), is_prefill=max(n for *_, n, _ in parts) > 1, num_decodes=num_decodes,
        num_decode_tokens=num_decodes, query_start_loc_cpu=i32(qsl), seq_lens_cpu=seq)
    with set_forward_context(meta, config):
        impl.do_kv_cache_update(layer, k.flatten(1), v.flatten(1), cache, sm)
        o = impl.forward(layer, q.flatten(1), k.flatten(1), v.flatten(1), cache, meta)
    return q, o.view(-1, HQ, D), qsl


def exact(q, r, length):
    return ref.attention(q, keys[r][:length].double(), vals[r][:length].double(), scale)


# step 1: first chunks (A 20 tokens in row 0, B 40 in row 1); step 2: A decodes position 20 while
# B's 3-token continuation chunk (positions 40..42) runs through the decode kernel
step([("A", 0, 0, 20, 20), ("B", 1, 0, 40, 40)], 0)
q, o, qsl = step([("A", 0, 20, 1, 21), ("B", 1, 40, 3, 43)], 1)
tags = impl._recent.tags
out["row0_slots_ok"] = bool(torch.equal(tags[0, :21, :, 0], slots(0, range(21))[:, None].int().expand(-1, HK)))
out["row1_slots_ok"] = bool(torch.equal(tags[1, :43, :, 0], slots(1, range(43))[:, None].int().expand(-1, HK)))
errs = {"A": ref.relative_error(o[0], exact(q[0], "A", 21))}
errs["B"] = max(ref.relative_error(o[1 + j], exact(q[1 + j], "B", 41 + j)) for j in range(3))
out["rel_err_vs_exact"] = errs
# the same cache read without the window: what quantization alone costs these queries
side = tq._ANCHOR_TABLES[cache.transpose(1, 2).data_ptr()]
plain = tq.tq_decode(q[:1], cache.transpose(1, 2), side, bt[:1], i32([21]), layer._tq_PiT, scale, 4, 4, 8)
out["rel_err_vs_exact_without_window"] = ref.relative_error(plain[0], exact(q[0], "A", 21))
print(json.dumps(out))
'''


ROWS_SCRIPT = r'''
import json, torch
import vllm.v1.attention.backends.turboquant_attn as tq
from vllm.config import DeviceConfig, SchedulerConfig, VllmConfig, set_current_vllm_config
from vllm.sampling_params import SamplingParams
import vllm.v1.worker.block_table as block_table_module
import vllm.v1.worker.gpu_input_batch as input_batch_module
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

# no pinned-memory allocator without an accelerator: the input batch's host buffers stay pageable here
for module in (block_table_module, input_batch_module):
    if hasattr(module, "PIN_MEMORY"):
        module.PIN_MEMORY = False

config = VllmConfig(device_config=DeviceConfig("cpu"),
                    scheduler_config=SchedulerConfig(max_num_seqs=4, max_model_len=4096, is_encoder_decoder=False))
with set_current_vllm_config(config):
    impl = tq.TurboQuantAttentionImpl(4, 64, 0.125, num_kv_heads=2, kv_cache_dtype="turboquant_4bit_nc")
window = impl._recent
for row in range(4):  # mark every row: entries and tags carry the row's number
    window.entries[row] = row
    window.tags[row] = 100 + row

batch = InputBatch(max_num_reqs=4, max_model_len=64, max_num_batched_tokens=64, device=torch.device("cpu"),
                   vocab_size=100, block_sizes=[16], kernel_block_sizes=[16], max_num_blocks_per_req=[4])
for i, name in enumerate("abc"):
    batch.add_request(CachedRequestState(
        req_id=name, prompt_token_ids=[1, 2, 3], mm_features=[], sampling_params=SamplingParams(),
        generator=None, block_ids=([i + 1],), num_computed_tokens=0, output_token_ids=[]))


def marks():
    return {name: int(window.entries[batch.req_id_to_index[name]].float().mean()) for name in batch.req_ids}


out = {"before": marks()}
batch.swap_states(0, 2)  # as the decode-first reorder does
out["after_swap"] = marks()
batch.remove_request("b")  # a finished request leaves a hole (row 1) that condense fills from the end
batch.condense()
out["after_condense"] = marks()
out["rows_after_condense"] = dict(batch.req_id_to_index)
out["freed_row_tags"] = int(window.tags[2].max())
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def window_run(patched_tree):
    run = run_in_vllm(patched_tree, SCRIPT, timeout=900,
                      env={"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "VLLM_LOGGING_LEVEL": "INFO",
                           "TQ_REFERENCE_DIR": str(REPO / "tests/gpu/kernels")})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_window_allocated_with_the_layer_and_logged(window_run):
    result = window_run.json()
    assert result["window_shape"] == [4, 128, 2, 2, 64]  # max_num_seqs x 128 x KV heads x (key, value) x D
    assert result["tags_shape"] == [4, 128, 2, 2] and result["tags_empty"]
    assert result["reader_has_own_window"] is False  # YOCO readers use their source layer's window
    assert ("TurboQuant recent window: the newest 128 tokens of each of 4 requests (max_num_seqs) kept exact"
            in window_run.stdout + window_run.stderr)


def test_rows_of_a_mixed_batch_are_written_and_read(window_run):
    result = window_run.json()
    # every position of A (row 0) and B (row 1) is tagged with its own cache slot
    assert result["row0_slots_ok"] and result["row1_slots_ok"]
    # A's decode and B's continuation chunk read their own rows: exact attention
    assert result["rel_err_vs_exact"]["A"] <= 1e-2
    assert result["rel_err_vs_exact"]["B"] <= 1e-2
    # without the window the same queries see the quantization error: the check can fail
    assert result["rel_err_vs_exact_without_window"] > 10 * max(result["rel_err_vs_exact"].values())


def test_window_rows_follow_their_requests(patched_tree):
    """The model runner reorders rows (decodes first) and fills holes left by finished requests; a real
    InputBatch's swap_states and condense must move each request's window row with it (rows marked with
    their number), and the row a request left must hold no entries."""
    run = run_in_vllm(patched_tree, ROWS_SCRIPT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = run.json()
    assert result["before"] == {"a": 0, "b": 1, "c": 2}
    assert result["after_swap"] == {"a": 0, "b": 1, "c": 2}  # c now in row 0, a in row 2: marks went along
    assert result["rows_after_condense"] == {"c": 0, "a": 1}  # b finished, a moved from row 2 into its row
    assert result["after_condense"] == {"c": 2, "a": 0}
    assert result["freed_row_tags"] == -1
