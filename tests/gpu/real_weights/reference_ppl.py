"""Perplexity of fixed token ids under transformers (fp32, eager attention): the reference a served model's
prompt logprobs are compared with.

    python tests/gpu/real_weights/reference_ppl.py --model DIR --ids IDS.json [--model-key gemma3-270m]

IDS.json is token_ids.json (its ``models.<key>.ppl_ids``). Prints one JSON line: ppl, tokens.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def reference_ppl(model_dir: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        tokens = torch.tensor([ids])
        logits = model(tokens).logits[0, :-1]
        return math.exp(torch.nn.functional.cross_entropy(logits.float(), tokens[0, 1:]).item())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ids", type=Path, required=True)
    parser.add_argument("--model-key", default="gemma3-270m")
    args = parser.parse_args()
    ids = json.loads(args.ids.read_text())["models"][args.model_key]["ppl_ids"]
    print(json.dumps({"ppl": reference_ppl(args.model, ids), "tokens": len(ids)}))
