# Shared by vagrant/e2e.sh (offline) and vagrant/k3s.sh: logging and the assertions
# both paths make. Sourced, not run; needs T0 (the start, in $SECONDS) and PY (a python3).
# shellcheck shell=bash

log() { printf 'e2e [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

# The capture between the two VMs: HBONE data seen, the marker never, the plaintext canary yes
# (so a capture that saw nothing cannot pass).
wire_checks() {
  local pcap=$1 marker=$2 canary=$3 hbone
  hbone=$(tcpdump -nn -r "$pcap" 'tcp port 15008 and tcp[tcpflags] & tcp-push != 0' 2>/dev/null | wc -l)
  [ "$hbone" -gt 0 ] || fail "no HBONE (15008) data between the VMs in the capture"
  grep -a -q -F "$canary" "$pcap" || fail "the plaintext canary is not in the capture: the capture sees nothing"
  if grep -a -q -F "$marker" "$pcap"; then fail "plaintext marker $marker seen on the wire between the VMs"; fi
  log "wire: $hbone HBONE data packets between the VMs, no plaintext marker; the plaintext canary was seen"
}

# `ambit flows -o json` of the backend's node ($1) and the clients' node ($2): frontend -> backend
# allowed with mTLS and both identities, catalog -> backend denied by policy.
flows_checks() {
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
a, b = (json.load(open(p))["items"] for p in sys.argv[1:3])
sa = "spiffe://cluster.local/ns/shop/sa/"
def find(items, src, allowed):
    return [f for f in items if f.get("source_pod") == src and f.get("destination_pod") == "shop/backend"
            and (f.get("verdict") in ("deny", "denied")) != allowed]
ok = find(a, "shop/frontend", True)
assert ok, f"backend's node: no allowed shop/frontend -> shop/backend flow: {a}"
f = ok[-1]
assert f.get("security") == "mutual_tls", f
assert f.get("source_identity") == sa + "frontend" and f.get("destination_identity") == sa + "backend", f
denied = find(a, "shop/catalog", False)
assert denied, f"backend's node: no denied shop/catalog -> shop/backend flow: {a}"
out = [x for x in b if x.get("source_pod") == "shop/frontend"]
assert out, f"clients' node: no flow of shop/frontend: {b}"
print(f"flows: backend's node {len(a)} (frontend allowed by {f.get('policy')}, mutual_tls; catalog denied: "
      f"{denied[-1].get('policy')}), clients' node {len(b)}")
EOF
}
