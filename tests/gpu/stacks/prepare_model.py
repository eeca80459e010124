#!/usr/bin/env python3
"""Build a local model folder for `vllm serve --load-format dummy` on the offline GPU host.

The folder holds the full-size architecture config committed under configs/hf/<name>/config.json
(bf16: no quantization_config, so the dummy weights are bf16 whatever the real checkpoint uses) and a
small byte-level BPE tokenizer trained here on a seeded word corpus, padded to the model's exact
vocab_size so every token id the dummy model samples can be detokenized. The reasoning/tool parsers'
marker strings of Qwen3 and Gemma 4 are added as special tokens.

    python3 tests/gpu/stacks/prepare_model.py --hf-config qwen3.6-27b --out /tmp/tq-models/qwen3.6-27b

Needs only `tokenizers` (the GPU host image has it). Deterministic: same inputs, same files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one trainer thread, one merge order

REPO = Path(__file__).resolve().parents[3]
HF_CONFIGS = REPO / "configs" / "hf"
EOS = "<|endoftext|>"
# Marker strings vLLM 0.26.0's qwen3 / gemma4 reasoning and tool parsers look up in the vocabulary.
PARSER_MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<|channel>", "<channel|>",
                  "<|tool_call>", "<tool_call|>", "<|turn>", "<turn|>", "<|tool_response>", "<tool_response|>"]
TRAINED_VOCAB = 4096
_WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you "
    "were there been one all we their has would when if so what can more no time into only some could them see "
    "other than then now look come its over think also back after use two how our work first well way even new "
    "want because any these give day most market river engine garden letter window morning question number "
    "system program water story money village winter history mountain language science student company picture "
    "evening animal reason summer machine country island school cache token memory server request latency"
).split()


def corpus(seed: int = 0, sentences: int = 6000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = rng.choices(_WORDS, k=rng.randint(5, 15))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "?", "!"]) + f" {rng.randint(0, 9999)}")
    return lines


def vocab_size_of(config: dict) -> int:
    size = (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size")
    if not size:
        raise SystemExit("config.json has no vocab_size (top level or text_config)")
    return int(size)


def build_tokenizer(vocab_size: int) -> dict:
    """tokenizer.json content: trained BPE + filler entries up to exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(TRAINED_VOCAB, vocab_size), special_tokens=[EOS, *PARSER_MARKERS],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # Fillers: byte-level-valid strings ("Ġ" = space) no merge produces; they only make every id decodable.
    next_id = max(vocab.values()) + 1
    index = 0
    while next_id < vocab_size:
        token = f"Ġtqpad{index:x}"
        index += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return data


def config_path(hf_config: str) -> Path:
    """configs/hf/<hf_config>/config.json, or ``hf_config`` itself when it is a path to a config.json."""
    source = Path(hf_config) if hf_config.endswith(".json") else HF_CONFIGS / hf_config / "config.json"
    if not source.is_file():
        valid = sorted(p.parent.name for p in HF_CONFIGS.glob("*/config.json"))
        raise SystemExit(f"--hf-config {hf_config!r}: no {source}; valid: {', '.join(valid)} or a config.json path")
    return source


def prepare(hf_config: str, out: Path) -> Path:
    source = config_path(hf_config)
    config = json.loads(source.read_text())
    stamp = out / ".prepared"
    if stamp.exists() and stamp.read_text() == source.read_text():
        return out  # resumable: the same config was prepared already
    vocab_size = vocab_size_of(config)
    out.mkdir(parents=True, exist_ok=True)
    config.pop("_provenance", None)
    config.pop("quantization_config", None)  # bf16 dummy weights (see module doc)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "tokenizer.json").write_text(json.dumps(build_tokenizer(vocab_size)))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
        "model_max_length": 1_048_576, "clean_up_tokenization_spaces": False,
    }, indent=1))
    stamp.write_text(source.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-config", required=True, help="folder name under configs/hf/, or a config.json path")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = prepare(args.hf_config, args.out)
    print(f"{out}: config {args.hf_config}, tokenizer vocab {vocab_size_of(json.loads((out / 'config.json').read_text()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
