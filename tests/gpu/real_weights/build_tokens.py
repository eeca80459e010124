"""Builds the fixed text and its token ids for the real-weight checks (runs HERE, on CPU, once).

    PYTHONPATH=<site with gguf> .venv-vllm/bin/python tests/gpu/real_weights/build_tokens.py \
        --gsm8k bench/data/gsm8k/test.jsonl \
        --smollm2-gguf SmolLM2-135M-Instruct.Q4_1.gguf --gemma3-gguf gemma-3-270m-q4_k_m.gguf

Writes `fixed_text.txt` (GSM8K test problems, MIT, OpenAI 2021) and `token_ids.json` next to this
file. The GPU host then needs no tokenizer: vLLM runs with `skip_tokenizer_init=True`.

Tokenizers: SmolLM2's comes from its GGUF through transformers 5.14.1 (correct BPE). Gemma 3's GGUF
tokenizer is mis-converted by transformers 5.14.1 ("The capital of France is" -> 10 pieces such as
'▁c','ap'), so a SentencePiece BPE model is rebuilt from the GGUF tokens/scores/types instead and
checked against the known ids [818, 5279, 529, 7001, 563].
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PPL_TOKENS = 3072          # > 2048 and > 5x Gemma 3's 512-token window
NUM_PROMPTS = 8
GEMMA3_CHECK = ("The capital of France is", [818, 5279, 529, 7001, 563])
GEMMA3_BOS = 2


def gsm8k_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def clean_answer(answer: str) -> str:
    # drop the <<48/2=24>> calculator annotations: they are not natural text
    return re.sub(r"<<[^>]*>>", "", answer)


def fixed_text(items: list[dict], num_items: int) -> str:
    return "".join(f"Question: {it['question']}\nAnswer: {clean_answer(it['answer'])}\n\n" for it in items[:num_items])


def prompt_texts(items: list[dict]) -> list[str]:
    # Later problems than the PPL text, so greedy prompts do not repeat it.
    return [f"Question: {it['question']}\nAnswer:" for it in items[-NUM_PROMPTS:]]


def gemma3_sentencepiece(gguf_path: Path):
    """SentencePiece BPE model rebuilt from the GGUF vocabulary (Gemma 3: no dummy prefix, byte fallback)."""
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.split_digits = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id = 3, 2
    model.trainer_spec.eos_id, model.trainer_spec.pad_id = 1, 0
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.escape_whitespaces = True
    model.normalizer_spec.remove_extra_whitespaces = False
    # GGUF token types follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    piece_type = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
                  3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
                  5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for token, score, kind in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), piece_type[int(kind)]
    processor = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    text, expected = GEMMA3_CHECK
    got = processor.encode(text)
    if got != expected:
        raise SystemExit(f"rebuilt Gemma 3 SentencePiece encodes {text!r} as {got}, expected {expected}")
    return processor


def build(gsm8k: Path, smollm2_gguf: Path, gemma3_gguf: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    items = gsm8k_items(gsm8k)
    smol = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    gemma = gemma3_sentencepiece(gemma3_gguf)
    encoders = {
        # SmolLM2's tokenizer adds no BOS; Gemma 3's GGUF says add_bos_token=True
        "smollm2-135m": (lambda s: smol(s, add_special_tokens=False).input_ids, [],
                         "transformers 5.14.1 AutoTokenizer from the GGUF (gpt2 BPE), no BOS"),
        "gemma3-270m": (gemma.encode, [GEMMA3_BOS],
                        "SentencePiece BPE rebuilt from the GGUF vocab, BOS 2 prepended"),
    }
    num_items = 1
    while min(len(enc(fixed_text(items, num_items))) for enc, _, _ in encoders.values()) < PPL_TOKENS:
        num_items += 1
    text = fixed_text(items, num_items)
    prompts = prompt_texts(items)
    result = {
        "source": f"GSM8K test.jsonl (MIT, OpenAI 2021): first {num_items} problems, calculator annotations removed;"
                  f" prompts: last {NUM_PROMPTS} problems' questions",
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "ppl_tokens": PPL_TOKENS,
        "models": {},
    }
    for name, (encode, bos, how) in encoders.items():
        result["models"][name] = {
            "tokenizer": how,
            "ppl_ids": (bos + encode(text))[:PPL_TOKENS],
            "prompts": [bos + encode(p) for p in prompts],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fixed_text.txt").write_text(text)
    (out_dir / "prompts.txt").write_text("\n---\n".join(prompts) + "\n")
    (out_dir / "token_ids.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", type=Path, required=True)
    parser.add_argument("--smollm2-gguf", type=Path, required=True)
    parser.add_argument("--gemma3-gguf", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    built = build(args.gsm8k, args.smollm2_gguf, args.gemma3_gguf, args.out_dir)
    for name, entry in built["models"].items():
        print(name, "ppl ids", len(entry["ppl_ids"]), "prompt lengths", [len(p) for p in entry["prompts"]])
