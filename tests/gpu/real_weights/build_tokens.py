"""Builds the fixed text and its token ids for the real-weight checks (runs HERE, on CPU, once).

    PYTHONPATH=<site with gguf> .venv-vllm/bin/python tests/gpu/real_weights/build_tokens.py \
        --gsm8k bench/data/gsm8k/test.jsonl \
        --smollm2-gguf SmolLM2-135M-Instruct.Q4_1.gguf --gemma3-gguf gemma-3-270m-q4_k_m.gguf

Writes `fixed_text.txt` (GSM8K test problems, MIT, OpenAI 2021) and `token_ids.json` next to this
file. The GPU host then needs no tokenizer: vLLM runs with `skip_tokenizer_init=True`.

Tokenizers: SmolLM2's comes from its GGUF through transformers 5.14.1 (correct BPE). Gemma 3's GGUF
tokenizer is mis-converted by transformers, so it is rebuilt from the GGUF vocabulary
(gemma3_tokenizer.py): the same tokenizer the model kit saves beside the converted weights, so a server
given text tokenizes it to exactly these ids.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gemma3_tokenizer  # noqa: E402

PPL_TOKENS = 3072          # > 2048 and > 5x Gemma 3's 512-token window
NUM_PROMPTS = 8


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


def build(gsm8k: Path, smollm2_gguf: Path, gemma3_gguf: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    items = gsm8k_items(gsm8k)
    smol = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    with tempfile.TemporaryDirectory(prefix="gemma3-tokenizer-") as folder:  # the tokenizer stays loaded
        gemma = gemma3_tokenizer.save_hf_tokenizer(gemma3_gguf, Path(folder))
    encoders = {
        # SmolLM2's tokenizer adds no BOS; Gemma 3's GGUF says add_bos_token=True
        "smollm2-135m": (lambda s: smol(s, add_special_tokens=False).input_ids, [],
                         "transformers 5.14.1 AutoTokenizer from the GGUF (gpt2 BPE), no BOS"),
        "gemma3-270m": (lambda s: gemma(s, add_special_tokens=False).input_ids, [gemma3_tokenizer.BOS_ID],
                        "Gemma 3 tokenizer rebuilt from the GGUF vocabulary (gemma3_tokenizer.py), BOS 2 prepended"),
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
