#!/usr/bin/env bash
# Install what images/build.sh needs when it is missing (Debian/Ubuntu host, as root): buildah (daemonless
# OCI builds), debootstrap + zstd (the Ubuntu stand-in rootfs; Ubuntu's .debs are zstd-compressed).
set -euo pipefail
missing=()
for tool in buildah debootstrap zstd; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[[ ${#missing[@]} == 0 ]] && exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "tools.sh: ${missing[*]} missing; install them (apt-get install -y ${missing[*]}) as root" >&2
  exit 2
fi
echo "tools.sh: installing ${missing[*]} from apt" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
