#!/usr/bin/env bash
# GPU host, ONE lane (tests/gpu/kit/install.sh already installed /tmp/site-patched; .gpu/extra copied):
#   TQSTACK_COMMIT=<sha> CUDA_VISIBLE_DEVICES=2,3 bash tests/gpu/bench/run_bench.sh --out results/bench --deadline-s 540
# One KV dtype per GPU in parallel (auto, turboquant_4bit_nc): patched vLLM 0.26.0 with the Qwen3.6-27B
# full-size config and dummy weights (capacity; harness and `vllm bench serve` interleaved, repeated), then
# SmolLM2-135M quality; merged into one tqbench run dir. --out gets bench-run.tar.gz, fidelity.json,
# session.log. Other flags go to bench_session.py (--dry-run prints the plan; --repeats N; --dtypes ...).
# ENFORCE_EAGER=0 drops --enforce-eager (torch.compile + CUDA graphs: slower start). Also accepted:
# `run_bench.sh auto,turboquant_4bit_nc` with RESULTS_DIR (the results directory; OUT is read when it is
# unset) and BUDGET_S (seconds) in the environment, as tests/gpu/session.py starts it.
# One slice of the complete one-GPU run (gpu-complete.yaml; README "The complete run in slices"):
#   CUDA_VISIBLE_DEVICES=0 bash tests/gpu/bench/run_bench.sh --slice named-a --model gemma-4-31b --dtypes auto --out $OUT/s1
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
SITE="${SITE:-/tmp/site-patched}"
EXTRA_SITE="${EXTRA_SITE:-/tmp/site-extra}"
STATE="${STATE:-/tmp/tq-bench}"
OUT_DIR="${RESULTS_DIR:-${OUT:-$ROOT/out}}"
DEADLINE="${BUDGET_S:-540}"
ARGS=()
# A first argument without -- is the dtype list (tests/gpu/session.py calls `run_bench.sh auto,turboquant_4bit_nc`).
if [[ $# -gt 0 && "$1" != --* ]]; then ARGS+=(--dtypes "$1"); shift; fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --deadline-s) DEADLINE="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
mkdir -p "$STATE" "$OUT_DIR"
START=$(date +%s)
for a in "${ARGS[@]}"; do
  [[ "$a" == --dry-run || "$a" == --list ]] && DRY=1
  [[ "$a" == --slice ]] && SLICE=1  # a slice of the complete run serves with decode CUDA graphs, never eager
done
if [[ -z "${DRY:-}" ]]; then
  if [[ ! -d "$SITE/vllm" ]]; then
    echo "run_bench: $SITE has no vllm/; run tests/gpu/kit/install.sh first (tests/gpu/README.md)" >&2
    exit 2
  fi
  # The client's extra wheels (locust and its deps; lm_eval and needlehaystack --no-deps), from .gpu/extra.
  if [[ ! -f "$EXTRA_SITE/.installed" ]]; then
    if ! ls "$ROOT"/.gpu/extra/*.whl >/dev/null 2>&1; then
      echo "run_bench: no $EXTRA_SITE and no .gpu/extra/*.whl; copy .gpu/extra to the host (build-extra-kit.sh)" >&2
      exit 2
    fi
    (cd "$ROOT/.gpu/extra" && sha256sum -c --quiet SHA256SUMS) || { echo "run_bench: .gpu/extra checksum mismatch" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$EXTRA_SITE" \
      "$ROOT"/.gpu/extra/*.whl "$ROOT"/.gpu/extra/nodeps/*.whl && touch "$EXTRA_SITE/.installed" || exit 2
  fi
fi
GSM8K=()
[[ -f "$ROOT/.gpu/extra/gsm8k/test.jsonl" ]] && GSM8K=(--gsm8k-dir "$ROOT/.gpu/extra/gsm8k")

GPU_LABEL="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
  | sed -e 's/nvidia//' -e 's/[^a-z0-9]//g')"
EAGER=(--enforce-eager)
[[ "${ENFORCE_EAGER:-1}" == 0 || -n "${SLICE:-}" ]] && EAGER=()
LEFT=$(( DEADLINE - ($(date +%s) - START) - 5 ))
# A slice's log is its own (slices of one session share $STATE); a resumed lane appends to the state's log.
LOG="$STATE/session.log"
[[ -n "${SLICE:-}" ]] && LOG="$OUT_DIR/session.log"
cd "$ROOT"
PYTHONUNBUFFERED=1 PYTHONPATH="$SITE" python3 tests/gpu/bench/bench_session.py \
  --site "$SITE" --client-path "$EXTRA_SITE" --state "$STATE" --out "$OUT_DIR" \
  --gpu-label "${GPU_LABEL:-gpu}" --deadline-s "$LEFT" "${EAGER[@]}" "${GSM8K[@]}" "${ARGS[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[[ "$LOG" == "$OUT_DIR/session.log" ]] || cp "$LOG" "$OUT_DIR/session.log" 2>/dev/null
exit "$rc"
