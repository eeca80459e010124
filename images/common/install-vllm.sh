#!/usr/bin/env bash
# Install the pinned vLLM stack into a virtual environment from a hash-locked requirements file.
# The Dockerfiles and `make images-check` run this same script; only the torch source differs.
#
# Usage: install-vllm.sh --venv DIR --lock FILE [--python PY] [--torch-source lock|cpu]
#                        [--vllm-wheel-dir DIR] [--wheelhouse DIR]
#   --venv DIR            venv to create (or reuse, e.g. one that already holds the XPU torch)
#   --lock FILE           requirements lock with --hash lines (images/common/requirements-*.lock)
#   --python PY           interpreter that creates the venv (default: python3)
#   --torch-source lock   (images) everything from the lock, torch included
#   --torch-source cpu    (CPU test mode) torch==$CPU_TORCH_VERSION from $CPU_TORCH_FIND_LINKS instead of
#                         the lock's CUDA torch; the lock's GPU-only packages are skipped and vLLM comes
#                         from --vllm-wheel-dir. Every other package is the lock's, hash-checked.
#   --vllm-wheel-dir DIR  directory holding the vLLM wheel (still checked against the lock's hashes)
#   --wheelhouse DIR      offline install: --no-index --find-links DIR for every pip call
#
# Always: turboquant-vllm is uninstalled and kept out by a pip constraint written into the venv's
# pip.conf; ninja must end up in the venv's bin/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="" lock="" python="python3" torch_source="lock" vllm_wheel_dir="" wheelhouse=""
CPU_TORCH_VERSION="${CPU_TORCH_VERSION:-2.13.0}"
# In an image build (TQSTACK_TORCH_SOURCE=cpu) the CPU torch and the vLLM wheel sit in cpu-wheels/ here.
cpu_wheels="$here/cpu-wheels"
if [[ -d "$cpu_wheels" ]]; then CPU_TORCH_FIND_LINKS="${CPU_TORCH_FIND_LINKS:-$cpu_wheels}"; fi
CPU_TORCH_FIND_LINKS="${CPU_TORCH_FIND_LINKS:-/opt/wheels}"
# Packages that only make sense with CUDA (or that pin the CUDA torch ABI); skipped in cpu mode.
GPU_ONLY_RE='^(vllm|torch|torchaudio|torchvision|torchcodec|torch-c-dlpack-ext|triton|tokenspeed-triton|tokenspeed-mla|nvidia-.*|cuda-.*|flashinfer-python|fastsafetensors|humming-kernels|pynvvideocodec|quack-kernels|tilelang|z3-solver|nvtx)$'

die() { echo "install-vllm.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv="${2:?}"; shift 2 ;;
    --lock) lock="${2:?}"; shift 2 ;;
    --python) python="${2:?}"; shift 2 ;;
    --torch-source) torch_source="${2:?}"; shift 2 ;;
    --vllm-wheel-dir) vllm_wheel_dir="${2:?}"; shift 2 ;;
    --wheelhouse) wheelhouse="${2:?}"; shift 2 ;;
    *) die "unknown argument '$1' (valid: --venv --lock --python --torch-source --vllm-wheel-dir --wheelhouse)" ;;
  esac
done
[[ -n "$venv" ]] || die "--venv is required"
[[ -f "$lock" ]] || die "--lock '$lock' is not a file (valid: images/common/requirements-cuda.lock or requirements-xpu.lock)"
case "$torch_source" in
  lock) ;;
  cpu) [[ -z "$vllm_wheel_dir" && -d "$cpu_wheels" ]] && vllm_wheel_dir="$cpu_wheels"
       [[ -d "$vllm_wheel_dir" ]] || die "--torch-source cpu needs --vllm-wheel-dir DIR holding the vLLM wheel" ;;
  *) die "--torch-source '$torch_source' is not valid (valid: lock, cpu)" ;;
esac
[[ -z "$wheelhouse" || -d "$wheelhouse" ]] || die "--wheelhouse '$wheelhouse' is not a directory"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
offline=()
[[ -n "$wheelhouse" ]] && offline=(--no-index --find-links "$wheelhouse")

# Keep the third-party TurboQuant plugin out: remove it, then make any later install of it fail.
"${pip[@]}" uninstall -y turboquant-vllm
cp "$here/constraints.txt" "$venv/tqstack-constraints.txt"
"${pip[@]}" config --site set global.constraint "$venv/tqstack-constraints.txt"

if [[ "$torch_source" == "lock" ]]; then
  "${pip[@]}" install "${offline[@]}" --require-hashes --only-binary=:all: -r "$lock"
else
  # CPU test mode: the local CPU torch (never PyPI's CUDA build; its dependencies are in the lock),
  # then the lock minus GPU-only packages.
  "${pip[@]}" install --no-index --find-links "$CPU_TORCH_FIND_LINKS" --no-deps "torch==$CPU_TORCH_VERSION"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$venv/bin/python" - "$lock" "$GPU_ONLY_RE" "$work" <<'PY'
import re, sys
from pathlib import Path
lock, gpu_only, out = Path(sys.argv[1]), re.compile(sys.argv[2]), Path(sys.argv[3])
# A lock entry is "name==version \" followed by indented --hash / comment lines.
entries, current = [], None
for line in lock.read_text().splitlines():
    if line and not line[0].isspace() and not line.startswith("#"):
        current = [line]
        entries.append(current)
    elif current is not None and line.strip().startswith("--hash"):
        current.append(line)
cpu, vllm = [], []
for entry in entries:
    name = re.split(r"[=<>!~\[ ;]", entry[0], maxsplit=1)[0].lower().replace("_", "-")
    if name == "vllm":
        vllm.append(entry)
    elif not gpu_only.match(name):
        cpu.append(entry)
(out / "cpu.txt").write_text("".join("\n".join(e).rstrip(" \\") + "\n" for e in cpu))
(out / "vllm.txt").write_text("".join("\n".join(e).rstrip(" \\") + "\n" for e in vllm))
print(f"cpu mode: {len(cpu)} of {len(entries)} locked packages (GPU-only skipped), vLLM from the wheel dir")
PY
  # The lock is resolved for CPython 3.12; a few pure-Python pins (networkx 3.7, ...) declare
  # Requires-Python >= 3.12 but import on the CPU test machine's 3.11.
  "${pip[@]}" install "${offline[@]}" --no-deps --require-hashes --only-binary=:all: \
    --ignore-requires-python -r "$work/cpu.txt"
  "${pip[@]}" install --no-index --find-links "$vllm_wheel_dir" --no-deps --require-hashes -r "$work/vllm.txt"
fi

"${pip[@]}" uninstall -y turboquant-vllm
[[ -x "$venv/bin/ninja" ]] || { echo "install-vllm.sh: ninja is missing from $venv/bin after the install" >&2; exit 1; }
echo "install-vllm.sh: installed $("$venv/bin/python" -c 'import importlib.metadata as m; print("vllm", m.version("vllm"))') into $venv (torch source: $torch_source)"
