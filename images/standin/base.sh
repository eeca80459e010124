#!/usr/bin/env bash
# Make a local stand-in for an image's real base (no registry is needed): an Ubuntu 24.04 (noble) rootfs
# bootstrapped with debootstrap from archive.ubuntu.com, turned into an OCI image by buildah
# (FROM scratch + ADD rootfs.tar /), with what the real base adds on top of the plain rootfs.
#
# Usage: base.sh ubuntu24.04|cuda-ubuntu24.04|cuda-debian12
#   ubuntu24.04        stands in for ubuntu:24.04 (the arc-b70 base)
#   cuda-ubuntu24.04   stands in for nvidia/cuda:13.0.2-base-ubuntu24.04 (rtx5060ti, rtx3090): the same
#                      rootfs plus the container-toolkit environment of NVIDIA's base image
#   cuda-debian12      the CI build's base: Debian 12 (bookworm, CPython 3.11, the only Python for which
#                      a CPU torch wheel is at hand) with the same container-toolkit environment
# Prints the image name (localhost/tqstack-standin:<name>) on the last line of stdout.
# Environment:
#   TQ_CACHE_DIR          cache root (default ~/.cache/tqstack); the rootfs tarball is kept in
#                         $TQ_CACHE_DIR/standin/ so a rebuild does not bootstrap again
#   TQ_UBUNTU_MIRROR      default http://archive.ubuntu.com/ubuntu
#   TQ_DEBIAN_MIRROR      default http://deb.debian.org/debian
#   TQ_BUILDAH_STORAGE    buildah storage flags (default --storage-driver vfs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:?usage: base.sh ubuntu24.04|cuda-ubuntu24.04|cuda-debian12}"
case "$name" in
  ubuntu24.04|cuda-ubuntu24.04) distro=ubuntu suite=noble ;;
  cuda-debian12) distro=debian suite=bookworm ;;
  *) echo "base.sh: unknown stand-in '$name' (valid: ubuntu24.04, cuda-ubuntu24.04, cuda-debian12)" >&2; exit 2 ;;
esac
cache="${TQ_CACHE_DIR:-$HOME/.cache/tqstack}/standin"
if [[ $distro == ubuntu ]]; then mirror="${TQ_UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
else mirror="${TQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"; fi
read -r -a storage <<<"${TQ_BUILDAH_STORAGE:---storage-driver vfs}"
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

rootfs_tar="$cache/$distro-$suite-minbase.tar"
if [[ ! -f "$rootfs_tar" ]]; then
  for tool in debootstrap zstd; do
    command -v "$tool" >/dev/null || { echo "base.sh: $tool is missing (apt-get install -y debootstrap zstd)" >&2; exit 2; }
  done
  work="$(mktemp -d "$cache/bootstrap.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  if [[ $distro == debian ]]; then
    debootstrap --variant=minbase --components=main --merged-usr \
      --keyring=/usr/share/keyrings/debian-archive-keyring.gpg "$suite" "$work/rootfs" "$mirror"
    # as the debian:12 image: the main suite, -updates and -security
    rm -f "$work/rootfs/etc/apt/sources.list"
    cat >"$work/rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  else
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
  fi
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
# A build host behind a TLS-inspecting proxy trusts it through CAs in /usr/local/share/ca-certificates/;
# the stand-in carries them (and points pip at the system bundle, which the Dockerfiles' apt step
# builds with them), so the Dockerfiles' pip and curl steps work there as on a direct connection.
mkdir -p "$ctx/host-ca"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$ctx/host-ca/usr/local/share/ca-certificates" "$ctx/host-ca/etc"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/host-ca/usr/local/share/ca-certificates/"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ctx/host-ca/etc/pip.conf"
  echo "base.sh: the stand-in trusts the host's local CAs: $(cd /usr/local/share/ca-certificates && echo *.crt)" >&2
fi
buildah "${storage[@]}" bud --isolation chroot --format docker -f "$ctx/Containerfile" -t "$image" "$ctx" >&2
echo "$image"
