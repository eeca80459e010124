#!/usr/bin/env bash
# Runs ON THE GPU HOST, from the repo root, after tests/gpu/kit/install.sh. Two modes:
#
#   tests/gpu/kit/models.sh stash     # copy the part(s) present in .gpu/models/ to /tmp/tqmodels/
#   tests/gpu/kit/models.sh install   # stash, then reassemble, verify, untar, install gguf into
#                                     # /tmp/site-models, convert both GGUFs to HF folders
#
# Result: /tmp/tqmodels/hf/smollm2-135m/ (LlamaForCausalLM bf16 + tokenizer) and
# /tmp/tqmodels/hf/gemma3-270m/ (Gemma3ForCausalLM bf16 + tokenizer rebuilt from the GGUF; token_ids.json beside).
# With every part in .gpu/models/, `install` alone is enough; `stash` collects parts that arrive one at a time.
# Overrides (CPU test here): TQMODELS_TMP (default /tmp), TQMODELS_PARTS (default .gpu/models),
# TQMODELS_SITE (transformers 5.14.1 site, default /tmp/site-patched), PYTHON (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
TMP_ROOT=${TQMODELS_TMP:-/tmp}
STASH=$TMP_ROOT/tqmodels
PARTS_DIR=${TQMODELS_PARTS:-$ROOT/.gpu/models}
SITE=${TQMODELS_SITE:-/tmp/site-patched}
MODELS_SITE=$TMP_ROOT/site-models
PY=${PYTHON:-python3}
mode=${1:-install}
[[ $mode == stash || $mode == install ]] || { echo "models: unknown mode '$mode' (valid: stash, install)" >&2; exit 2; }

mkdir -p "$STASH"
shopt -s nullglob
[[ -f $PARTS_DIR/SHA256SUMS ]] && cp "$PARTS_DIR/SHA256SUMS" "$STASH/"
for part in "$PARTS_DIR"/tqmodels.tar.part-*; do
  [[ -f $STASH/SHA256SUMS ]] || { echo "models: no SHA256SUMS next to $part" >&2; exit 1; }
  cp "$part" "$STASH/"
  (cd "$STASH" && grep " $(basename "$part")\$" SHA256SUMS | sha256sum -c --quiet) \
    || { echo "models: checksum mismatch for $(basename "$part")" >&2; exit 1; }
  echo "models: stashed $(basename "$part") ($(du -h "$part" | cut -f1))"
done
if [[ $mode == stash ]]; then
  ls -l "$STASH"; exit 0
fi

[[ -f $STASH/SHA256SUMS ]] || { echo "models: no SHA256SUMS in $STASH or $PARTS_DIR" >&2; exit 1; }
mapfile -t parts < <(awk '/part-/{print $2}' "$STASH/SHA256SUMS")  # in split order (aa, ab, ...)
missing=()
for part in "${parts[@]}"; do
  [[ -f $STASH/$part ]] || missing+=("$part")
done
if ((${#missing[@]})); then
  echo "models: missing parts ${missing[*]} (copy them to .gpu/models/, or stash each one as it arrives; /tmp/tqmodels must survive until the last)" >&2
  exit 1
fi
[[ -d $SITE ]] || { echo "models: TQMODELS_SITE $SITE does not exist (run tests/gpu/kit/install.sh first)" >&2; exit 1; }
t0=$SECONDS
(cd "$STASH" && cat "${parts[@]}") > "$TMP_ROOT/tqmodels.tar"
(cd "$TMP_ROOT" && grep ' tqmodels.tar$' "$STASH/SHA256SUMS" | sha256sum -c --quiet) \
  || { echo "models: reassembled tar checksum mismatch" >&2; exit 1; }
rm -rf "$STASH/x" && mkdir -p "$STASH/x"
tar -C "$STASH/x" -xf "$TMP_ROOT/tqmodels.tar"
rm -f "$TMP_ROOT/tqmodels.tar"
CONTENT=$STASH/x/tqmodels
(cd "$CONTENT" && sha256sum -c --quiet MANIFEST) || { echo "models: MANIFEST mismatch inside the tar" >&2; exit 1; }
rm -rf "$MODELS_SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$MODELS_SITE" "$CONTENT"/wheels/*.whl
echo "models: unpacked and gguf installed in $((SECONDS - t0)) s"

convert() {  # name gguf-file [--tokenizer]
  local name=$1 file=$2; shift 2
  PYTHONPATH=$MODELS_SITE:$SITE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" \
    "$PY" "$ROOT/tests/gpu/real_weights/convert_gguf.py" --gguf "$CONTENT/gguf/$file" --out "$STASH/hf/$name" "$@"
}
mkdir -p "$STASH/hf"
# The two conversions are independent CPU work: run them together.
convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf --tokenizer > "$STASH/convert-smollm2.log" 2>&1 &
smol_pid=$!
convert gemma3-270m gemma-3-270m-q4_k_m.gguf --tokenizer > "$STASH/convert-gemma3.log" 2>&1 &
gemma_pid=$!
status=0
wait $smol_pid || { status=1; echo "models: SmolLM2 conversion failed:" >&2; tail -20 "$STASH/convert-smollm2.log" >&2; }
wait $gemma_pid || { status=1; echo "models: Gemma 3 conversion failed:" >&2; tail -20 "$STASH/convert-gemma3.log" >&2; }
grep -h '^convert_gguf:' "$STASH"/convert-*.log || true
cp "$CONTENT/token_ids.json" "$STASH/hf/"
echo "models: done in $((SECONDS - t0)) s (status $status); HF folders under $STASH/hf"
exit $status
