#!/usr/bin/env bash
# image.sh: build the ambit container image here, with no container registry.
#
# Usage: scripts/image.sh [--context-only] [IMAGE]
#   IMAGE           the reference to tag (default ghcr.io/ambit-mesh/ambit:VERSION,
#                   VERSION being pyproject.toml's: what daemonset/ deploys)
#   --context-only  only write the build context (build/image/: image-packages.txt,
#                   wheels/) for `docker build -f daemonset/Dockerfile build/image`
#
# Steps: the Python wheels of the project and its dependencies, built on this
# host with pip (pinned to the versions in .venv, which the tests ran with);
# the Debian base from daemonset/image-packages.txt (scripts/rootfs.sh, cached
# under /var/cache/ambit/rootfs); `podman import` of that base; `podman build`
# of daemonset/Dockerfile on it, with no network. Prints IMAGE.
#
# Environment: PODMAN (default: podman with runc and cgroupfs, the only way
# Debian 12's podman 4.3 runs on a hybrid cgroup host without CAP_SYS_RESOURCE),
# PYTHON (default .venv/bin/python, Python 3.11 like the image's).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'image: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

context_only=0
if [ "${1:-}" = --context-only ]; then context_only=1; shift; fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || die "$PY: no such interpreter (run make setup first)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PY is not Python 3.11: the image's interpreter is Debian 12's 3.11, and the wheels must match it"
version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=${1:-ghcr.io/ambit-mesh/ambit:$version}
ctx=build/image
start=$SECONDS

# -- the wheels ---------------------------------------------------------------
mkdir -p "$ctx"
cp daemonset/image-packages.txt "$ctx/"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A copy of the sources (symlinks kept): setuptools builds in the source tree.
mkdir "$tmp/src"
cp -a pyproject.toml README.md ambit agent ztunnel waypoint controlplane bpf "$tmp/src/"
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^ambit' > "$tmp/constraints.txt"
rm -rf "$ctx/wheels"
# --only-binary: every dependency comes as a wheel from PyPI; only ambit (pure Python) is built.
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation --only-binary=:all: \
  --constraint "$tmp/constraints.txt" --wheel-dir "$ctx/wheels" "$tmp/src" pip 2> >(grep -v "^WARNING: Location" >&2)
log "wheels: $(find "$ctx/wheels" -name '*.whl' | wc -l) in $((SECONDS - start))s"
if [ "$context_only" = 1 ]; then
  printf '%s\n' "$ctx"
  exit 0
fi

# -- the base -----------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "needs ${need[*]} (apt-get install ${need[*]}, as root)"
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
read -r -a podman <<< "${PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"

rootfs=$(bash scripts/rootfs.sh daemonset/image-packages.txt "$tmp/base.tar")
# The base image is named by the tarball's content, so an unchanged base is not imported again.
base=localhost/ambit-base:$(sha256sum "$rootfs" | cut -c1-16)
if ! "${podman[@]}" image exists "$base"; then
  "${podman[@]}" import --quiet "$rootfs" "$base" >/dev/null
  log "imported the base as $base"
fi

# -- the image ----------------------------------------------------------------
"${podman[@]}" build --quiet --network none --pull=never \
  --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
  --build-arg "BASE=$base" --label "org.opencontainers.image.version=$version" \
  -f daemonset/Dockerfile -t "$image" "$ctx" >/dev/null
"${podman[@]}" image prune --force --filter label=dev.ambit.stage=build >/dev/null
log "built $image in $((SECONDS - start))s ($("${podman[@]}" image inspect --format '{{.Size}}' "$image" \
  | awk '{printf "%d MB", $1 / 1e6}'))"
printf '%s\n' "$image"
