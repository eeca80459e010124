#!/usr/bin/env bash
# Build the GPU kit: a slim vLLM 0.26.0 wheel + the pinned dependency wheels the offline
# GPU host lacks, as one xz tarball split into <= 48 MiB parts under .gpu/parts/ (small
# enough for size-limited transfers; copy them all at once where the host allows).
#
#   tests/gpu/kit/build-kit.sh              # from the repo root; ~15-25 min on 2 cores (xz)
#
# Output: .gpu/parts/tqkit.tar.xz.part-aa, -ab, ... and .gpu/parts/SHA256SUMS
# (checksums of the whole tarball and of each part). Same inputs give the same bytes.
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel)
KIT=$ROOT/tests/gpu/kit
CACHE=${TQSTACK_CACHE:-$HOME/.cache/tqstack}
VLLM_WHEEL_NAME=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_WHEEL_SHA256=adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de
# Parts of at most MAX_PART_MIB, equal-sized, as few as possible (each part is one more
# transfer where the host takes one part at a time; each part travels with the checkout,
# ~11 MB, through size-limited transfers).
MAX_PART_MIB=${MAX_PART_MIB:-48}
STAGE=$ROOT/build/gpu-kit            # build/ is git-ignored
PARTS=$ROOT/.gpu/parts               # .gpu/ is git-ignored; copy it to the GPU host with the checkout

# Left out of the vLLM wheel. Kept: FA2 (TurboQuant forces FlashAttention 2 for prefill
# and boundary layers), _C_stable_libtorch, _flashmla*, triton kernels, all Python code.
DROP=(
  vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so     # FA3 (153 MB): TurboQuant pins FA2; bf16 layers use FA2/Triton
  vllm/vllm_flash_attn/cute                    # FA4: needs nvidia-cutlass-dsl (not in the kit); without cute/interface.py
                                               # vLLM reports FA4 unavailable instead of failing at the first forward
  vllm/_moe_C_stable_libtorch.abi3.so          # MoE kernels: all three target models are dense
  vllm/vllm-rs                                 # Rust frontend binary, unused by `vllm serve`/LLM
  vllm/third_party/deep_gemm/include           # DeepGEMM JIT headers (FP8 GEMM, not used)
  vllm/third_party/deep_gemm/_C.cpython-310-x86_64-linux-gnu.so
  vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so
  vllm/third_party/deep_gemm/_C.cpython-313-x86_64-linux-gnu.so
  vllm/third_party/deep_gemm/_C.cpython-314-x86_64-linux-gnu.so
  vllm/third_party/fmha_sm100/cutlass          # SM100 (Blackwell datacenter) CUTLASS headers
)
# Requires-Dist of vLLM deliberately left out of the kit: GPU kernels for other paths (FlashInfer,
# CUTLASS DSL, tilelang, ...) and lazily imported extras (Anthropic/MCP/Mistral/OTel/video).
LEFT_OUT=(PyNvVideoCodec fastsafetensors flashinfer-python humming-kernels nvidia-cudnn-frontend
  nvidia-cutlass-dsl nvtx quack-kernels tilelang tokenspeed-mla torchcodec
  anthropic mcp mistral_common opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp
  opentelemetry-semantic-conventions-ai)

PY=${PYTHON:-python3}
"$PY" -c 'import packaging' 2>/dev/null || { echo "build-kit: needs the 'packaging' module for $PY" >&2; exit 1; }

mkdir -p "$CACHE/wheels" "$CACHE/gpu-wheels"
if [[ ! -f $CACHE/wheels/$VLLM_WHEEL_NAME ]]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" vllm==0.26.0 \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
fi
echo "$VLLM_WHEEL_SHA256  $CACHE/wheels/$VLLM_WHEEL_NAME" | sha256sum -c --quiet

# Dependency wheels for CPython 3.12 manylinux x86_64 (the host's python3), pinned.
platforms=(--platform any --platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in 5 12 17 24 26 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$CACHE/gpu-wheels" -r "$KIT/requirements-gpu.txt" 2>&1 | { grep -v 'is ignored' || true; }

rm -rf "$STAGE" && mkdir -p "$STAGE/wheels"
drop_args=()
for d in "${DROP[@]}"; do drop_args+=("$d"); done
"$PY" "$KIT/repack_wheel.py" "$CACHE/wheels/$VLLM_WHEEL_NAME" "$STAGE/wheels/$VLLM_WHEEL_NAME" --drop "${drop_args[@]}"
# Only the wheels the requirements file names (the cache may hold older pins).
mapfile -t wanted < <(grep -Ev '^\s*(#|$)' "$KIT/requirements-gpu.txt" | sed 's/\s*#.*//')
for req in "${wanted[@]}"; do
  name=${req%%==*}; version=${req#*==}
  pattern=$(echo "$name" | tr '[:upper:]-.' '[:lower:]__')
  match=$(cd "$CACHE/gpu-wheels" && ls | awk -v p="$pattern" -v v="$version" 'tolower($0) ~ "^"p"-"v"-" {print}' | head -1)
  [[ -n $match ]] || { echo "build-kit: no wheel for $req in $CACHE/gpu-wheels" >&2; exit 1; }
  "$PY" "$KIT/repack_wheel.py" "$CACHE/gpu-wheels/$match" "$STAGE/wheels/$match" >/dev/null
done
"$PY" "$KIT/check_deps.py" "$STAGE/wheels" "$KIT/host-packages.txt" --ignore "${LEFT_OUT[@]}"

# Manifest inside the tarball: what was dropped and why it is safe to ignore.
{
  echo "vllm_wheel_sha256=$VLLM_WHEEL_SHA256"
  printf 'dropped=%s\n' "${DROP[@]}"
  printf 'left_out=%s\n' "${LEFT_OUT[@]}"
  (cd "$STAGE/wheels" && ls)
} > "$STAGE/KIT-MANIFEST"

rm -rf "$PARTS" && mkdir -p "$PARTS"
tar -C "$STAGE" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - KIT-MANIFEST wheels \
  | xz -T2 -6 -c > "$STAGE/tqkit.tar.xz"
(cd "$STAGE" && sha256sum tqkit.tar.xz) > "$PARTS/SHA256SUMS"
size=$(stat -c %s "$STAGE/tqkit.tar.xz")
max_part=$((MAX_PART_MIB * 1024 * 1024))
num_parts=$(((size + max_part - 1) / max_part))
split -n "$num_parts" -a 2 "$STAGE/tqkit.tar.xz" "$PARTS/tqkit.tar.xz.part-"
(cd "$PARTS" && sha256sum tqkit.tar.xz.part-*) >> "$PARTS/SHA256SUMS"
rm "$STAGE/tqkit.tar.xz"
ls -l "$PARTS"
cat "$PARTS/SHA256SUMS"
