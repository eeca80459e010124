#!/usr/bin/env bash
# Build one image's Dockerfile with buildah (no Docker engine or registry needed) on a local stand-in
# of its base, then run the in-image checks (images/check_image.py) as the image's non-root user.
# The Dockerfile is used unchanged; only its base build argument (and, with --cpu-torch, the torch
# source argument) is set.
#
# Usage: build.sh IMAGE [--cpu-torch] [--pypi-only] [--standin NAME] [--log FILE] [--keep]
#   IMAGE         rtx5060ti | rtx3090 | arc-b70
#   --cpu-torch   TQSTACK_TORCH_SOURCE=cpu: the lock minus its GPU-only packages, CPU torch instead of
#                 the CUDA torch (the small build CI runs; every Dockerfile step still executes)
#   --pypi-only   (arc-b70) build what PyPI and the Ubuntu archive allow: the Dockerfile with each RUN that
#                 needs Intel's, GitHub's or the PyTorch XPU index's downloads replaced by its PyPI part or an
#                 echo (images/standin/pypi_only.py lists them in the log); no vLLM, so the in-image checks
#                 skip verify.py and the entrypoint
#   --standin N   base stand-in (images/standin/base.sh); default: the one of the image's real base
#                 (cuda-ubuntu24.04 for the CUDA images, ubuntu24.04 for arc-b70)
#   --log FILE    trimmed build log (default images/builds/<date>-IMAGE[-cpu-torch].log); the untrimmed
#                 one goes to build/images/
#   --keep        keep the image in buildah's storage afterwards (default: remove it, it is GBs in vfs)
# Environment: TQ_CACHE_DIR (default ~/.cache/tqstack), TQ_BUILDAH_STORAGE (default --storage-driver vfs),
#   PYTHON (runs check_image.py; needs PyYAML), CPU_TORCH_WHEEL (with --cpu-torch: a CPU torch wheel for
#   the base's Python; default $CPU_TORCH_FIND_LINKS/torch-$CPU_TORCH_VERSION+cpu-*.whl, as install-vllm.sh).
# Exit status: the build's, else the checks'.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
image_name="" cpu_torch=0 log="" keep=0 standin_override="" pypi_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-torch) cpu_torch=1; shift ;;
    --log) log="${2:?}"; shift 2 ;;
    --keep) keep=1; shift ;;
    --standin) standin_override="${2:?}"; shift 2 ;;
    --pypi-only) pypi_only=1; shift ;;
    -*) echo "build.sh: unknown option '$1' (valid: --cpu-torch --pypi-only --standin NAME --log FILE --keep)" >&2; exit 2 ;;
    *) image_name="$1"; shift ;;
  esac
done
case "$image_name" in
  rtx5060ti|rtx3090) base_arg=CUDA_BASE_IMAGE standin=cuda-ubuntu24.04 ;;
  arc-b70) base_arg=UBUNTU_IMAGE standin=ubuntu24.04 ;;
  *) echo "build.sh: IMAGE='$image_name' is not valid (valid: rtx5060ti, rtx3090, arc-b70)" >&2; exit 2 ;;
esac
standin="${standin_override:-$standin}"
export TQ_CACHE_DIR="${TQ_CACHE_DIR:-$HOME/.cache/tqstack}"
read -r -a storage <<<"${TQ_BUILDAH_STORAGE:---storage-driver vfs}"
variant="$image_name"
[[ $cpu_torch == 1 ]] && variant="$variant-cpu-torch"
[[ -n "$standin_override" ]] && variant="$variant-$standin_override"
[[ $pypi_only == 1 ]] && variant="$variant-pypi-only"
if [[ $pypi_only == 1 && $image_name != arc-b70 ]]; then
  echo "build.sh: --pypi-only is for arc-b70 (the CUDA images build from PyPI alone)" >&2; exit 2
fi
log="${log:-$here/builds/$(date -u +%Y-%m-%d)-$variant.log}"
mkdir -p "$(dirname "$log")" "$repo/build/images"
full_log="$repo/build/images/$(basename "$log" .log).full.log"
tag="localhost/tqstack/vllm:0.26.0-$variant"

bash "$here/standin/tools.sh"
# Trimmed log: pip's per-file download/progress lines and apt's per-package unpack lines are dropped;
# every step, its other output and its result are kept.
trim() {
  grep --line-buffered -v -E '^\s*(Downloading|Using cached|Collecting|Obtaining|Saved) |━|^\s*[0-9.]+ [kMG]?B [0-9.]+ [kMG]?B/s|^(Get:[0-9]+|Selecting previously unselected|Preparing to unpack|Unpacking|Setting up|Copying blob) |^\(Reading database' || true
}
say() { echo "$*" | tee -a "$full_log" >>"$log"; }
: >"$log"; : >"$full_log"

say "# tqstack image build: $variant"
say "date:        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "commit:      $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- images patches 2>/dev/null || echo ' (+ uncommitted changes in images/ or patches/)')"
[[ $pypi_only == 1 ]] || say "dockerfile:  images/$image_name/Dockerfile (unchanged; build arguments below)"
say "builder:     $(buildah --version) ${storage[*]} --isolation chroot --format docker"
say "host:        $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"

base="$(bash "$here/standin/base.sh" "$standin" 2>>"$full_log" | tail -1)"
say "base:        $base_arg=$base (stand-in, see images/README.md 'Stand-in bases')"

# The build context the Dockerfile's .dockerignore allows: images/common/ and patches/ (no caches).
ctx="$(mktemp -d "${TMPDIR:-/var/tmp}/tqstack-ctx.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/images"
cp -a "$here/common" "$ctx/images/common"
cp -a "$repo/patches" "$ctx/patches"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
check_args=()
if [[ $pypi_only == 1 ]]; then
  say "dockerfile:  DERIVED by images/standin/pypi_only.py from images/$image_name/Dockerfile; left out:"
  python3 "$here/standin/pypi_only.py" "$here/$image_name/Dockerfile" >"$ctx/Dockerfile" 2>"$ctx/left-out"
  sed 's/^/               /' "$ctx/left-out" | tee -a "$full_log" >>"$log"
  check_args=(--skip verify.py --skip entrypoint --skip-reason "no vLLM without the XPU build (left out above)")
else
  cp "$here/$image_name/Dockerfile" "$ctx/Dockerfile"
fi
series_sha="$(python3 "$here/common/series_sha256.py" "$repo/patches/vllm-0.26.0")"
build_args=(--build-arg "$base_arg=$base" --build-arg "TQSTACK_PATCH_SERIES_SHA256=$series_sha")
if [[ $cpu_torch == 1 ]]; then
  wheel="${CPU_TORCH_WHEEL:-$(compgen -G "${CPU_TORCH_FIND_LINKS:-/opt/wheels}/torch-${CPU_TORCH_VERSION:-2.13.0}+cpu-*.whl" | tail -1 || true)}"
  [[ -f "$wheel" ]] || { echo "build.sh: --cpu-torch needs a CPU torch wheel (CPU_TORCH_WHEEL=...)" >&2; exit 2; }
  mkdir -p "$ctx/images/common/cpu-wheels"
  cp "$wheel" "$ctx/images/common/cpu-wheels/"
  vllm_wheel="$TQ_CACHE_DIR/wheels/$(sed -n 's/^VLLM_WHEEL=//p' "$here/common/pins.env")"
  if [[ ! -f "$vllm_wheel" ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 -d "$TQ_CACHE_DIR/wheels" "vllm==0.26.0"
  fi
  cp "$vllm_wheel" "$ctx/images/common/cpu-wheels/"
  build_args+=(--build-arg TQSTACK_TORCH_SOURCE=cpu)
  say "torch:       TQSTACK_TORCH_SOURCE=cpu ($(basename "$wheel"); vLLM wheel $(basename "$vllm_wheel"), hash-checked against the lock)"
fi
say "build args:  ${build_args[*]}"
say ""

buildah "${storage[@]}" rmi -f "$tag" >/dev/null 2>&1 || true
start=$(date +%s)
set +e
buildah "${storage[@]}" bud --isolation chroot --format docker --layers=false \
  -f "$ctx/Dockerfile" -t "$tag" "${build_args[@]}" "$ctx" 2>&1 | tee -a "$full_log" | trim >>"$log"
rc=${PIPESTATUS[0]}
set -e
secs=$(( $(date +%s) - start ))
say ""
say "build exit status: $rc"
say "build time:  ${secs}s ($((secs / 60)) min $((secs % 60)) s)"
if [[ $rc != 0 ]]; then
  say "RESULT: build FAILED (see the last step above)"
  exit "$rc"
fi
# Size as `docker images` reports it (uncompressed, decimal units); check-image.sh adds du of the rootfs.
size=$(buildah "${storage[@]}" images --noheading --format '{{.Size}}' "$tag" | head -1)
say "image size:  $size (uncompressed, as 'docker images' reports it)"
say ""
set +e
"${PYTHON:-python3}" "$here/check_image.py" --storage "${storage[*]}" "${check_args[@]}" "$tag" 2>&1 | tee -a "$full_log" >>"$log"
crc=${PIPESTATUS[0]}
set -e
say ""
if [[ $crc == 0 ]]; then say "RESULT: built in ${secs}s, $size, all in-image checks passed"
else say "RESULT: built in ${secs}s, in-image checks FAILED (exit $crc)"; fi
[[ $keep == 1 ]] || buildah "${storage[@]}" rmi -f "$tag" >/dev/null 2>&1 || true
exit "$crc"
