#!/usr/bin/env bash
# Installs everything ambit needs on a fresh Debian 12 machine, as root.
# Idempotent: a second run checks and prints nothing but a one-line summary.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv: Debian's python3 has no ensurepip without it, and `python3 -m venv`
# would leave a venv without pip behind.
APT_PACKAGES=(python3-venv python3-bpfcc bpftool linux-headers-amd64 iproute2 tcpdump procps)
VENV=.venv
PY=${PYTHON:-python3}

log() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to install: ${missing[*]}"; exit 1
  fi
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# BCC compiles against the running kernel's headers. Debian ships headers for
# its own kernel only; when the running kernel has none (6.18 on these
# machines), point the module build tree at the installed -amd64/-common trees:
# programs that use only uapi structures compile and load against them.
KREL=$(uname -r)
if [ ! -e "/lib/modules/$KREL/build/include" ] && [ "$(id -u)" -eq 0 ]; then
  # Globs, not `ls | sort`: under pipefail an ls that finds nothing would end
  # the script without a word.
  shopt -s nullglob
  hdrs=(/usr/src/linux-headers-*-amd64)
  commons=(/usr/src/linux-headers-*-common)
  shopt -u nullglob
  if [ ${#hdrs[@]} -eq 0 ] || [ ${#commons[@]} -eq 0 ]; then
    log "no kernel headers for $KREL (/lib/modules/$KREL/build/include) and no" \
        "/usr/src/linux-headers-*-amd64 and -common trees to link instead: BCC cannot" \
        "compile ambit's eBPF programs; install linux-headers-$KREL (or linux-headers-amd64)"
    exit 1
  fi
  hdr=$(printf '%s\n' "${hdrs[@]}" | sort -V | tail -n 1)
  common=$(printf '%s\n' "${commons[@]}" | sort -V | tail -n 1)
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$hdr" "/lib/modules/$KREL/build"
  ln -sfn "$common" "/lib/modules/$KREL/source"
  log "linked kernel headers for $KREL to $hdr"
fi

if [ "$(id -u)" -eq 0 ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf && log "mounted bpffs on /sys/fs/bpf"
fi

if [ ! -x "$VENV/bin/pip" ]; then  # also repairs a venv made without ensurepip
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ambit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing ambit and its dependencies into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi

# Debian's python3-bpfcc is pure Python over libbcc; expose only the bcc
# package to the venv (not the whole of Debian's dist-packages).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
  # -e is false for a dangling link too: -f replaces it (-n: the link itself, not its target)
  if [ -L "$site/bcc" ]; then log "replacing the dangling link $site/bcc"; fi
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || { log "bcc is not importable from $VENV"; exit 1; }
log "ready"
