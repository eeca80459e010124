#!/usr/bin/env bash
# GPU host, one device call per KV dtype (the carry kit already installed /tmp/site-patched):
#   bash tests/gpu/bench/run_bench.sh auto                  # call 1 (carry .gpu/extra)
#   bash tests/gpu/bench/run_bench.sh turboquant_4bit_nc    # call 2, right after (machine still warm)
# Starts patched vLLM 0.26.0 (Qwen3.6-27B full-size config, dummy weights), runs the harness
# (tqbench: capacity + latency) and `vllm bench serve` on the same server with the same scenarios,
# writes fidelity.json, and packs the run directory into $OUT/bench-run.tar.gz (see README.md).
# ENFORCE_EAGER=1 adds --enforce-eager (faster start); BUDGET_S (default 560) bounds the call.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
DTYPES="${1:?usage: run_bench.sh DTYPE[,DTYPE] (auto, turboquant_4bit_nc)}"
SITE="${SITE:-/tmp/site-patched}"
EXTRA_SITE="${EXTRA_SITE:-/tmp/site-extra}"
STATE="${STATE:-/tmp/tq-bench}"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$STATE" "$OUT"

if [[ ! -d "$SITE/vllm" ]]; then
  echo "run_bench: $SITE has no vllm/; run the carry kit's install first (tests/gpu/README.md)" >&2
  exit 2
fi
# The client's extra wheels (locust and its deps), from this call's carry or an earlier one.
if [[ ! -f "$EXTRA_SITE/.installed" ]]; then
  if ! ls "$ROOT"/.gpu/extra/*.whl >/dev/null 2>&1; then
    echo "run_bench: no $EXTRA_SITE and no .gpu/extra/*.whl; carry .gpu/extra (build-extra-carry.sh)" >&2
    exit 2
  fi
  (cd "$ROOT/.gpu/extra" && sha256sum -c --quiet SHA256SUMS) || { echo "run_bench: .gpu/extra checksum mismatch" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$EXTRA_SITE" \
    "$ROOT"/.gpu/extra/*.whl && touch "$EXTRA_SITE/.installed" || exit 2
fi

GPU_LABEL="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
  | sed -e 's/nvidia//' -e 's/[^a-z0-9]//g')"
GPU_COUNT="$(nvidia-smi -L 2>/dev/null | wc -l)"
[[ "$GPU_COUNT" -gt 1 ]] && GPU_LABEL="${GPU_LABEL}x${GPU_COUNT}"

EAGER=()
[[ "${ENFORCE_EAGER:-0}" == 1 ]] && EAGER=(--enforce-eager)
cd "$ROOT"
PYTHONUNBUFFERED=1 PYTHONPATH="$SITE" python3 tests/gpu/bench/bench_session.py --dtypes "$DTYPES" \
  --site "$SITE" --client-path "$EXTRA_SITE" --state "$STATE" --out "$OUT" \
  --gpu-label "${GPU_LABEL:-gpu}" --budget-s "${BUDGET_S:-560}" "${EAGER[@]}" 2>&1 | tee -a "$STATE/session.log"
rc=${PIPESTATUS[0]}
cp "$STATE/session.log" "$OUT/session.log" 2>/dev/null
exit "$rc"
