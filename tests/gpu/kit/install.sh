#!/usr/bin/env bash
# Runs ON THE GPU HOST, from the repo root. Two modes:
#
#   tests/gpu/kit/install.sh stash     # copy the part(s) present in .gpu/parts/ to /tmp/tqkit/
#   tests/gpu/kit/install.sh           # stash, then reassemble, verify, install, patch, print versions
#
# With every part in .gpu/parts/, the second form alone is enough. `stash` is for a host that
# receives the parts one at a time: /tmp/tqkit collects them until the last one arrives.
# Result: /tmp/site-unpatched (stock vLLM 0.26.0 + deps) and, when the patch series
# exists, /tmp/site-patched (same + patches/apply). Use with PYTHONPATH=/tmp/site-<variant>.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
STASH=/tmp/tqkit
PARTS_DIR=$ROOT/.gpu/parts
mode=${1:-install}

mkdir -p "$STASH"
shopt -s nullglob
[[ -f $PARTS_DIR/SHA256SUMS ]] && cp "$PARTS_DIR/SHA256SUMS" "$STASH/"
for part in "$PARTS_DIR"/tqkit.tar.xz.part-*; do
  cp "$part" "$STASH/"
  (cd "$STASH" && grep " $(basename "$part")\$" SHA256SUMS | sha256sum -c --quiet) \
    || { echo "install: checksum mismatch for $(basename "$part")" >&2; exit 1; }
  echo "install: stashed $(basename "$part") ($(du -h "$part" | cut -f1))"
done
if [[ $mode == stash ]]; then
  ls -l "$STASH"; exit 0
fi
[[ $mode == install ]] || { echo "install: unknown mode '$mode' (valid: stash, install)" >&2; exit 2; }

[[ -f $STASH/SHA256SUMS ]] || { echo "install: no SHA256SUMS in $STASH or $PARTS_DIR" >&2; exit 1; }
missing=()
for part in $(awk '/part-/{print $2}' "$STASH/SHA256SUMS"); do
  [[ -f $STASH/$part ]] || missing+=("$part")
done
if ((${#missing[@]})); then
  echo "install: missing parts ${missing[*]} (copy them to .gpu/parts/, or stash each one as it arrives; /tmp/tqkit must survive until the last)" >&2
  exit 1
fi
t0=$SECONDS
cat $(awk '/part-/{print "'"$STASH"'/"$2}' "$STASH/SHA256SUMS") > /tmp/tqkit.tar.xz
(cd /tmp && grep ' tqkit.tar.xz$' "$STASH/SHA256SUMS" | sha256sum -c --quiet) \
  || { echo "install: reassembled tarball checksum mismatch" >&2; exit 1; }
rm -rf /tmp/tqkit-x && mkdir -p /tmp/tqkit-x
tar -C /tmp/tqkit-x -xJf /tmp/tqkit.tar.xz
rm -f /tmp/tqkit.tar.xz
rm -rf /tmp/site-unpatched /tmp/site-patched
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-unpatched /tmp/tqkit-x/wheels/*.whl
echo "install: /tmp/site-unpatched ready in $((SECONDS - t0)) s"

patch_files=("$ROOT"/patches/vllm-0.26.0/*.patch)
if [[ -f $ROOT/patches/apply && ${#patch_files[@]} -gt 0 ]]; then
  cp -a /tmp/site-unpatched /tmp/site-patched
  # A failing series must not cost the run its unpatched baseline.
  if python3 "$ROOT/patches/apply" /tmp/site-patched; then
    echo "install: /tmp/site-patched ready (${#patch_files[@]} patch files in the checkout)"
  else
    rm -rf /tmp/site-patched
    echo "install: NOTE patched variant skipped: patches/apply failed (output above)"
  fi
else
  echo "install: NOTE patched variant skipped: patches/apply or patches/vllm-0.26.0/*.patch not in this checkout"
fi

for site in /tmp/site-unpatched /tmp/site-patched; do
  [[ -d $site ]] || continue
  PYTHONPATH=$site python3 - "$site" <<'EOF'
import json, sys, time
t0 = time.time()
import torch, transformers, tokenizers, vllm
from vllm import LLM  # noqa: F401  (fails without llguidance/xgrammar)
import vllm.entrypoints.openai.api_server  # noqa: F401  (what `vllm serve` imports)
from vllm.vllm_flash_attn import flash_attn_interface as fa
import os
marker = os.path.join(sys.argv[1], "vllm", "_tqstack_patches.json")
print(json.dumps({
    "site": sys.argv[1], "vllm": vllm.__version__, "torch": torch.__version__,
    "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "fa2": fa.FA2_AVAILABLE, "fa3": fa.FA3_AVAILABLE, "fa4": fa.FA4_AVAILABLE,
    "patches": json.load(open(marker)) if os.path.exists(marker) else None,
    "import_s": round(time.time() - t0, 1),
}))
EOF
done
