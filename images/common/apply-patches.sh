#!/usr/bin/env bash
# Apply tqstack's vLLM patch series to the vLLM installed in a venv, then verify it is applied.
# Runs at image build time only (never at container start).
# Usage: apply-patches.sh VENV [PATCHES_DIR]
#   VENV         the venv that install-vllm.sh filled
#   PATCHES_DIR  the repository's patches/ directory (holds apply and vllm-<version>/series);
#                default: ../../patches relative to this script (the repository layout)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:?usage: apply-patches.sh VENV [PATCHES_DIR]}"
patches="${2:-$here/../../patches}"
[[ -x "$venv/bin/python" ]] || { echo "apply-patches.sh: '$venv' is not a venv (no bin/python)" >&2; exit 2; }
[[ -f "$patches/apply" ]] || { echo "apply-patches.sh: '$patches' has no apply script (expected the repository's patches/)" >&2; exit 2; }

version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))')"
series="$patches/vllm-$version"
[[ -f "$series/series" ]] || { echo "apply-patches.sh: no patch series for vLLM $version (expected $series/series)" >&2; exit 2; }
# purelib of the venv's own interpreter: where pip put vllm/
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

"$venv/bin/python" "$patches/apply" --series "$series" "$site"
"$venv/bin/python" "$patches/apply" --series "$series" --verify "$site"
echo "apply-patches.sh: series $(basename "$series") applied to $site"
