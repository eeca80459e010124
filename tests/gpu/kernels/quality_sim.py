"""CPU quality simulation of tqstack's TurboQuant KV cache on real weights (no GPU, no vLLM engine).

Perplexity of the committed fixed text (tests/gpu/real_weights/token_ids.json, models.<name>.ppl_ids,
3072 tokens, the text the GPU lane scores) with bf16 K/V against the TurboQuant presets, with the
attention of the compressed layers replaced inside a transformers forward by a simulation of the
engine's two paths:

  prefill  chunks of 256 tokens: a chunk attends to its own raw K/V plus every earlier token read
           back from the TurboQuant cache (the backend's continuation prefill);
  decode   chunks of 64 tokens: every key/value, the chunk's own included, is stored first and read
           back from the cache (the backend runs its decode kernel for chunks <= 128 tokens).
  In both paths the first chunk attends to its own raw K/V (a first-chunk prefill).

Per compressed layer and run, the cache is built as the engine builds it:
  * anchors (exact sink = key/value of position 0, centre mu = mean key of positions 1..256 of the
    first chunk) by the real tqstack kernel `tq_write_anchors`, run in Triton's interpreter;
  * cache bytes by `store_fields`, a torch transcription of tqstack's `tq_store` (3/4-bit keys of
    R(k - mu) in tqstack's polynomial codebook with the folded norm scale, or FP8 k - mu; uniform 3/4-bit values). The real
    store kernel costs ~0.1 s per (token, KV head) program in the interpreter (SmolLM2 alone would
    take hours per run), so every run also stores a sample of its real keys/values (16 tokens of its
    first compressed layer, every KV head) with the real kernel and records the differing bytes
    (`kernel_check` in the results). For FP8 keys (k8v4) the interpreter's own fp32->fp8 cast
    rounds some values differently from round-to-nearest-even (the GPU's cvt.rn and torch's cast,
    which the transcription uses), so only k8v4's key bytes may differ there;
  * read back with the independent fp64 decoder tests/gpu/kernels/tq_reference.py
    (`dequantize_tokens`: mu + dequant, exact sink); the kernel's own `tq_dequant_request` is
    compared with it on the sample (also in `kernel_check`).
Not exercised: the decode kernel's fp16 tensor-core dot products and split-KV reduction (the decode
path computes exact fp32 attention over the read-back K/V, which the decode kernel matches to ~1e-3,
tests/gpu/kernels/check_tq_kernels.py), the paged block allocation, CUDA graphs, the vLLM model
code. The model runs in float32; keys/values entering the compressed layers are rounded to bf16 (the
engine's cache input) in every variant, the bf16 baseline included.

    TQ_KERNEL_SOURCES=<patched vLLM tree> TRITON_INTERPRET=1 python3 tests/gpu/kernels/quality_sim.py \
        --models-dir DIR --out results.json [--models ...] [--presets ...] [--paths ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
import tq_reference as ref  # noqa: E402

TOKEN_IDS = REPO / "tests" / "gpu" / "real_weights" / "token_ids.json"
# the GPU lane's --chunk-tokens / --decode-chunk-tokens. What-if decode paths (not what the kernels do):
# decode_self takes each query's own key and value exact (the step's K/V); decode_wN keeps the N most
# recent tokens (the query's own included) exact, as a full-precision recent window would.
PATH_CHUNKS = {"prefill": 256, "decode": 64, "decode_self": 64, "decode_w16": 64, "decode_w64": 64, "decode_w128": 64}
PRESET_ORDER = ["turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4", "turboquant_3bit_nc"]
# anchors_vrot*: what-if value quantizers, simulated in torch only (not the format the kernels
# implement): values rotated like keys and coded with the key codebook and a norm-corrected scale,
# optionally after subtracting a per-request value centre (mean value of positions 1..255).
VARIANTS = ["anchors", "no_anchors", "anchors_vrot", "anchors_vrot_centre"]
MODELS = {
    # name: {label: compressed layers}; the GPU run protected boundary layers 0, 1, L-2, L-1
    # (with --turboquant-boundary-layers N, N = 0 / 1 / 2: Gemma 3 270M compresses full layers
    # 5,11,17 / 11 / none; SmolLM2-135M, all layers full attention, 0-29 / 1-28 / 2-27)
    "gemma3-270m": {"head_dim": 256, "layer_sets": {"5,11": [5, 11], "5,11,17": [5, 11, 17], "11": [11]}},
    "smollm2-135m": {"head_dim": 64, "layer_sets": {"2-27": list(range(2, 28)), "1-28": list(range(1, 29)),
                                                    "0-29": list(range(0, 30))}},
}
CODEBOOK_GAMMA = {4: 0.262655004, 3: 0.49066127}  # tqstack's CODEBOOK_POLY scale (store side)
PAGE = 16  # tokens per cache block of the simulated cache (the layout does not change the bytes)
SAMPLE_TOKENS = 8  # tokens per sampled chunk stored by the real kernel for the byte check


# ----------------------------------------------------------------------------- pure helpers

def cached_prefix(num_tokens: int, chunk: int, path: str) -> torch.Tensor:
    """For every query position i, how many leading keys it reads from the TurboQuant cache:
    keys j < result[i] come from the cache, keys result[i] <= j <= i are the raw K/V of its chunk.
    The first chunk is a plain prefill (nothing cached); later chunks read the earlier chunks from
    the cache (prefill path) or everything up to and including themselves (decode path: the
    chunk is stored before the decode kernel reads it)."""
    if path not in PATH_CHUNKS:
        raise ValueError(f"unknown path {path!r}")
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    pos = torch.arange(num_tokens)
    start = (pos // chunk) * chunk
    if path == "prefill":
        return start
    if path.startswith("decode_w"):
        window = int(path.removeprefix("decode_w"))
        return torch.where(start == 0, torch.zeros_like(pos), (pos + 1 - window).clamp(min=0))
    own = 0 if path == "decode_self" else 1
    return torch.where(start == 0, torch.zeros_like(pos), pos + own)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def ppl_delta_pct(ppl: float, ppl_ref: float) -> float:
    return (ppl / ppl_ref - 1.0) * 100.0


def store_fields(key, value, centre, preset, PiT) -> dict:
    """Transcription of tqstack's tq_store (_tq_store): key/value [N, Hk, D] model dtype, centre
    [N, Hk, D] or None -> the stored fields of every token (tq_reference.token_fields's form)."""
    n, hk, d = key.shape
    key_bits, val_bits, norm_correction = ref.PRESETS[preset]
    k = key.float()
    if centre is not None:
        k = k - centre.float()
    k = k.reshape(n * hk, d)
    out = {}
    if key_bits == 8:
        out["key"] = k.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        norms = k.norm(dim=1)
        y = (k / (norms[:, None] + 1e-8)) @ PiT
        gamma = CODEBOOK_GAMMA[key_bits]
        u = ref.codebook(key_bits).float()
        centroids = gamma * u / math.sqrt(d)
        midpoints = (centroids[:-1] + centroids[1:]) / 2
        idx = torch.searchsorted(midpoints.contiguous(), y.contiguous(), right=True)  # = the binary search
        out["key"] = ref.pack_codes(idx, key_bits)
        if norm_correction:
            c = u[idx]
            scale = norms / torch.sqrt((c * c).sum(dim=1)).clamp_min(1e-12)
        else:
            scale = norms * (gamma / math.sqrt(d))
        out["key_scale"] = scale.to(torch.float16)
    v = value.reshape(n * hk, d).float()
    levels = (1 << val_bits) - 1
    vmin, vmax = v.min(dim=1).values, v.max(dim=1).values
    vscale = ((vmax - vmin) / float(levels)).clamp_min(1e-8)
    q = ((v - vmin[:, None]) / vscale[:, None] + 0.5).to(torch.int32).clamp(0, levels)
    out["value"] = ref.pack_codes(q, val_bits)
    out["val_scale"] = vscale.to(torch.float16)
    out["val_zero"] = vmin.to(torch.float16)
    return {name: x.reshape(n, hk, *x.shape[1:]) for name, x in out.items()}


# ----------------------------------------------------------------------------- kernels

def import_kernels():
    try:
        import vllm  # noqa: F401
    except ImportError:
        import stub_vllm

        sources = os.environ.get("TQ_KERNEL_SOURCES")
        if not sources:
            raise SystemExit("set TQ_KERNEL_SOURCES to a patched vLLM tree (or staged kernel sources)")
        stub_vllm.install(Path(sources))
    from vllm.v1.attention.ops import tqstack_turboquant as tq

    return tq


class Quantizer:
    """One preset at one head size: rotation, codebook, and the cache of one layer."""

    def __init__(self, tq, preset: str, head_dim: int):
        self.tq, self.preset, self.d = tq, preset, head_dim
        self.key_bits, self.val_bits, self.norm_correction = ref.PRESETS[preset]
        self.Pi, self.PiT = tq.tq_rotation(head_dim, "cpu")
        c = tq.tq_codebook(head_dim, 4 if self.key_bits == 8 else self.key_bits)
        self.midpoints = (c[:-1] + c[1:]) / 2

    def anchors(self, key, value, first_chunk: int) -> torch.Tensor:
        """Side table [1, Hk, 3, D] written by the real anchor kernel for the first chunk."""
        n, hk, d = key.shape
        side = torch.zeros(1, hk, self.tq.NUM_ANCHOR_ROWS, d, dtype=key.dtype)
        q_len = min(first_chunk, n)
        qsl = torch.tensor([0, q_len], dtype=torch.int32)
        seq = torch.tensor([q_len], dtype=torch.int32)
        bt = torch.zeros(1, 1, dtype=torch.int32)
        self.tq.tq_write_anchors(key[:q_len].contiguous(), value[:q_len].contiguous(), side, qsl, seq, bt)
        return side

    def roundtrip(self, key, value, side):
        """Store every token, read every token back (fp64 reference decoder): K, V [N, Hk, D]."""
        n, hk, d = key.shape
        centre = None if side is None else side[0, :, self.tq.ANCHOR_MU][None].expand(n, hk, d)
        fields = store_fields(key, value, centre, self.preset, self.PiT)
        cache = self._paged(fields, n, hk)
        row = torch.arange(cache.shape[0], dtype=torch.int32)
        k, v = ref.dequantize_tokens(cache, row, n, self.preset, self.Pi, side)
        return k, v, fields

    def rotated_values(self, value, centre: bool) -> torch.Tensor:
        """What-if value quantizer (fp64 read-back): R(v - c)/|v - c| coded like keys, exact sink."""
        n, hk, d = value.shape
        v = value.double()
        c = v[1:256].mean(0, keepdim=True) if centre else torch.zeros(1, hk, d, dtype=torch.float64)
        x = (v - c).reshape(n * hk, d)
        norms = x.norm(dim=1)
        y = (x / (norms[:, None] + 1e-8)) @ self.PiT.double()
        u = ref.codebook(self.val_bits)
        cent = CODEBOOK_GAMMA[self.val_bits] * u / math.sqrt(d)
        idx = torch.searchsorted(((cent[:-1] + cent[1:]) / 2).contiguous(), y.contiguous(), right=True)
        scale = (norms / u[idx].norm(dim=1).clamp_min(1e-12)).to(torch.float16).double()
        out = ((u[idx] * scale[:, None]) @ self.Pi.double()).reshape(n, hk, d) + c
        out[0] = v[0]
        return out

    def _paged(self, fields, n, hk):
        cache = ref.empty_cache(math.ceil(n / PAGE), PAGE, hk, self.preset, self.d, "cpu")
        pos = torch.arange(n)
        ref.write_fields(cache, pos // PAGE, pos % PAGE, self.preset, self.d,
                         {name: x[:n] for name, x in fields.items()})
        return cache

    def kernel_check(self, key, value, side, fields, positions: list[int]) -> dict:
        """Real tq_store on sampled tokens must give the transcription's bytes; the real
        tq_dequant_request must agree with the fp64 decoder on a prefix."""
        tq = self.tq
        n, hk, d = key.shape
        pos = torch.tensor(positions)
        m = len(positions)
        cache = ref.empty_cache(math.ceil(m / PAGE), PAGE, hk, self.preset, d, "cpu")
        centre = None if side is None else side[0, :, tq.ANCHOR_MU][None].expand(m, hk, d).contiguous()
        tq.tq_store(key[pos].contiguous(), value[pos].contiguous(), cache, torch.arange(m), centre,
                    self.PiT, self.midpoints, key_bits=self.key_bits, value_quant_bits=self.val_bits,
                    norm_correction=self.norm_correction)
        slots = torch.arange(m)
        kernel = ref.token_fields(cache, slots // PAGE, slots % PAGE, self.preset, d)
        ours = {name: x[pos] for name, x in fields.items()}

        def differing(names):
            return int(sum((kernel[nm].contiguous().view(torch.uint8) != ours[nm].contiguous().view(torch.uint8)).sum()
                           for nm in names if nm in ours))

        # kernel dequantization of a 32-token prefix against the fp64 decoder
        L = min(32, n)
        full = self._paged(fields, L, hk)
        row = torch.arange(full.shape[0], dtype=torch.int32)
        kb = torch.empty(hk, L, d, dtype=torch.float16)
        vb = torch.empty_like(kb)
        kd = torch.empty(L, hk, d, dtype=key.dtype)
        vd = torch.empty_like(kd)
        tq.tq_dequant_request(full, row, side, L, self.Pi, self.key_bits, self.val_bits, kb, vb, kd, vd)
        k64, v64 = ref.dequantize_tokens(full, row, L, self.preset, self.Pi, side)
        key_diff = differing(["key", "key_scale"])
        value_diff = differing(["value", "val_scale", "val_zero"])
        return {
            "store_slots": m * hk,
            "store_fields_identical": key_diff == 0 and value_diff == 0,
            "store_key_bytes_differing": key_diff,
            "store_value_bytes_differing": value_diff,
            "dequant_rel_err_k": ref.relative_error(kd, k64),
            "dequant_rel_err_v": ref.relative_error(vd, v64),
        }


# ----------------------------------------------------------------------------- attention

def mixed_attention(q, k_raw, v_raw, k_cache, v_cache, prefix, scaling, row_block=256):
    """Causal attention where query i reads keys j < prefix[i] from the cache and the rest raw.
    q [Hq, N, D] fp32, k/v [N, Hk, D] -> [N, Hq, D] fp32. Per row block only the causal columns
    are computed, and only the part (cache or raw) some row of the block reads."""
    hq, n, d = q.shape
    hk = k_raw.shape[1]

    def heads(x):
        return x.float().permute(1, 0, 2)[:, None]  # [Hk, 1, N, D]: GQA by broadcasting

    kr, vr, kc, vc = heads(k_raw), heads(v_raw), heads(k_cache), heads(v_cache)
    qg = q.reshape(hk, hq // hk, n, d)
    out = torch.empty(n, hq, d)
    for r0 in range(0, n, row_block):
        r1 = min(n, r0 + row_block)
        rows = torch.arange(r0, r1)
        cols = torch.arange(r1)  # causal: no row of the block reads a key past r1 - 1
        qb = qg[:, :, r0:r1]
        pre = prefix[r0:r1]
        from_cache = cols[None, :] < pre[:, None]  # [R, r1]
        causal = cols[None, :] <= rows[:, None]
        c_hi = int(pre.max())  # cache columns [0, c_hi), raw columns [r_lo, r1)
        r_lo = min(int(pre.min()), r1)
        s = torch.full((hk, hq // hk, r1 - r0, r1), float("-inf"))
        if c_hi > 0:
            s[..., :c_hi] = qb @ kc[:, :, :c_hi].transpose(-1, -2)
        if r_lo < r1:
            raw = qb @ kr[:, :, r_lo:r1].transpose(-1, -2)
            s[..., r_lo:] = torch.where(from_cache[:, r_lo:], s[..., r_lo:], raw)
        s = (s * scaling).masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        pc = p * from_cache
        o = torch.zeros(hk, hq // hk, r1 - r0, d)
        if c_hi > 0:
            o += pc[..., :c_hi] @ vc[:, :, :c_hi]
        if r_lo < r1:
            o += (p - pc)[..., r_lo:] @ vr[:, :, r_lo:r1]
        out[r0:r1] = o.reshape(hq, r1 - r0, d).permute(1, 0, 2)
    return out


class Simulation:
    """State of one run: which layers are compressed, how, and along which path."""

    def __init__(self):
        self.layers: set[int] = set()
        self.quantizer: Quantizer | None = None
        self.anchors = True
        self.value_mode = ""
        self.path = "prefill"
        self.check_layer: int | None = None
        self.checks: list[dict] = []


SIM = Simulation()


def install_attention():
    """Wrap transformers' sdpa attention: compressed layers go through the simulation."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def qsim_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer not in SIM.layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        if query.shape[0] != 1:
            raise ValueError("the simulation runs one sequence")
        q = query[0].float()  # [Hq, N, D]
        # the engine's cache input is the model dtype: bf16 in every variant, the baseline included
        k = key[0].transpose(0, 1).to(torch.bfloat16)  # [N, Hk, D]
        v = value[0].transpose(0, 1).to(torch.bfloat16)
        n = k.shape[0]
        chunk = PATH_CHUNKS[SIM.path]
        if SIM.quantizer is None:
            kc, vc = k, v
        else:
            side = SIM.quantizer.anchors(k, v, chunk) if SIM.anchors else None
            kc, vc, slots = SIM.quantizer.roundtrip(k, v, side)
            if SIM.value_mode:
                vc = SIM.quantizer.rotated_values(v, centre=SIM.value_mode == "anchors_vrot_centre")
            if SIM.path == "prefill":
                # the continuation prefill dequantizes into the model dtype
                kc, vc = kc.to(k.dtype), vc.to(v.dtype)
            if layer == SIM.check_layer:
                last = (n // chunk - 1) * chunk
                sample = list(range(SAMPLE_TOKENS)) + list(range(last, last + SAMPLE_TOKENS))
                sample = [p for p in sample if p < n]
                SIM.checks.append({"layer": layer, **SIM.quantizer.kernel_check(k, v, side, slots, sample)})
        prefix = cached_prefix(n, chunk, SIM.path)
        out = mixed_attention(q, k, v, kc, vc, prefix, scaling)
        return out[None].to(query.dtype), None

    AttentionInterface.register("sdpa", qsim_attention)


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL over ids[1:] (what prompt_logprobs scores) and its count."""
    hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    nll, count = 0.0, 0
    for r0 in range(0, ids.shape[0] - 1, 512):
        r1 = min(ids.shape[0] - 1, r0 + 512)
        logits = model.lm_head(hidden[r0:r1]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lp = torch.log_softmax(logits, dim=-1)
        nll -= float(lp.gather(1, ids[r0 + 1 : r1 + 1, None]).sum())
        count += r1 - r0
    return nll, count


def run(args) -> dict:
    from transformers import AutoModelForCausalLM

    tq = import_kernels()
    install_attention()
    torch.set_num_threads(args.threads)
    token_ids = json.loads(TOKEN_IDS.read_text())
    t_start = time.time()
    result = {
        "kind": "cpu-simulation (Triton interpreter for anchors and kernel checks; torch transcription of "
                "tq_store checked byte-for-byte; fp64 reference read-back); not the GPU engine",
        "token_ids": str(TOKEN_IDS.relative_to(REPO)),
        "path_chunks": PATH_CHUNKS,
        "kernel_sources": os.environ.get("TQ_KERNEL_SOURCES", "vllm"),
        "torch": torch.__version__,
        "host": {"cpus": os.cpu_count(), "threads": args.threads, "machine": platform.machine()},
        "models": {},
    }

    def flush():
        result["runtime_s"] = round(time.time() - t_start, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    for name in args.models:
        spec = MODELS[name]
        folder = Path(args.models_dir) / name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        ids = torch.tensor(token_ids["models"][name]["ppl_ids"][: args.tokens])
        entry = result["models"].setdefault(name, {"tokens_scored": ids.shape[0] - 1, "runs": []})
        quantizers = {p: Quantizer(tq, p, spec["head_dim"]) for p in args.presets}
        layer_sets = {k: v for k, v in spec["layer_sets"].items() if not args.layer_sets or k in args.layer_sets}

        def one(label, layers, preset, variant, path):
            SIM.layers = set(layers)
            SIM.quantizer = quantizers[preset] if preset else None
            SIM.anchors = variant.startswith("anchors")
            SIM.value_mode = variant if variant.startswith("anchors_vrot") else ""
            SIM.path = path if path in PATH_CHUNKS else "prefill"  # bf16: the path changes nothing
            SIM.check_layer = min(layers) if preset else None
            SIM.checks = []
            t0 = time.time()
            nll, count = score(model, ids)
            ppl = perplexity(nll, count)
            rec = {"layers": label, "preset": preset or "bf16", "variant": variant, "path": path,
                   "ppl": round(ppl, 4), "seconds": round(time.time() - t0, 1)}
            if SIM.checks:
                rec["kernel_check"] = SIM.checks[0]
            return rec

        # bf16 K/V: attention is exact in both paths, so one baseline per layer set serves both
        # (the set matters a little: its layers' keys/values are rounded to bf16)
        entry.setdefault("bf16", {})
        for label, layers in layer_sets.items():
            if args.skip_baseline:
                break  # a shard beside one that scores it: --merge computes the deltas
            base = one(label, layers, None, "-", "both")
            entry["bf16"][label] = {"ppl": base["ppl"], "seconds": base["seconds"]}
            print(f"{name} [{label}] bf16 ppl {base['ppl']:.4f} ({base['seconds']} s)", flush=True)
            flush()
        for preset in args.presets:
            for label, layers in layer_sets.items():
                for variant in args.variants:
                    for path in args.paths:
                        rec = one(label, layers, preset, variant, path)
                        if label in entry["bf16"]:
                            rec["ppl_delta_pct"] = round(ppl_delta_pct(rec["ppl"], entry["bf16"][label]["ppl"]), 3)
                        entry["runs"].append(rec)
                        kc = rec.get("kernel_check", {})
                        print(f"{name} [{label}] {preset} {variant} {path}: ppl {rec['ppl']:.4f} "
                              f"({rec.get('ppl_delta_pct', float('nan')):+.2f} %), {rec['seconds']} s, store bytes differing k/v "
                              f"{kc.get('store_key_bytes_differing')}/{kc.get('store_value_bytes_differing')}", flush=True)
                        flush()
        del model
    flush()
    return result


def merge(paths: list[str]) -> dict:
    """Results of runs sharded by model / layer set / preset (run side by side) -> one document,
    every run's ppl_delta_pct against the bf16 baseline of its model and layer set."""
    merged: dict = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        if not merged:
            merged = {k: v for k, v in part.items() if k not in ("models", "runtime_s", "host")}
            merged.update(models={}, shards=[])
        merged["shards"].append({"file": Path(path).name, "runtime_s": part.get("runtime_s"),
                                 "host": part.get("host"), "models": sorted(part["models"])})
        for name, entry in part["models"].items():
            into = merged["models"].setdefault(name, {"tokens_scored": entry["tokens_scored"], "bf16": {},
                                                      "runs": []})
            bf16 = entry.get("bf16", {})
            if "ppl" in bf16:  # one baseline for the shard's single layer set
                labels = {r["layers"] for r in entry["runs"]} or {next(iter(MODELS[name]["layer_sets"]))}
                if len(labels) != 1:
                    raise SystemExit(f"{path}: {name}: one baseline for layer sets {sorted(labels)}")
                bf16 = {labels.pop(): bf16}
            for label, base in bf16.items():
                known = into["bf16"].setdefault(label, base)
                if abs(known["ppl"] - base["ppl"]) > 1e-3:
                    raise SystemExit(f"{path}: {name} [{label}] bf16 ppl {base['ppl']} != {known['ppl']}")
            seen = {(r["layers"], r["preset"], r["variant"], r["path"]) for r in into["runs"]}
            into["runs"].extend(r for r in entry["runs"]
                                if (r["layers"], r["preset"], r["variant"], r["path"]) not in seen)
    for entry in merged["models"].values():
        for rec in entry["runs"]:
            base = entry["bf16"].get(rec["layers"])
            if base is None:
                raise SystemExit(f"no bf16 baseline for layers {rec['layers']}")
            rec["ppl_delta_pct"] = round(ppl_delta_pct(rec["ppl"], base["ppl"]), 3)
    # shards ran at the same time: the wall time of the whole is the longest shard
    merged["runtime_s"] = max(s["runtime_s"] or 0 for s in merged["shards"])
    merged["runtime_s_all_shards"] = round(sum(s["runtime_s"] or 0 for s in merged["shards"]), 1)
    return merged


def table(doc: dict) -> str:
    """Markdown table of a results document: one row per model, layers, preset, variant."""
    lines = ["| model | layers | preset | variant | prefill ΔPPL % | decode ΔPPL % |", "|---|---|---|---|---|---|"]
    for name, entry in doc["models"].items():
        for label, base in entry["bf16"].items():
            lines.append(f"| {name} | {label} | bf16 | - | ppl {base['ppl']:.4f} | (same) |")
        rows: dict = {}
        for r in entry["runs"]:
            rows.setdefault((r["layers"], r["preset"], r["variant"]), {})[r["path"]] = r.get("ppl_delta_pct")
        order = {p: i for i, p in enumerate(PRESET_ORDER)}
        for (label, preset, variant), paths in sorted(rows.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
            cells = [f"{paths[p]:+.2f}" if paths.get(p) is not None else "not run" for p in PATH_CHUNKS]
            lines.append(f"| {name} | {label} | {preset.removeprefix('turboquant_')} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge sharded results into --out and exit")
    parser.add_argument("--models-dir", help="folder holding the HF folders <model>/")
    parser.add_argument("--out", help="results JSON (rewritten after every run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layer-sets", nargs="+", help="labels of MODELS[..]['layer_sets'] (default all)")
    parser.add_argument("--presets", nargs="+", default=PRESET_ORDER, choices=PRESET_ORDER)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--paths", nargs="+", default=list(PATH_CHUNKS), choices=list(PATH_CHUNKS))
    parser.add_argument("--tokens", type=int, default=3072, help="score the first N ids (default all 3072)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="no bf16 run (a shard whose baseline another shard scores; see --merge)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        doc = merge(args.merge)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(table(doc))
        return 0
    if not args.models_dir:
        parser.error("--models-dir is required")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
