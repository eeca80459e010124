#!/usr/bin/env bash
# Make a local stand-in for an image's real base (no registry is needed): an Ubuntu 24.04 (noble) rootfs
# bootstrapped with debootstrap from archive.ubuntu.com, turned into an OCI image by buildah
# (FROM scratch + ADD rootfs.tar /), with what the real base adds on top of the plain rootfs.
#
# Usage: base.sh ubuntu24.04|cuda-ubuntu24.04
#   ubuntu24.04        stands in for ubuntu:24.04 (the arc-b70 base)
#   cuda-ubuntu24.04   stands in for nvidia/cuda:13.0.2-base-ubuntu24.04 (rtx5060ti, rtx3090): the same
#                      rootfs plus the container-toolkit environment of NVIDIA's base image
# Prints the image name (localhost/tqstack-standin:<name>) on the last line of stdout.
# Environment:
#   TQ_CACHE_DIR          cache root (default ~/.cache/tqstack); the rootfs tarball is kept in
#                         $TQ_CACHE_DIR/standin/ so a rebuild does not bootstrap again
#   TQ_UBUNTU_MIRROR      default http://archive.ubuntu.com/ubuntu
#   TQ_BUILDAH_STORAGE    buildah storage flags (default --storage-driver vfs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:?usage: base.sh ubuntu24.04|cuda-ubuntu24.04}"
case "$name" in
  ubuntu24.04|cuda-ubuntu24.04) ;;
  *) echo "base.sh: unknown stand-in '$name' (valid: ubuntu24.04, cuda-ubuntu24.04)" >&2; exit 2 ;;
esac
cache="${TQ_CACHE_DIR:-$HOME/.cache/tqstack}/standin"
mirror="${TQ_UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
read -r -a storage <<<"${TQ_BUILDAH_STORAGE:---storage-driver vfs}"
suite=noble
# Ubuntu's archive signing keys, packaged by Debian (sid) as ubuntu-keyring; pinned by the sha256 in
# Debian's signed sid index. debootstrap then checks noble's Release signature with it.
keyring_deb_url=http://deb.debian.org/debian/pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1-0.2_all.deb
keyring_deb_sha256=b2e7ed48431bf9e7978ae810bbdaf253093570d6e3f864e575b7c13554b81174
image="localhost/tqstack-standin:$name"
mkdir -p "$cache"

if buildah "${storage[@]}" inspect --type image "$image" >/dev/null 2>&1; then
  echo "base.sh: $image already exists" >&2
  echo "$image"
  exit 0
fi

rootfs_tar="$cache/ubuntu-$suite-minbase.tar"
if [[ ! -f "$rootfs_tar" ]]; then
  for tool in debootstrap zstd; do
    command -v "$tool" >/dev/null || { echo "base.sh: $tool is missing (apt-get install -y debootstrap zstd)" >&2; exit 2; }
  done
  work="$(mktemp -d "$cache/bootstrap.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  curl -fsSL -o "$work/keyring.deb" "$keyring_deb_url"
  echo "$keyring_deb_sha256  $work/keyring.deb" | sha256sum --check --quiet
  dpkg-deb -x "$work/keyring.deb" "$work/keyring"
  # Debian's debootstrap has no 'noble' script; every Ubuntu release since gutsy uses the gutsy one.
  debootstrap --variant=minbase --components=main --merged-usr \
    --keyring="$work/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
    "$suite" "$work/rootfs" "$mirror" /usr/share/debootstrap/scripts/gutsy
  # What the ubuntu:24.04 image has beyond a minbase bootstrap: the deb822 sources of all four
  # components with -updates and -security, the 'ubuntu' user (uid 1000), no apt lists, no caches.
  rm -f "$work/rootfs/etc/apt/sources.list"
  cat >"$work/rootfs/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates $suite-backports
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: http://security.ubuntu.com/ubuntu
Suites: $suite-security
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
  chroot "$work/rootfs" useradd --create-home --uid 1000 --user-group --shell /bin/bash ubuntu
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/cache/apt/archives/"*.deb
  tar --numeric-owner --xattrs -C "$work/rootfs" -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf "$work"
  trap - EXIT
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
ln "$rootfs_tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$rootfs_tar" "$ctx/rootfs.tar"
cp "$here/Containerfile.$name" "$ctx/Containerfile"
buildah "${storage[@]}" bud --isolation chroot --format docker -f "$ctx/Containerfile" -t "$image" "$ctx" >&2
echo "$image"
