#!/usr/bin/env bash
# One ambit node inside a VM of the offline end-to-end (run as root on the VM).
#
#   node.sh up NODE                  start the node: its pod bridge and routes, the CA (on the
#                                    node that hosts it), the ztunnel, the agent, its pods; wait
#                                    until the agent reports every enrolled pod redirected and
#                                    the ztunnel is ready
#   node.sh exec NS POD -- CMD...    run CMD inside a pod (its network namespace and cgroup)
#   node.sh logs                     the node's logs
#
# The agent and the ztunnel run in the VM's own network namespace, as a DaemonSet
# pod with hostNetwork would, under systemd (transient units ambit-ca, ambit-ztunnel,
# ambit-agent). Pods are made here the way the local cluster makes them (network
# namespace ambit-<cid>-pod-<ns>.<pod>, veth vp<hash> on the bridge cbr0, cgroup
# <cgroup2>/ambit-<cid>/<node>/<ns>.<pod>), so the agent's `--runtime local:` finds
# them. The state (cluster.json, cluster/, credentials, pods) was provisioned to
# /var/lib/ambit/vm by e2e.sh; the CA's files to /var/lib/ambit/ca.
set -euo pipefail

STATE=/var/lib/ambit/vm
LOGS=/var/log/ambit
AMBIT=/usr/local/bin/ambit

die() { echo "node.sh: $*" >&2; exit 1; }

layout() {  # shell assignments from cluster.json for node $1
  python3 - "$STATE/cluster.json" "$1" <<'EOF'
import json, shlex, sys
lay = json.load(open(sys.argv[1]))
me = [n for n in lay["nodes"] if n["name"] == sys.argv[2]]
if not me:
    sys.exit(f"no node {sys.argv[2]!r} in {sys.argv[1]}")
me = me[0]
out = {"CID": lay["cid"], "CGROOT": lay["cgroup_root"], "CA_ADDR": lay["control_address"],
       "IP": me["address"], "GW": me["gateway"], "BPF_DIR": me["bpf_dir"],
       "PEERS": " ".join(f"{n['pod_cidr']}={n['address']}" for n in lay["nodes"] if n["name"] != me["name"])}
for k, v in out.items():
    print(f"{k}={shlex.quote(str(v))}")
EOF
}

veth_name() { printf 'vp%s' "$(printf '%s' "$1/$2" | sha256sum | cut -c1-8)"; }

unit() {  # unit NAME ARGV...: a transient systemd service logging to $LOGS/NAME.log
  local name=$1; shift
  systemctl reset-failed "ambit-$name" 2>/dev/null || true
  # Restarted when it exits, as the DaemonSet's containers would be.
  systemd-run -q --unit "ambit-$name" --setenv=PYTHONUNBUFFERED=1 -p Restart=on-failure -p RestartSec=2 \
    -p "StandardOutput=append:$LOGS/$name.log" -p "StandardError=append:$LOGS/$name.log" "$@"
}

pod_up() {  # pod_up NS NAME IP COMMAND (a shell-quoted command line)
  local ns=$1 name=$2 ip=$3 cmd=$4
  local netns="ambit-$CID-pod-$ns.$name" veth cg="$CGROOT/ambit-$CID/$NODE/$ns.$name"
  veth=$(veth_name "$ns" "$name")
  ip netns add "$netns"
  ip link add "$veth" type veth peer name eth0 netns "$netns"
  ip link set "$veth" master cbr0 up
  ip -n "$netns" link set lo up
  ip -n "$netns" link set eth0 up
  ip -n "$netns" addr add "$ip/24" dev eth0
  ip -n "$netns" route add default via "$GW"
  mkdir -p "$cg" "/etc/netns/$netns" "$LOGS/pods"
  printf '127.0.0.1\tlocalhost\n%s\t%s\n' "$ip" "$name" >"/etc/netns/$netns/hosts"
  # The pod's process enters its cgroup first, then its network namespace.
  # shellcheck disable=SC2016  # expanded by the pod's own shell
  setsid sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec ip netns exec "$@"' sh "$cg" "$netns" \
    sh -c "exec $cmd" </dev/null >>"$LOGS/pods/$ns.$name.log" 2>&1 &
}

wait_ready() {  # the agent's /status healthy (every enrolled pod redirected) and the ztunnel ready
  python3 - "$IP" "$1" <<'EOF'
import json, sys, time, urllib.request
ip, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
last = ""
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://{ip}:15021/healthz/ready", timeout=5) as r:
            ready = r.status == 200
        with urllib.request.urlopen("http://127.0.0.1:15010/status", timeout=5) as r:
            st = json.load(r)
        pods = st.get("pods", [])
        if ready and st.get("healthy") and pods and all(p.get("redirected") for p in pods):
            print(f"ready: {len(pods)} enrolled pod(s) redirected, ztunnel ready")
            sys.exit(0)
        last = json.dumps(st)[:600]
    except OSError as e:
        last = str(e)
    time.sleep(2)
sys.exit(f"not ready in time; last: {last}")
EOF
}

cmd_up() {
  NODE=$1
  eval "$(layout "$NODE")"
  mkdir -p "$LOGS" "$STATE/nodes/$NODE"
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  sysctl -qw net.ipv4.ip_forward=1
  ip link add cbr0 type bridge
  ip addr add "$GW/24" dev cbr0
  ip link set cbr0 up
  local peer
  for peer in $PEERS; do ip route replace "${peer%%=*}" via "${peer#*=}"; done
  mkdir -p "$CGROOT/ambit-$CID/$NODE"
  local t0=$SECONDS
  if [ "$CA_ADDR" = "$IP" ]; then
    unit ca "$AMBIT" ca run --dir /var/lib/ambit/ca --cluster "local:$STATE/cluster" --listen "$IP:15012"
  fi
  local feed="$STATE/nodes/$NODE/feed.sock"
  # SO_ORIGINAL_DST is answered for the ztunnel from the cgroup v2 root (an ancestor of its
  # cgroup), as daemonset/daemonset.yaml does: it holds across restarts of the ztunnel's unit.
  unit agent "$AMBIT" agent run --node "$NODE" --cluster "local:$STATE/cluster" --runtime "local:$STATE" \
    --bpf-dir "$BPF_DIR" --state-feed "$feed" --state-dir "$STATE/nodes/$NODE" --ztunnel-cgroup "$CGROOT"
  local ns name ip cmd
  while IFS=$'\t' read -r ns name ip cmd; do
    [ -n "$ns" ] && pod_up "$ns" "$name" "$ip" "$cmd"
  done <"$STATE/pods"
  # The ztunnel follows the agent's feed, which is served once the agent has compiled and loaded
  # its eBPF programs: start it then, rather than let it exit and restart meanwhile (on one
  # emulated vCPU, each start of a Python process costs seconds the agent needs).
  local i
  for ((i = 0; i < 600; i++)); do
    [ -S "$feed" ] && break
    systemctl -q is-failed ambit-agent && { cmd_logs >&2; die "the agent failed"; }
    sleep 1
  done
  echo "agent serving its feed after $((SECONDS - t0))s"
  unit ztunnel "$AMBIT" ztunnel run --node "$NODE" --state-feed "$feed" --ca "$CA_ADDR:15012" \
    --credential-dir "$STATE/nodes/$NODE/credential" --outbound "$GW:15001" --inbound-plaintext "$GW:15006" \
    --access-log "$LOGS/access.log"
  if ! wait_ready 300; then
    cmd_logs >&2
    die "node $NODE did not become ready"
  fi
  echo "node $NODE ready in $((SECONDS - t0))s"
}

cmd_exec() {
  local ns=$1 name=$2 cg netns
  shift 2
  [ "${1:-}" = "--" ] && shift
  [ $# -gt 0 ] || die "exec: no command"
  # <cgroup2>/ambit-<cid>/<node>/<ns>.<pod>; its network namespace is ambit-<cid>-pod-<ns>.<pod>
  cg=$(find /sys/fs/cgroup -mindepth 3 -maxdepth 3 -path "/sys/fs/cgroup/ambit-*/*/$ns.$name" -print -quit)
  [ -n "$cg" ] || die "no pod $ns/$name on this node"
  netns="$(basename "$(dirname "$(dirname "$cg")")")-pod-$ns.$name"
  # shellcheck disable=SC2016  # expanded by the child shell
  exec sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec ip netns exec "$@"' sh "$cg" "$netns" "$@"
}

cmd_logs() {
  local f
  for f in "$LOGS"/*.log "$LOGS"/pods/*.log; do
    [ -f "$f" ] || continue
    echo "==> $f <=="
    tail -n 40 "$f"
  done
}

case "${1:-}" in
  up) [ $# -eq 2 ] || die "usage: node.sh up NODE"; cmd_up "$2" ;;
  exec) [ $# -ge 4 ] || die "usage: node.sh exec NS POD -- CMD..."; shift; cmd_exec "$@" ;;
  logs) cmd_logs ;;
  *) die "usage: node.sh up NODE | exec NS POD -- CMD... | logs" ;;
esac
