"""Offline Gemma 4 model folder with a processor vLLM's Gemma 4 multimodal path accepts.

The tiny Gemma 4 config (or the full-size 31B config) gets:
- a WordLevel `tokenizers` tokenizer padded to exactly the config's vocab size, whose image/audio
  special tokens sit at the config's ids (boi/eoi/image/video/boa/eoa/audio), pad/eos/bos at the
  text config's ids; other ids are plain words ``w<id>`` split on whitespace;
- `tokenizer_config.json` naming those tokens (transformers 5 reads ``*_token`` keys as
  model-specific special tokens: Gemma4Processor needs ``tokenizer.image_token_id`` etc.);
- `processor_config.json` / `preprocessor_config.json` / `video_preprocessor_config.json`
  written by transformers' own Gemma 4 processor classes (defaults: patch 16, pooling 3,
  max_soft_tokens 280), so `AutoProcessor.from_pretrained(folder)` works without network.

Deterministic and needs only `tokenizers` + `transformers` (both in the GPU kit).
"""
from __future__ import annotations

import json
from pathlib import Path

# Gemma 4's real strings for its multimodal markers; the ids come from the config.
MARKERS = {
    "boi_token": ("<|image>", "boi_token_id"),
    "eoi_token": ("<image|>", "eoi_token_id"),
    "image_token": ("<|image|>", "image_token_id"),
    "video_token": ("<|video|>", "video_token_id"),
    "boa_token": ("<|audio>", "boa_token_id"),
    "eoa_token": ("<audio|>", "eoa_token_index"),
    "audio_token": ("<|audio|>", "audio_token_id"),
}
DEFAULT_OUTPUT_LENGTH = 280
TEXT_SPECIALS = {"pad_token": ("<pad>", "pad_token_id"), "eos_token": ("<eos>", "eos_token_id"),
                 "bos_token": ("<bos>", "bos_token_id")}


def special_token_ids(config: dict) -> dict[str, tuple[str, int]]:
    """{attribute: (string, id)} for every special token, ids from the config; error names the field."""
    text = config.get("text_config") or {}
    out: dict[str, tuple[str, int]] = {}
    for attr, (string, field) in MARKERS.items():
        if not isinstance(config.get(field), int):
            raise ValueError(f"config.json: {field} missing or not an int (needed for {string})")
        out[attr] = (string, config[field])
    for attr, (string, field) in TEXT_SPECIALS.items():
        if not isinstance(text.get(field), int):
            raise ValueError(f"config.json: text_config.{field} missing or not an int")
        out[attr] = (string, text[field])
    ids = [i for _, i in out.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"config.json: special token ids collide: {sorted(ids)}")
    return out


def build_tokenizer_json(config: dict) -> dict:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab_size = int((config.get("text_config") or {}).get("vocab_size") or 0)
    if vocab_size <= 0:
        raise ValueError("config.json: text_config.vocab_size missing")
    specials = special_token_ids(config)
    by_id = {i: s for s, i in specials.values()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"config.json: special token id {max(by_id)} >= text_config.vocab_size {vocab_size}")
    vocab = {by_id.get(i, f"w{i}"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in
                                  sorted(specials.values(), key=lambda item: item[1])])
    return json.loads(tokenizer.to_str())


def prepare_model_dir(config_json: Path, out: Path) -> Path:
    """Write config + tokenizer + processor files into ``out`` (idempotent)."""
    from transformers import AutoConfig, PreTrainedTokenizerFast
    from transformers.models.gemma4 import processing_gemma4

    config = json.loads(Path(config_json).read_text())
    config.pop("_provenance", None)
    config.pop("quantization_config", None)  # bf16 dummy weights
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        # vLLM's Gemma 4 processor reads it; the real checkpoints (and configs/hf 31B) have 280.
        vision.setdefault("default_output_length", DEFAULT_OUTPUT_LENGTH)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(config)))
    specials = special_token_ids(config)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_048_576,
                        "clean_up_tokenization_spaces": False, "padding_side": "left"}
    tokenizer_config.update({attr: string for attr, (string, _) in specials.items()})
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
    image_processor = _image_processor()
    processor = processing_gemma4.Gemma4Processor(
        feature_extractor=_feature_extractor(), image_processor=image_processor,
        tokenizer=tokenizer, video_processor=_video_processor())
    processor.save_pretrained(str(out))
    AutoConfig.from_pretrained(str(out))  # the folder must load as a config too
    return out


def _image_processor():
    # The torchvision backend when the host has torchvision (the GPU host does), else PIL.
    try:
        from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
        return Gemma4ImageProcessor()
    except ImportError:
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
        return Gemma4ImageProcessorPil()


def _feature_extractor():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    return Gemma4AudioFeatureExtractor()


def _video_processor():
    try:
        from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor
        return Gemma4VideoProcessor()
    except ImportError:
        return None
