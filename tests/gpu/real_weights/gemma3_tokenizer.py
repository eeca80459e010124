"""Gemma 3's tokenizer, rebuilt from its GGUF (the only Gemma 3 270M files a tqstack machine gets).

transformers 5.14-5.19 mis-convert the GGUF's tokenizer ("The capital of France is" -> 10 pieces such as
'▁c', 'ap'). The GGUF holds the SentencePiece vocabulary (pieces, scores, types), so the BPE model is rebuilt
from it, and transformers builds its fast tokenizer from that model. The user-defined pieces keep the
GGUF's literal spaces (llama.cpp's converter writes Gemma's '▁▁' whitespace-run pieces as '  '):
transformers makes them added tokens matched in the raw text, which is what Gemma's own tokenizer.json
does. Only the fast tokenizer (tokenizer.json) is kept: SentencePiece itself, reading the rebuilt model,
would split runs of spaces differently. The folder is an ordinary HF tokenizer, so vLLM can serve Gemma 3
270M with text prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

KNOWN_IDS = ("The capital of France is", [2, 818, 5279, 529, 7001, 563])  # Gemma 3, BOS 2 first
BOS_ID = 2


def sentencepiece_model(gguf_path: Path) -> bytes:
    """The serialized SentencePiece BPE model of a Gemma 3 GGUF (no dummy prefix, byte fallback)."""
    import gguf
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
    model.trainer_spec.unk_id, model.trainer_spec.bos_id = 3, BOS_ID
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
    return model.SerializeToString()


def save_hf_tokenizer(gguf_path: Path, folder: Path, model_max_length: int = 32768):
    """Write Gemma 3's tokenizer into ``folder`` (tokenizer.json and its config) and return it.

    Raises ValueError when the rebuilt tokenizer does not reproduce Gemma 3's known ids.
    """
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(gguf_path))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": model_max_length}, indent=1))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))  # tokenizer.json: no conversion at load
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # what a server loads: checked, then returned
    text, expected = KNOWN_IDS
    if (got := tokenizer(text).input_ids) != expected:
        raise ValueError(f"rebuilt Gemma 3 tokenizer encodes {text!r} as {got}, expected {expected}")
    return tokenizer
