"""GGUF -> HF folder (bf16 safetensors + config) with transformers, offline. Runs on the GPU host
(from tests/gpu/kit/models.sh install) and here for the CPU test of the install path.

    python3 tests/gpu/real_weights/convert_gguf.py --gguf F.gguf --out DIR [--sha256 HEX] [--tokenizer]

transformers dequantizes the GGUF into an ordinary model; the GGUF quantizer is dropped before
`save_pretrained` (recipe of bench/fixtures/convert_smollm2.py). `--tokenizer` also saves the
tokenizer: SmolLM2's as transformers converts it from the GGUF, Gemma 3's rebuilt from the GGUF
vocabulary (gemma3_tokenizer.py; transformers mis-converts it), so both folders can be served with text.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_path: Path, out: Path, expected_sha256: str | None, with_tokenizer: bool) -> dict:
    if expected_sha256:
        digest = sha256_of(gguf_path)
        if not digest.startswith(expected_sha256):
            raise SystemExit(f"--gguf {gguf_path}: sha256 {digest}, expected {expected_sha256}...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # dequantized weights are plain bf16; the GGUF quantizer cannot serialize
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if with_tokenizer and model.config.model_type.startswith("gemma3"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import gemma3_tokenizer

        gemma3_tokenizer.save_hf_tokenizer(gguf_path, partial)
    elif with_tokenizer:
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)  # only a complete folder ever appears at `out`
    config = json.loads((out / "config.json").read_text())
    summary = {
        "out": str(out), "architectures": config.get("architectures"),
        "num_hidden_layers": config.get("num_hidden_layers"), "head_dim": config.get("head_dim"),
        "sliding_window": config.get("sliding_window"), "layer_types": config.get("layer_types"),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokenizer": with_tokenizer, "convert_s": round(time.time() - t0, 1),
    }
    print("convert_gguf: " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha256", help="expected sha256 (prefix) of --gguf")
    parser.add_argument("--tokenizer", action="store_true", help="also save the tokenizer converted from the GGUF")
    args = parser.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"--gguf {args.gguf}: no such file")
    convert(args.gguf, args.out, args.sha256, args.tokenizer)
