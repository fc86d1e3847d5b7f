#!/usr/bin/env bash
# The two-VM end-to-end on k3s, for users with internet (not run in CI: it downloads a
# public Debian box, k3s and Istio's CRDs). Run from anywhere; needs vagrant with the
# libvirt or virtualbox provider, and podman or docker to build the ambit image.
#
#   vagrant/k3s.sh [--provider libvirt|virtualbox] [--keep]
#
# Two VMs (node-a: k3s server, node-b: agent) on a private network; the ambit image is
# built here and imported into both nodes' containerd; daemonset/ is applied with the
# CA's key from `ambit ca init`; namespace shop is labelled ambient; backend runs on
# node-a, frontend and catalog on node-b. Checked as offline (vagrant/e2e.sh):
# frontend -> backend allowed, catalog -> backend denied by policy, tcpdump on node-a's
# private interface sees HBONE and no plaintext marker (and sees a plaintext canary),
# `ambit flows` and `ambit status` through `kubectl exec`, then `vagrant destroy`.
# Settings: AMBIT_NETWORK_CIDR (default 192.168.56.0/24, VirtualBox's host-only range),
# AMBIT_IMAGE_TAR (an image archive to import instead of building one), ISTIO_VERSION.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
PY=$repo/.venv/bin/python
[ -x "$PY" ] || PY=python3
T0=$SECONDS
PROVIDER=libvirt
KEEP=0
ISTIO_VERSION=${ISTIO_VERSION:-1.24.2}
IMAGE=localhost/ambit:e2e
# shellcheck disable=SC1091  # sourced from this directory
. "$here/checks.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --provider) PROVIDER=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: $0 [--provider libvirt|virtualbox] [--keep]" >&2; exit 2 ;;
  esac
done

export AMBIT_VAGRANT_MODE=k3s AMBIT_NETWORK_CIDR=${AMBIT_NETWORK_CIDR:-192.168.56.0/24}
prefix=$(cut -d. -f1-3 <<<"$AMBIT_NETWORK_CIDR")
IPA=$prefix.10 IPB=$prefix.11
RUN=$(mktemp -d "${TMPDIR:-/tmp}/ambit-k3s.XXXXXX")
export VAGRANT_DOTFILE_PATH=$RUN/dot

vagrant_() { (cd "$here" && vagrant "$@"); }
on() { local node=$1; shift; ssh -F "$RUN/ssh_config" -o LogLevel=ERROR "$node" "$@"; }
kubectl_() { on node-a sudo k3s kubectl "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ "$KEEP" = 1 ]; then
    log "kept the VMs: VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH AMBIT_VAGRANT_MODE=k3s vagrant destroy -f (in $here)"
  else
    vagrant_ destroy -f >/dev/null 2>&1 || log "vagrant destroy failed"
    rm -rf "$RUN"
  fi
  if [ "$rc" -eq 0 ]; then log "PASSED in $((SECONDS - T0))s"; else log "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT

image_archive() {  # the ambit image as an archive containerd can import
  if [ -n "${AMBIT_IMAGE_TAR:-}" ]; then cp "$AMBIT_IMAGE_TAR" "$RUN/ambit.tar"; return; fi
  if command -v podman >/dev/null && [ -f "$repo/scripts/image.sh" ]; then
    (cd "$repo" && make image)  # builds with podman, from Debian packages and wheels built here
    podman tag "$(podman images -q --filter reference='*ambit*' | head -n 1)" "$IMAGE"
    podman save --format docker-archive -o "$RUN/ambit.tar" "$IMAGE"
  elif command -v docker >/dev/null; then
    docker build -f "$repo/daemonset/Dockerfile" -t "$IMAGE" "$repo"
    docker save -o "$RUN/ambit.tar" "$IMAGE"
  else
    fail "no podman or docker to build the ambit image (or set AMBIT_IMAGE_TAR)"
  fi
}

log "building the ambit image"
image_archive
log "vagrant up ($PROVIDER): node-a $IPA, node-b $IPB"
vagrant_ up --provider "$PROVIDER"
vagrant_ ssh-config >"$RUN/ssh_config"

# k3s on the private network (flannel on the interface that holds the node's address)
iface_of() { on "$1" ip -o -4 addr show | awk -v ip="$2" 'index($4, ip "/") == 1 {print $2}'; }
ifa=$(iface_of node-a "$IPA") ifb=$(iface_of node-b "$IPB")
for n in node-a node-b; do
  on "$n" "sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    curl tcpdump linux-headers-\$(uname -r) >/dev/null"
done
on node-a "curl -sfL https://get.k3s.io | sudo INSTALL_K3S_EXEC=\"server --node-ip $IPA \
  --flannel-iface $ifa --disable traefik --disable servicelb --write-kubeconfig-mode 644\" sh -"
token=$(on node-a sudo cat /var/lib/rancher/k3s/server/node-token)
on node-b "curl -sfL https://get.k3s.io | sudo K3S_URL=https://$IPA:6443 K3S_TOKEN=$token \
  INSTALL_K3S_EXEC=\"agent --node-ip $IPB --flannel-iface $ifb\" sh -"
for n in node-a node-b; do
  on "$n" "cat >/tmp/ambit.tar && sudo k3s ctr images import /tmp/ambit.tar && rm /tmp/ambit.tar" <"$RUN/ambit.tar"
done
for _ in $(seq 1 60); do
  [ "$(kubectl_ get nodes --no-headers 2>/dev/null | grep -c ' Ready')" -eq 2 ] && break
  sleep 5
done
log "k3s: $(kubectl_ get nodes --no-headers | awk '{print $1 "=" $2}' | tr '\n' ' ')"

# Istio's security CRDs, the CA's key, ambit itself
kubectl_ apply -f "https://raw.githubusercontent.com/istio/istio/$ISTIO_VERSION/manifests/charts/base/files/crd-all.gen.yaml" >/dev/null
"$PY" -c 'import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))' ca init --dir "$RUN/ca" >/dev/null
secret=$(sed -n 's/.*secretName: *\([a-z0-9.-]*\).*/\1/p' "$repo/daemonset/ca.yaml" | head -n 1)
kubectl_ create namespace ambit-system --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
tar -C "$RUN/ca" -cf - . | on node-a "rm -rf /tmp/ca && mkdir /tmp/ca && tar -C /tmp/ca -xf - && \
  sudo k3s kubectl -n ambit-system create secret generic $secret --from-file=/tmp/ca && \
  sudo k3s kubectl -n ambit-system create configmap ambit-ca-root --from-file=ca.crt=/tmp/ca/root-cert.pem"
# daemonset/ as it is, with the image built here (an overlay: no file of daemonset/ is edited)
mkdir -p "$RUN/deploy"
cp -r "$repo/daemonset" "$RUN/deploy/base"
cat >"$RUN/deploy/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [base]
images:
  - {name: ghcr.io/ambit-mesh/ambit, newName: ${IMAGE%:*}, newTag: ${IMAGE##*:}}
EOF
tar -C "$RUN/deploy" -cf - . | on node-a "rm -rf /tmp/deploy && mkdir /tmp/deploy && tar -C /tmp/deploy -xf - \
  && sudo k3s kubectl apply -k /tmp/deploy" >/dev/null
kubectl_ -n ambit-system rollout status deploy/ambit-ca --timeout=300s
kubectl_ -n ambit-system rollout status ds/ambit-node --timeout=300s

# The workloads: the image's python3 runs vagrant/echo.py (from a ConfigMap)
kubectl_ create namespace shop --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
kubectl_ label namespace shop ambit.dev/dataplane-mode=ambient --overwrite
on node-a "sudo k3s kubectl -n shop create configmap echo --from-file=echo.py=/dev/stdin" <"$here/echo.py"
pod() {  # pod NAME NODE COMMAND...
  local name=$1 node=$2; shift 2
  local args
  args=$(printf '"%s",' "$@")
  cat <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: $name, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: shop, labels: {app: $name}}
spec:
  serviceAccountName: $name
  nodeSelector: {kubernetes.io/hostname: $node}
  containers:
    - name: app
      image: $IMAGE
      imagePullPolicy: Never
      command: [${args%,}]
      volumeMounts: [{name: echo, mountPath: /app}]
  volumes: [{name: echo, configMap: {name: echo}}]
---
EOF
}
{
  pod backend node-a python3 -u /app/echo.py serve 8080
  pod frontend node-b sleep infinity
  pod catalog node-b sleep infinity
  cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  selector: {app: backend}
  ports: [{name: tcp, port: 8080, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}], to: [{operation: {ports: ["8080"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
EOF
} | kubectl_ apply -f - >/dev/null
kubectl_ -n shop wait --for=condition=Ready pod --all --timeout=300s

agent_on() {  # the ambit-node pod of a node
  kubectl_ -n ambit-system get pods -l app.kubernetes.io/name=ambit-node --field-selector "spec.nodeName=$1" \
    -o jsonpath='{.items[0].metadata.name}'
}
pa=$(agent_on node-a) pb=$(agent_on node-b)
for _ in $(seq 1 60); do
  kubectl_ -n ambit-system exec "$pb" -c agent -- ambit status >/dev/null 2>&1 && break
  sleep 2
done

# Capture on node-a's private interface: everything between the two nodes
on node-a "sudo sh -c \"tcpdump -i $ifa -U -s 0 -w /tmp/wire.pcap host $IPA and host $IPB \
  >/dev/null 2>&1 & echo \\\$! >/tmp/tcpdump.pid\""
sleep 2
marker="AMBIT-PLAINTEXT-MARKER-$RANDOM$RANDOM" canary="AMBIT-CANARY-$RANDOM$RANDOM"
out=$(kubectl_ -n shop exec frontend -- python3 /app/echo.py call backend.shop.svc.cluster.local 8080 "$marker" 20) \
  || fail "allowed: shop/frontend (node-b) -> backend (node-a): $out"
[ "$out" = "echo: $marker" ] || fail "allowed: unexpected answer $out"
log "allowed: shop/frontend -> backend: $out"
rc=0
out=$(kubectl_ -n shop exec catalog -- python3 /app/echo.py call backend.shop.svc.cluster.local 8080 "$marker" 20) || rc=$?
[ "$rc" -eq 3 ] || fail "denied: shop/catalog -> backend should be closed without an answer (exit 3), got $rc: $out"
log "denied: shop/catalog -> backend: $out"
on node-a "cat >/tmp/echo.py" <"$here/echo.py"
on node-a "sudo sh -c 'timeout 60 python3 /tmp/echo.py serve 9999 >/dev/null 2>&1 &'"
on node-b "cat >/tmp/echo.py" <"$here/echo.py"
sleep 1
on node-b python3 /tmp/echo.py call "$IPA" 9999 "$canary" 20 >/dev/null || fail "canary between the VMs"

kubectl_ -n ambit-system exec "$pa" -c agent -- ambit flows -o json >"$RUN/flows-a.json"
kubectl_ -n ambit-system exec "$pb" -c agent -- ambit flows -o json >"$RUN/flows-b.json"
flows_checks "$RUN/flows-a.json" "$RUN/flows-b.json" || fail "ambit flows"
kubectl_ -n ambit-system exec "$pa" -c agent -- ambit flows
for p in "$pa" "$pb"; do kubectl_ -n ambit-system exec "$p" -c agent -- ambit status || fail "ambit status in $p"; done

on node-a "sudo kill \$(cat /tmp/tcpdump.pid); sleep 1; sudo cat /tmp/wire.pcap" >"$RUN/wire.pcap"
wire_checks "$RUN/wire.pcap" "$marker" "$canary"
