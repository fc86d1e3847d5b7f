#!/usr/bin/env bash
# Builds the offline Vagrant box of the two-VM end-to-end: a Debian 12 root
# filesystem (mmdebstrap) with everything an ambit node needs already inside,
# so the emulated VMs only boot and run:
#   - Debian packages: the kernel and its matching headers (BCC compiles the
#     eBPF programs against them), python3 and python3-bpfcc, iproute2, tcpdump,
#     openssh-server, sudo, rsync (for Vagrant's synced folder);
#   - /opt/ambit/venv: ambit's Python dependencies, installed from a wheelhouse
#     made on this machine (pip wheel), plus a link to Debian's bcc module;
#   - a vagrant user whose key is generated here (not Vagrant's public insecure key).
# The project's own source is not in the box: Vagrant syncs it at `vagrant up`.
#
# The box boots its kernel directly (libvirt kernel/initrd/cmdline): no
# partition table, no boot loader; the disk is one ext4 filesystem.
#
# Usage: vagrant/box.sh            build if needed; print the .box path
#        vagrant/box.sh --key      print the cache key only
# The box is cached under $AMBIT_CACHE (default /var/cache/ambit)/vagrant/<key>/,
# the key a hash of this script and ambit's dependency list; the downloaded
# .debs and wheels are cached beside it, so a rebuild downloads nothing new.
# Needs root, mmdebstrap, e2fsprogs, qemu-utils and Debian's archive.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
CACHE=${AMBIT_CACHE:-/var/cache/ambit}
SUITE=bookworm
MIRROR=${AMBIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${AMBIT_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
DISK_GIB=4
PACKAGES=(
  linux-image-amd64 linux-headers-amd64 initramfs-tools
  systemd-sysv udev kmod procps iproute2 netbase
  openssh-server sudo rsync
  python3 python3-venv python3-bpfcc tcpdump
)
PY=${PYTHON:-$repo/.venv/bin/python}
[ -x "$PY" ] || PY=python3

log() { printf 'box: %s\n' "$*" >&2; }

deps() {  # ambit's runtime dependencies, one per line, from pyproject.toml
  "$PY" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    print(d)
EOF
}

kernel_version() {  # the newest -amd64 kernel installed under root $1
  find "$1/lib/modules" -mindepth 1 -maxdepth 1 -name '*-amd64' -printf '%f\n' | sort -V | tail -n 1
}

cache_key() {
  { cat "$0"; deps; } | sha256sum | cut -c1-16
}

customize() {  # run by mmdebstrap as a customize hook; $1 is the new root
  local root=$1
  install -d -m 0755 "$root/etc/systemd/network"
  cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0
[Network]
DHCP=ipv4
[DHCPv4]
UseDNS=no
EOF
  echo ambit-node >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tambit-node\n' >"$root/etc/hosts"
  printf '/dev/vda\t/\text4\trw,noatime,errors=remount-ro\t0\t0\n' >"$root/etc/fstab"
  chroot "$root" systemctl enable -q systemd-networkd
  # Nothing on a schedule and nothing waited for: these VMs live for minutes.
  chroot "$root" systemctl mask -q systemd-networkd-wait-online.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer logrotate.timer \
    man-db.timer dpkg-db-backup.timer systemd-tmpfiles-clean.timer systemd-logind.service 2>/dev/null || true
  # Vagrant's user: key-only ssh, passwordless sudo.
  chroot "$root" useradd -m -s /bin/bash vagrant
  install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
  install -m 0600 -o 1000 -g 1000 "$BOX_PUBKEY" "$root/home/vagrant/.ssh/authorized_keys"
  echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"
  printf 'UseDNS no\nPasswordAuthentication no\n' >"$root/etc/ssh/sshd_config.d/ambit.conf"
  # ambit's dependencies, from the wheelhouse only.
  chroot "$root" python3 -m venv /opt/ambit/venv
  mkdir -p "$root/tmp/wheels"
  cp "$BOX_WHEELS"/*.whl "$root/tmp/wheels/"
  deps >"$root/tmp/requirements.txt"
  chroot "$root" /opt/ambit/venv/bin/pip install -q --disable-pip-version-check --no-index \
    --find-links /tmp/wheels -r /tmp/requirements.txt
  rm -rf "$root/tmp/wheels" "$root/tmp/requirements.txt"
  local site
  site=$(chroot "$root" /opt/ambit/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ln -sfn /usr/lib/python3/dist-packages/bcc "$root$site/bcc"
  chroot "$root" /opt/ambit/venv/bin/python -c 'import bcc, grpc, cryptography, h2, yaml'
  # `ambit` runs the synced source (/opt/ambit/src) with the box's interpreter.
  cat >"$root/usr/local/bin/ambit" <<'EOF'
#!/bin/sh
export PYTHONPATH=/opt/ambit/src${PYTHONPATH:+:$PYTHONPATH}
exec /opt/ambit/venv/bin/python -c 'import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))' "$@"
EOF
  chmod 0755 "$root/usr/local/bin/ambit"
  # The kernel headers BCC compiles against must be the running kernel's.
  local kver
  kver=$(kernel_version "$root")
  [ -e "$root/lib/modules/$kver/build/include" ] || { log "no headers for $kver in the box"; exit 1; }
  rm -f "$root"/var/cache/apt/archives/*.deb
  rm -rf "$root"/var/lib/apt/lists/*
}

build() {
  local key out work
  key=$(cache_key)
  out="$CACHE/vagrant/$key"
  if [ -f "$out/ambit-node.box" ]; then
    echo "$out/ambit-node.box"
    return
  fi
  for tool in mmdebstrap mkfs.ext4 qemu-img ssh-keygen; do
    command -v "$tool" >/dev/null || { log "$tool is missing (make vagrant-test installs it)"; exit 1; }
  done
  local t0=$SECONDS
  mkdir -p "$CACHE/debs" "$CACHE/wheels" "$CACHE/vagrant"
  work=$(mktemp -d "$CACHE/vagrant/.build.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "rm -rf '$work'" EXIT
  log "wheels for ambit's dependencies -> $CACHE/wheels"
  deps >"$work/requirements.txt"
  "$PY" -m pip wheel -q --disable-pip-version-check -w "$CACHE/wheels" -r "$work/requirements.txt" \
    >"$work/pip.log" 2>&1 || { tail -n 30 "$work/pip.log" >&2; log "pip wheel failed"; exit 1; }
  ssh-keygen -q -t ed25519 -N '' -C ambit-vagrant -f "$work/vagrant_key"
  export BOX_WHEELS="$CACHE/wheels" BOX_PUBKEY="$work/vagrant_key.pub" PYTHON="$PY"
  log "Debian $SUITE root filesystem (mmdebstrap) -> $work/root"
  local self
  self=$(readlink -f "$0")
  mkdir -p "$work/root/etc/initramfs-tools/conf.d" "$work/root/usr/share/initramfs-tools/modules.d"
  # A small initrd: only what mounts a virtio disk (gzip: no extra package to decompress).
  printf 'MODULES=list\nCOMPRESS=gzip\n' >"$work/root/etc/initramfs-tools/conf.d/ambit"
  printf 'virtio_pci\nvirtio_blk\next4\n' >"$work/root/usr/share/initramfs-tools/modules.d/ambit"
  mmdebstrap --mode=root --variant=minbase --skip=download/empty,check/empty \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --setup-hook="mkdir -p \"\$1/var/cache/apt/archives\"" \
    --setup-hook="sync-in '$CACHE/debs' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$CACHE/debs'" \
    --customize-hook="'$self' customize \"\$1\"" \
    "$SUITE" "$work/root" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main" \
    >"$work/mmdebstrap.log" 2>&1 || { tail -n 30 "$work/mmdebstrap.log" >&2; log "mmdebstrap failed"; exit 1; }
  rm -f "$CACHE"/debs/lock "$CACHE"/debs/partial 2>/dev/null || true
  local kver
  kver=$(kernel_version "$work/root")
  cp "$work/root/boot/vmlinuz-$kver" "$work/vmlinuz"
  cp "$work/root/boot/initrd.img-$kver" "$work/initrd.img"
  log "ext4 image (${DISK_GIB} GiB, sparse) -> qcow2"
  mkfs.ext4 -q -F -L ambit-root -d "$work/root" "$work/root.raw" "${DISK_GIB}G" >/dev/null
  rm -rf "$work/root"
  # Compressed: the box is copied twice per run (vagrant box add, then into libvirt's pool);
  # qemu decompresses on the host, natively, even when the guest is emulated.
  qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$work/root.raw" "$work/box.img"
  rm -f "$work/root.raw"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GIB" >"$work/metadata.json"
  cat >"$work/Vagrantfile" <<EOF
# The box's own settings: direct kernel boot, and the key made for this box.
Vagrant.configure("2") do |config|
  config.ssh.username = "vagrant"
  config.ssh.private_key_path = File.join(File.dirname(__FILE__), "vagrant_key")
  config.ssh.insert_key = false
  config.vm.guest = :debian
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(File.dirname(__FILE__), "vmlinuz")
    lv.initrd = File.join(File.dirname(__FILE__), "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 mitigations=off quiet"
  end
end
EOF
  echo "$kver" >"$work/kernel-version"
  tar -cf "$work/ambit-node.box" -C "$work" metadata.json Vagrantfile box.img vmlinuz initrd.img vagrant_key
  mkdir -p "$out"
  mv "$work/ambit-node.box" "$work/vmlinuz" "$work/initrd.img" "$work/kernel-version" "$out/"
  rm -rf "$work"
  trap - EXIT
  # Older boxes of other keys are of no use any more.
  find "$CACHE/vagrant" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name '.build.*' -exec rm -rf {} +
  find "$CACHE/vagrant" -mindepth 1 -maxdepth 1 -type d -name '.build.*' -mmin +120 -exec rm -rf {} +  # killed builds
  log "built $out/ambit-node.box (kernel $kver) in $((SECONDS - t0))s"
  echo "$out/ambit-node.box"
}

case "${1:-build}" in
  build) build ;;
  --key) cache_key ;;
  customize) customize "$2" ;;
  *) echo "usage: $0 [build|--key]" >&2; exit 2 ;;
esac
