#!/usr/bin/env bash
# Copy the pure-Triton TurboQuant kernel files of a patched vLLM tree to a directory that
# check_tq_kernels.py can import without vLLM (see stub_vllm.py).
#   tests/gpu/kernels/stage_sources.sh [PATCHED_TREE] [DEST]
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
TREE=${1:-$ROOT/build/vllm-0.26.0/patched}
DEST=${2:-$ROOT/build/tq-kernel-sources}
files=$(python3 -c "import sys; sys.path.insert(0, '$ROOT/tests/gpu/kernels'); import stub_vllm; print(' '.join(stub_vllm.KERNEL_FILES))")
for f in $files; do
  [[ -f $TREE/$f ]] || { echo "stage_sources: $TREE/$f not found (apply the patch series first)" >&2; exit 1; }
  mkdir -p "$DEST/$(dirname "$f")"
  cp "$TREE/$f" "$DEST/$f"
done
echo "stage_sources: $(echo "$files" | wc -w) files -> $DEST"
