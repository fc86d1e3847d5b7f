#!/usr/bin/env bash
# rootfs.sh: a Debian root filesystem, as a tarball, built from Debian's archive
# with mmdebstrap (no container registry needed), and cached.
#
# Usage: scripts/rootfs.sh PACKAGE_LIST OUTPUT
#   PACKAGE_LIST  a file naming Debian packages, one per line; blank lines and
#                 text after '#' are ignored. They are installed on top of the
#                 variant's own packages, with their dependencies (no Recommends).
#   OUTPUT        the tarball to write: .tar, .tar.gz, .tar.xz or .tar.zst
#                 (mmdebstrap picks the compression from the name). Its directory
#                 must exist. The root filesystem inside is owned by root.
#
# Environment (all optional):
#   ROOTFS_SUITE    Debian suite (default bookworm)
#   ROOTFS_VARIANT  mmdebstrap variant (default apt: Essential packages + apt,
#                   like the debian:12-slim image; minbase, important, standard
#                   for a fuller system, e.g. a VM disk)
#   ROOTFS_MIRROR   archive URL (default http://deb.debian.org/debian); the
#                   suite's -updates and the matching -security suite are added
#   ROOTFS_SLIM     1 (default): leave out man pages, docs and locales, as Debian's
#                   slim images do; 0 keeps them
#   ROOTFS_CACHE    cache directory (default /var/cache/ambit/rootfs; empty: no cache)
#   ROOTFS_MAX_AGE  days a cached tarball is reused (default 7), so security
#                   updates arrive within a week
#
# A tarball is cached under a key of everything above that shapes it (suite,
# variant, mirror, slim, architecture, the sorted package list and this script's
# own text): a second run with the same inputs copies (hard-links when it can)
# the cached file to OUTPUT in a second. Needs root (mmdebstrap's root mode
# chroots); installs mmdebstrap from Debian when it is missing. Prints OUTPUT.
set -euo pipefail

log() { printf 'rootfs: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ $# -eq 2 ] || die "usage: $0 PACKAGE_LIST OUTPUT (see the header of $0)"
list=$1
out=$2
[ -f "$list" ] || die "package list $list: no such file"
[ -d "$(dirname "$out")" ] || die "output directory $(dirname "$out") does not exist"
case "$out" in
  *.tar | *.tar.gz | *.tar.xz | *.tar.zst) ;;
  *) die "OUTPUT $out: name it .tar, .tar.gz, .tar.xz or .tar.zst" ;;
esac

suite=${ROOTFS_SUITE:-bookworm}
variant=${ROOTFS_VARIANT:-apt}
mirror=${ROOTFS_MIRROR:-http://deb.debian.org/debian}
slim=${ROOTFS_SLIM:-1}
cache=${ROOTFS_CACHE-/var/cache/ambit/rootfs}
max_age=${ROOTFS_MAX_AGE:-7}
arch=$(dpkg --print-architecture)

mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$' | sort -u)
[ ${#packages[@]} -gt 0 ] || die "package list $list names no package"

ext=${out#"${out%.tar*}"}
key=$( { printf '%s\n' "$suite" "$variant" "$mirror" "$slim" "$arch" "${packages[@]}"; cat "$0"; } \
       | sha256sum | cut -c1-16)
cached=${cache:+$cache/$suite-$variant-$arch-$key$ext}

if [ -n "$cached" ] && [ -f "$cached" ] && [ -n "$(find "$cached" -mtime "-$max_age" -print)" ]; then
  log "reusing $cached"
  ln -f "$cached" "$out" 2>/dev/null || cp "$cached" "$out"
  printf '%s\n' "$out"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building a root filesystem needs root (mmdebstrap's root mode)"
if ! command -v mmdebstrap >/dev/null; then
  log "installing mmdebstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi

security=${mirror%/debian}/debian-security
slim_opts=()
if [ "$slim" = 1 ]; then
  # What Debian's slim images leave out; the copyright files stay.
  for p in man doc info locale lintian linda; do
    slim_opts+=(--dpkgopt="path-exclude=/usr/share/$p/*")
  done
  slim_opts+=(--dpkgopt="path-include=/usr/share/doc/*/copyright")
fi

tmp="$out.partial$ext"
trap 'rm -f "$tmp"' EXIT
log "building $suite ($variant) with ${#packages[@]} packages: ${packages[*]}"
start=$SECONDS
# The hook is in single quotes: mmdebstrap, not this shell, puts the root in $1.
# shellcheck disable=SC2016
mmdebstrap --quiet --mode=root --variant="$variant" --arch="$arch" \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --aptopt='APT::Install-Recommends "false"' \
  "${slim_opts[@]}" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/apt/* "$1"/var/log/dpkg.log' \
  "$suite" "$tmp" \
  "deb $mirror $suite main" \
  "deb $mirror $suite-updates main" \
  "deb $security $suite-security main"
mv "$tmp" "$out"
trap - EXIT
log "built $out in $((SECONDS - start))s ($(du -h "$out" | cut -f1))"

if [ -n "$cached" ]; then
  mkdir -p "$cache"
  # tarballs past their age are of use to no one (whatever their package list)
  find "$cache" -maxdepth 1 -name '*.tar*' -mtime "+$max_age" -delete
  if ! ln -f "$out" "$cached" 2>/dev/null; then
    cp "$out" "$cached.tmp"
    mv -f "$cached.tmp" "$cached"
  fi
fi
printf '%s\n' "$out"
