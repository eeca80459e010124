#!/usr/bin/env bash
# Build an offline wheel set (a wheelhouse) for an image from its hash-locked requirements, for
# air-gapped hosts. The same lock as the image build; every wheel is hash-checked by pip.
#
# Usage: wheelhouse.sh IMAGE OUT_DIR [--dry-run] [--only NAME[,NAME...]]
#   IMAGE      rtx5060ti | rtx3090 | arc-b70
#   OUT_DIR    where the wheels, the lock and install.sh go (make: build/wheelhouse/IMAGE)
#   --dry-run  resolve the lock for the image's platform (metadata only, with uv) and download nothing
#   --only     download just these locked packages (partial wheelhouse; used by the tests)
# Then on the offline host (CPython 3.12, x86_64, glibc >= 2.39):
#   OUT_DIR/install.sh /opt/venv      (pip install --no-index --find-links OUT_DIR --require-hashes)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=images/common/pins.env
source "$here/pins.env"
valid_images="rtx5060ti, rtx3090, arc-b70"
die() { echo "wheelhouse.sh: $*" >&2; exit 2; }

image="${1:-}"
out="${2:-}"
[[ -n "$image" ]] || die "IMAGE is required (valid: $valid_images)"
case "$image" in
  rtx5060ti|rtx3090) lock="$here/requirements-cuda.lock" ;;
  arc-b70) lock="$here/requirements-xpu.lock" ;;
  *) die "IMAGE='$image' is not a tqstack image (valid: $valid_images)" ;;
esac
[[ -n "$out" ]] || die "OUT_DIR is required (e.g. build/wheelhouse/$image)"
shift 2
dry_run=0 only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --only) only="${2:?--only needs NAME[,NAME...]}"; shift 2 ;;
    *) die "unknown option '$1' (valid: --dry-run, --only NAME[,NAME...])" ;;
  esac
done

python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
requirements="$lock"
if [[ -n "$only" ]]; then
  requirements="$work/only.txt"
  "$python" - "$lock" "$only" "$requirements" <<'PY'
import re, sys
from pathlib import Path
lock, wanted, out = Path(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
entries, current = {}, None
for line in lock.read_text().splitlines():
    if line and not line[0].isspace() and not line.startswith("#"):
        current = norm(re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0])
        entries[current] = [line]
    elif current and line.strip().startswith("--hash"):
        entries[current].append(line)
missing = [name for name in wanted if norm(name) not in entries]
if missing:
    sys.exit(f"wheelhouse.sh: --only {','.join(missing)}: not in {lock.name} (valid: the lock's package names)")
out.write_text("".join("\n".join(entries[norm(name)]).rstrip(" \\") + "\n" for name in wanted))
PY
fi

# Target interpreter and platform: the lock's (CPython 3.12, manylinux up to glibc 2.39), not this machine's.
glibc_minor="${LOCK_PYTHON_PLATFORM##*_}"
platforms=()
for ((minor = glibc_minor; minor >= 17; minor--)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)

if [[ "$dry_run" == 1 ]]; then
  uv="${UV:-uv}"
  command -v "$uv" >/dev/null || die "--dry-run needs uv (pip install uv, or set UV=path)"
  "$uv" pip install --dry-run --no-deps --require-hashes --only-binary :all: \
    --python-version "$LOCK_PYTHON_VERSION" --python-platform "$LOCK_PYTHON_PLATFORM" \
    --index-url "$LOCK_INDEX_URL" --target "$work/target" -r "$requirements"
  echo "wheelhouse.sh: dry run ok: every pin of $(basename "$requirements") has a wheel for $image ($LOCK_PYTHON_PLATFORM, CPython $LOCK_PYTHON_VERSION)"
  exit 0
fi

mkdir -p "$out"
"$python" -m pip download --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
  --implementation cp --python-version "$LOCK_PYTHON_VERSION" "${platforms[@]}" \
  --index-url "$LOCK_INDEX_URL" -d "$out" -r "$requirements"
cp "$requirements" "$out/requirements.lock"
cp "$here/constraints.txt" "$out/constraints.txt"
cat > "$out/install.sh" <<EOF
#!/usr/bin/env bash
# Offline install of the $image stack from this wheelhouse (made by images/common/wheelhouse.sh).
# Usage: install.sh VENV   (needs CPython $LOCK_PYTHON_VERSION on x86_64 with glibc >= 2.${glibc_minor})
set -euo pipefail
here="\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)"
venv="\${1:?usage: install.sh VENV}"
[[ -x "\$venv/bin/python" ]] || python3 -m venv "\$venv"
"\$venv/bin/python" -m pip install --no-index --find-links "\$here" --require-hashes --only-binary=:all: \\
  -c "\$here/constraints.txt" -r "\$here/requirements.lock"
EOF
chmod +x "$out/install.sh"
if [[ "$image" == arc-b70 ]]; then
  echo "wheelhouse.sh: note: XPU torch, triton-xpu and vllm-xpu-kernels are not on PyPI and not in this wheelhouse" \
       "(see images/common/requirements-xpu-torch.txt); vLLM itself is built from its sdist in the image" >&2
fi
echo "wheelhouse.sh: $(find "$out" -name '*.whl' | wc -l) wheels in $out; install offline with: $out/install.sh VENV"
