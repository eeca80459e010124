#!/usr/bin/env bash
# The image build CI runs (`make images-build-check`, part of `make images-check`): the rtx3090 Dockerfile,
# unchanged, built with buildah with TQSTACK_TORCH_SOURCE=cpu (the lock minus its GPU-only packages, a CPU
# torch) on the cuda-debian12 stand-in, then the in-image checks as the image's user (images/check_image.py).
# Every Dockerfile instruction executes: apt, user creation, COPY, the hash-locked install, the patch series,
# verify.py, ENV, USER, ENTRYPOINT. Why Debian 12 and not the Ubuntu 24.04 stand-in: the only CPU torch at hand
# is a CPython 3.11 wheel, and Ubuntu 24.04 has only 3.12 (images/README.md, "Stand-in bases"); the full
# builds on the Ubuntu stand-in are `make images-build IMAGE=...`, logged in images/builds/.
# Cold (no cached rootfs) this bootstraps Debian 12 once into ~/.cache/tqstack/standin/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
log="$repo/build/images/ci-rtx3090-cpu-torch.log"
start=$(date +%s)
set +e
bash "$here/build.sh" rtx3090 --cpu-torch --standin cuda-debian12 --log "$log"
rc=$?
set -e
secs=$(( $(date +%s) - start ))
echo "images-build-check: log $log (trimmed; untrimmed in build/images/)"
grep -E '^(STEP |build |image size|ok  |FAIL|       \(series|# in-image|RESULT)' "$log" | cut -c1-200 || true
if [[ $rc == 0 ]]; then
  echo "images-build-check: passed in ${secs}s (rtx3090 Dockerfile, CPU torch, Debian 12 stand-in)"
else
  echo "images-build-check: FAILED (exit $rc) after ${secs}s; see $log" >&2
fi
exit "$rc"
