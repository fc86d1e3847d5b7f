#!/usr/bin/env bash
# Two-VM end-to-end of ambit on real kernels (run as root from anywhere).
#
#   vagrant/e2e.sh offline   here, without internet: the box from vagrant/box.sh (Debian
#                            packages; cached under /var/cache/ambit), two VMs under
#                            Debian's vagrant + vagrant-libvirt + libvirt + qemu
#   vagrant/e2e.sh k3s       for users with internet: see vagrant/k3s.sh
#   vagrant/e2e.sh deps      only install the packages these need (apt)
#
# Offline, each VM is one ambit node (vagrant/node.sh): agent and ztunnel in the VM's own
# network namespace, pods as network namespaces and cgroups inside it; the cluster state
# (vagrant/cluster.py) is provisioned to both, the CA runs on node-a. Checked:
#   - frontend (node-b) reaches backend (node-a) through the Service; catalog (node-b) is
#     denied by the backend's AuthorizationPolicy; plaintext from outside the mesh into the
#     STRICT backend is dropped;
#   - on the host's bridge between the VMs (tcpdump): HBONE on 15008 and no plaintext
#     marker, while a plaintext canary sent between the same VMs is seen (the capture works);
#   - `ambit flows` and `ambit status` on each VM;
#   - `vagrant destroy` and the cleanup leave no VM, network, pool, box or process behind
#     (the cached box under /var/cache/ambit stays).
# Where KVM cannot boot the guest kernel (a probe decides), the VMs run under plain
# emulation (TCG). Exit status: 0 passed, 1 failed, 77 qemu cannot start a guest at all.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
MODE=${1:-offline}
PY=$repo/.venv/bin/python
APT_PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
              mmdebstrap e2fsprogs dnsmasq-base iptables rsync tcpdump openssh-client shellcheck tini)
T0=$SECONDS
declare -A TIMES=()
STARTED_DAEMONS=()
RUN=""
TCPDUMP_PID=""
PREFIX="" NETWORK="" POOL=""

# shellcheck disable=SC1091  # sourced from this directory: log, fail, wire_checks, flows_checks
. "$here/checks.sh"
timed() { local what=$1 t=$SECONDS; shift; "$@"; TIMES[$what]=$((SECONDS - t)); }

install_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# CI starts no services: run libvirt's daemons ourselves when none answers, and stop them at the
# end. Each runs under `tini -s`, a subreaper: qemu processes that libvirtd daemonizes (its capability
# probes, the VMs) are reaped when they exit. Where PID 1 does not reap orphans promptly (these
# machines' init), libvirtd otherwise waits on the zombies of its probes for minutes.
ensure_libvirtd() {
  virsh -c qemu:///system version >/dev/null 2>&1 && return
  local d
  for d in virtlogd libvirtd; do
    if ! pgrep -x "$d" >/dev/null; then
      setsid tini -s -- "$d" </dev/null >>"$RUN/$d.log" 2>&1 &
      STARTED_DAEMONS+=("$!")
    fi
  done
  for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && { log "started virtlogd and libvirtd (${#STARTED_DAEMONS[@]} new)"; return; }
    sleep 0.2
  done
  fail "libvirtd does not answer on qemu:///system (see $RUN/libvirtd.log)"
}

stop_daemons() {  # newest first: libvirtd, then virtlogd
  local pid i
  for ((i = ${#STARTED_DAEMONS[@]} - 1; i >= 0; i--)); do
    pid=${STARTED_DAEMONS[$i]}
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

# Does KVM boot the guest kernel (to its first userspace process), and does plain emulation?
# Writes kvm or qemu to $RUN/accel; exits 77 when neither boots it. Cached per host and guest kernel.
probe_accel() {
  local boxdir=$1 cache answer accel
  cache="$boxdir/accel-$(uname -r)"
  if [ -s "$cache" ]; then cp "$cache" "$RUN/accel"; return; fi
  declare -A ok=()
  for accel in kvm tcg; do
    [ "$accel" = kvm ] && [ ! -w /dev/kvm ] && continue
    (
      out="$RUN/probe-$accel.log"
      : >"$out"
      timeout 40 qemu-system-x86_64 -machine "accel=$accel" -cpu qemu64 -m 256 -smp 1 -display none \
        -monitor none -serial "file:$out" -no-reboot -kernel "$boxdir/vmlinuz" -initrd "$boxdir/initrd.img" \
        -append "console=ttyS0 panic=-1 rdinit=/bin/true" >/dev/null 2>&1 &
      qpid=$!
      # KVM, where it works, reaches userspace in a second or two; emulation in about five
      tries=$([ "$accel" = kvm ] && echo 16 || echo 60)
      for _ in $(seq 1 "$tries"); do
        grep -q 'Run /bin/true' "$out" && break
        kill -0 "$qpid" 2>/dev/null || break  # it reboots (exits) once /bin/true has run
        sleep 0.5
      done
      kill "$qpid" 2>/dev/null || true
      wait "$qpid" 2>/dev/null || true
      grep -q 'Run /bin/true' "$out"
    ) &
    ok[$accel]=$!
  done
  answer=""
  if [ -n "${ok[kvm]:-}" ] && wait "${ok[kvm]}"; then answer=kvm; fi
  if wait "${ok[tcg]}" && [ -z "$answer" ]; then answer=qemu; fi
  [ -n "$answer" ] || { log "qemu cannot start a guest (see $RUN/probe-*.log)"; exit 77; }
  echo "$answer" >"$cache"
  echo "$answer" >"$RUN/accel"
}

free_cidr() {  # a /24 no route and no libvirt network of this machine uses
  local x used
  used=$(ip -4 route show; for n in $(virsh -q net-list --all --name 2>/dev/null); do virsh net-dumpxml "$n"; done)
  for x in $(seq 150 199); do
    grep -q "192\.168\.$x\." <<<"$used" || { echo "192.168.$x.0/24"; return; }
  done
  fail "no free 192.168.x.0/24 for the VMs' network"
}

vagrant_() { (cd "$here" && vagrant "$@"); }
stamp() {  # (progress bars, redrawn with carriage returns, left out)
  local line
  sed -u 's/\r/\n/g' | while IFS= read -r line; do
    case $line in *Progress:*) continue ;; esac
    printf '%4d %s\n' "$((SECONDS - T0))" "$line"
  done
}
on() { local node=$1; shift; ssh -F "$RUN/ssh_config" -o LogLevel=ERROR "$node" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ -n "$TCPDUMP_PID" ]; then kill "$TCPDUMP_PID" 2>/dev/null; wait "$TCPDUMP_PID" 2>/dev/null; fi
  if [ -n "$RUN" ]; then
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ -f "$RUN/ssh_config" ]; then
      for n in node-a node-b; do log "logs of $n:"; on "$n" sudo /opt/ambit/src/vagrant/node.sh logs 2>&1 | tail -n 120; done
    fi
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
      for f in "$RUN"/serial/*.log; do [ -f "$f" ] && { log "serial console $f:"; tail -n 20 "$f"; }; done
    fi
    local t=$SECONDS
    # Power the VMs off first: nothing in them needs a clean shutdown, and destroy would wait for one.
    for d in $(virsh -q list --name 2>/dev/null | grep "^$PREFIX" || true); do virsh -q destroy "$d" >/dev/null 2>&1; done
    if [ -d "$RUN/dot" ]; then vagrant_ destroy -f >"$RUN/destroy.log" 2>&1 || { log "vagrant destroy failed:"; tail -n 20 "$RUN/destroy.log"; }; fi
    TIMES[destroy]=$((SECONDS - t))
    # What destroy may leave: the domains (if it failed), the box's volume, the pool, the network.
    local d v
    for d in $(virsh -q list --all --name 2>/dev/null | grep "^$PREFIX" || true); do
      virsh -q destroy "$d" >/dev/null 2>&1; virsh -q undefine "$d" --remove-all-storage >/dev/null 2>&1
    done
    if virsh -q pool-info "$POOL" >/dev/null 2>&1; then
      for v in $(virsh -q vol-list "$POOL" 2>/dev/null | awk '{print $1}'); do virsh -q vol-delete "$v" --pool "$POOL" >/dev/null 2>&1; done
      virsh -q pool-destroy "$POOL" >/dev/null 2>&1; virsh -q pool-undefine "$POOL" >/dev/null 2>&1
    fi
    if virsh -q net-info "$NETWORK" >/dev/null 2>&1; then
      virsh -q net-destroy "$NETWORK" >/dev/null 2>&1; virsh -q net-undefine "$NETWORK" >/dev/null 2>&1
    fi
    rm -f /var/log/libvirt/qemu/"$PREFIX"*.log
    local left=""
    virsh -q list --all --name 2>/dev/null | grep -q "^$PREFIX" && left+=" domains"
    virsh -q net-info "$NETWORK" >/dev/null 2>&1 && left+=" network"
    virsh -q pool-info "$POOL" >/dev/null 2>&1 && left+=" pool"
    pgrep -f "guest=$PREFIX" >/dev/null && left+=" qemu"
    stop_daemons
    rm -rf "$RUN"
    if [ -n "$left" ]; then
      log "cleanup left:$left"
      [ "$rc" -eq 0 ] && rc=1
    else
      log "clean: no VM, network, pool, box or process of this run is left (cached box kept)"
    fi
  else
    stop_daemons
  fi
  local k summary=""
  for k in box probe up provision checks destroy; do [ -n "${TIMES[$k]:-}" ] && summary+=" $k ${TIMES[$k]}s,"; done
  log "times:${summary%,}; total $((SECONDS - T0))s"
  if [ "$rc" -eq 0 ]; then log "PASSED"; elif [ "$rc" -ne 77 ]; then log "FAILED (exit $rc)"; fi
  exit "$rc"
}

offline() {
  [ "$(id -u)" -eq 0 ] || { echo "e2e.sh: run as root" >&2; exit 1; }
  [ -x "$PY" ] || { echo "e2e.sh: no $PY; run make setup" >&2; exit 1; }
  install_packages
  RUN=$(mktemp -d /var/tmp/ambit-vagrant.XXXXXX)
  chmod 0755 "$RUN"
  local id=${RUN##*.}
  id=$(tr '[:upper:]' '[:lower:]' <<<"$id")
  PREFIX="ambit-e2e-$id-" NETWORK="ambit-e2e-$id" POOL="ambit-e2e-$id"
  trap cleanup EXIT
  trap 'exit 143' TERM INT
  ensure_libvirtd
  # libvirt probes qemu again on its first use after a start (here it always finds its cache
  # stale): have it do so now, while the box is built or found, not while vagrant waits.
  (virsh -q domcapabilities --virttype qemu --arch x86_64 >/dev/null 2>&1 &)

  local box t
  t=$SECONDS
  box=$("$here/box.sh")
  TIMES[box]=$((SECONDS - t))
  log "box $box (${TIMES[box]}s)"
  local boxdir driver
  boxdir=$(dirname "$box")
  timed probe probe_accel "$boxdir"
  driver=$(cat "$RUN/accel")
  log "libvirt domain type: $driver ($([ "$driver" = kvm ] && echo KVM boots the guest kernel || echo 'KVM does not boot the guest kernel here: plain emulation, TCG'))"

  mkdir -p "$RUN/pool" "$RUN/serial" "$RUN/home"
  chmod 0755 "$RUN/pool" "$RUN/serial" "$RUN/home"
  virsh -q pool-define-as "$POOL" dir --target "$RUN/pool" >/dev/null
  virsh -q pool-start "$POOL" >/dev/null
  export VAGRANT_HOME="$RUN/home" VAGRANT_DOTFILE_PATH="$RUN/dot" VAGRANT_CHECKPOINT_DISABLE=1
  export VAGRANT_DEFAULT_PROVIDER=libvirt AMBIT_VAGRANT_MODE=offline AMBIT_BOX="ambit/node-$id"
  export AMBIT_LIBVIRT_DRIVER=$driver AMBIT_NETWORK=$NETWORK AMBIT_POOL=$POOL AMBIT_SERIAL_DIR="$RUN/serial"
  export AMBIT_DOMAIN_PREFIX=$PREFIX
  AMBIT_NETWORK_CIDR=$(free_cidr)
  export AMBIT_NETWORK_CIDR
  t=$SECONDS
  vagrant_ box add -f --name "$AMBIT_BOX" "$box" >"$RUN/box-add.log" 2>&1 || { cat "$RUN/box-add.log"; fail "vagrant box add"; }
  log "vagrant up (2 VMs, 1 vCPU, ${AMBIT_MEMORY:-1536} MiB each, network $AMBIT_NETWORK_CIDR isolated)"
  # each line of vagrant's output with the seconds since the start, to see where the time goes
  if ! vagrant_ up --provider libvirt 2>&1 | stamp >"$RUN/up.log"; then
    tail -n 40 "$RUN/up.log"; fail "vagrant up"
  fi
  TIMES[up]=$((SECONDS - t))
  log "both VMs up and synced in ${TIMES[up]}s"
  vagrant_ ssh-config >"$RUN/ssh_config"
  local ipa ipb
  ipa=$(awk '/^Host node-a/{f=1} f&&/HostName/{print $2; exit}' "$RUN/ssh_config")
  ipb=$(awk '/^Host node-b/{f=1} f&&/HostName/{print $2; exit}' "$RUN/ssh_config")
  if [ -z "$ipa" ] || [ -z "$ipb" ]; then fail "no addresses for the VMs in vagrant ssh-config"; fi
  log "node-a $ipa, node-b $ipb"

  # Capture everything between the two VMs from before the nodes start (CA traffic included).
  local bridge
  bridge=$(virsh net-info "$NETWORK" | awk '/^Bridge:/{print $2}')
  tcpdump -i "$bridge" -U -s 0 -w "$RUN/wire.pcap" "host $ipa and host $ipb" 2>"$RUN/tcpdump.log" &
  TCPDUMP_PID=$!

  t=$SECONDS
  "$PY" "$here/cluster.py" --out "$RUN/cluster" --node "node-a=$ipa" --node "node-b=$ipb"
  local n other pids=()
  for n in node-a node-b; do
    other=$([ "$n" = node-a ] && echo node-b || echo node-a)
    mkdir -p "$RUN/push/$n/vm"
    cp -a "$RUN/cluster/state/." "$RUN/push/$n/vm/"
    rm -rf "$RUN/push/$n/vm/nodes/$other"  # a node gets only its own credential
    cp "$RUN/cluster/pods/$n" "$RUN/push/$n/vm/pods"
    [ "$n" = node-a ] && cp -a "$RUN/cluster/ca" "$RUN/push/$n/ca"
    tar -C "$RUN/push/$n" -cf - . | on "$n" "sudo mkdir -p /var/lib/ambit && sudo tar -C /var/lib/ambit -xf - \
      && sudo /opt/ambit/src/vagrant/node.sh up $n" >"$RUN/up-$n.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1; do
    n=$([ "$i" = 0 ] && echo node-a || echo node-b)
    wait "${pids[$i]}" || { cat "$RUN/up-$n.log"; fail "$n did not come up"; }
    log "$(tail -n 1 "$RUN/up-$n.log")"
  done
  TIMES[provision]=$((SECONDS - t))

  t=$SECONDS
  local marker canary echo=/opt/ambit/src/vagrant/echo.py node=/opt/ambit/src/vagrant/node.sh out
  marker="AMBIT-PLAINTEXT-MARKER-$id-$RANDOM"
  canary="AMBIT-CANARY-$id-$RANDOM"
  out=$(on node-b sudo "$node" exec shop frontend -- python3 "$echo" call 10.96.0.10 8080 "$marker" 20) \
    || fail "allowed: shop/frontend (node-b) -> backend.shop (node-a): $out"
  [ "$out" = "echo: $marker" ] || fail "allowed: unexpected answer $out"
  log "allowed: shop/frontend (node-b) -> backend Service (node-a): $out"
  local rc=0
  out=$(on node-b sudo "$node" exec shop catalog -- python3 "$echo" call 10.96.0.10 8080 "$marker" 20) || rc=$?
  [ "$rc" -eq 3 ] || fail "denied: shop/catalog -> backend should be closed without an answer (exit 3), got $rc: $out"
  log "denied: shop/catalog (node-b) -> backend (node-a): $out"
  rc=0
  out=$(on node-b python3 "$echo" call 10.244.0.2 8080 "plain-$marker" 4) || rc=$?
  [ "$rc" -eq 4 ] || fail "plaintext from node-b's host into the STRICT backend should be dropped, got $rc: $out"
  log "dropped: plaintext from node-b (not in the mesh) to the STRICT backend pod: $out"
  on node-a "sudo sh -c 'timeout 60 python3 $echo serve 9999 >/dev/null 2>&1 &'"
  sleep 1
  out=$(on node-b python3 "$echo" call "$ipa" 9999 "$canary" 20) || fail "canary between the VMs: $out"

  # The CLI on both VMs at once: each VM's flows (JSON for the checks, and the table) and status.
  local fa="$RUN/flows-node-a.json" fb="$RUN/flows-node-b.json" pids=() sa sb
  on node-a sudo ambit flows -o json >"$fa" 2>&1 &
  pids+=($!)
  on node-b sudo ambit flows -o json >"$fb" 2>&1 &
  pids+=($!)
  on node-a sudo ambit flows >"$RUN/flows-node-a.txt" 2>&1 &
  pids+=($!)
  on node-a sudo ambit status >"$RUN/status-node-a.txt" 2>&1 &
  sa=$!
  on node-b sudo ambit status >"$RUN/status-node-b.txt" 2>&1 &
  sb=$!
  wait "$sa" || { cat "$RUN/status-node-a.txt"; fail "ambit status on node-a"; }
  wait "$sb" || { cat "$RUN/status-node-b.txt"; fail "ambit status on node-b"; }
  wait "${pids[@]}" || true  # judged below
  for _ in $(seq 1 5); do
    flows_checks "$fa" "$fb" >/dev/null 2>&1 && break
    sleep 2
    on node-a sudo ambit flows -o json >"$fa" 2>&1
    on node-b sudo ambit flows -o json >"$fb" 2>&1
  done
  flows_checks "$fa" "$fb" || fail "ambit flows (node-a: $(head -c 2000 "$fa"))"
  log "ambit flows on node-a:"; cat "$RUN/flows-node-a.txt"
  for n in node-a node-b; do
    log "ambit status on $n:"; cat "$RUN/status-$n.txt"
    grep -q "ztunnel: ready" "$RUN/status-$n.txt" || fail "$n's ztunnel is not ready"
  done

  kill "$TCPDUMP_PID" 2>/dev/null; wait "$TCPDUMP_PID" 2>/dev/null || true
  TCPDUMP_PID=""
  wire_checks "$RUN/wire.pcap" "$marker" "$canary"
  TIMES[checks]=$((SECONDS - t))
}

case "$MODE" in
  offline) offline ;;
  deps) install_packages ;;  # what the tests need before they run: vagrant, shellcheck, ...
  k3s) exec "$here/k3s.sh" "${@:2}" ;;
  *) echo "usage: $0 offline|k3s|deps" >&2; exit 2 ;;
esac
