"""The ingress rows' edge: the HTTPS certificate both of them serve, and the gateway's cluster objects.

An outside client reaches the mesh through an edge proxy that terminates TLS for a
public hostname. Both ingress rows (`ambit-gateway`, `haproxy-https`) serve the same
certificate and key for `HOSTNAME` (ECDSA P-256, issued by a CA of its own: a public
name, not a SPIFFE identity), in the same pod (`gw`, on node A). The client trusts that
CA, asks for `HOSTNAME` by SNI and sends it as Host.

`write_tls(d)` makes the CA and the certificate; `cluster_yaml(...)` is what the gateway
reads besides bench/rig.py's cluster: a Gateway of class `ambit-ingress` with one HTTPS
listener for `HOSTNAME`, its `kubernetes.io/tls` Secret, an HTTPRoute to a Service whose
endpoint is the server pod `srv` (in the mesh, behind ztunnel B), the gateway's pod, and
one AuthorizationPolicy at the gateway (DENY clients outside 10.0.0.0/8, an IP
restriction as examples/50-ingress.yaml has; the HAProxy row has the same rule). No
JWT and no rate limit: the row measures the path and a realistic cheap policy, not
signature checks.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

HOSTNAME = "shop.example.com"
NAMESPACE = "edge"  # the Gateway's namespace (not in the mesh)
GATEWAY = "ingress"  # the Gateway's name, and so its pods' service account and identity
PORT = 443  # the Gateway's HTTPS listener
ALLOWED_CLIENTS = "10.0.0.0/8"  # the IP restriction both ingress rows enforce
SERVICE_VIP = "10.96.0.10"  # outside every bench address (10.150-199.x.y)


def tls_paths(d: Path) -> dict[str, Path]:
    """`ca`: what the client trusts; `pem`: certificate then key (HAProxy's `crt`)."""
    return {"ca": d / "edge-ca.pem", "pem": d / "edge.pem", "cert": d / "edge.crt", "key": d / "edge.key"}


def write_tls(d: Path) -> dict[str, Path]:
    """A CA of the edge's own and a certificate for HOSTNAME, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from controlplane.pki import cert_pem, key_pem, new_key

    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, key = new_key(), new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench edge CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tls_paths(d)
    paths["ca"].write_bytes(cert_pem(ca))
    paths["cert"].write_bytes(cert_pem(leaf))
    for p, data in ((paths["key"], key_pem(key)), (paths["pem"], cert_pem(leaf) + key_pem(key))):
        p.write_bytes(data)
        p.chmod(0o600)
    return paths


def cluster_yaml(paths: dict[str, Path], *, gateway_ip: str, server_ns: str, server: str,
                 server_port: int) -> str:
    """The gateway's objects (bench/rig.py writes them beside its cluster before starting it)."""
    b64 = base64.b64encode
    crt, key = b64(paths["cert"].read_bytes()).decode(), b64(paths["key"].read_bytes()).decode()
    gw_ref = f"targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: {GATEWAY}}}]"
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}",
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {GATEWAY}, "
        f"namespace: {NAMESPACE}}}\nspec:\n  gatewayClassName: ambit-ingress\n  listeners:\n"
        f"  - {{name: https, port: {PORT}, protocol: HTTPS, hostname: {HOSTNAME}, "
        "tls: {certificateRefs: [{name: edge-tls}]}, allowedRoutes: {namespaces: {from: All}}}",
        f"apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: edge-tls, "
        f"namespace: {NAMESPACE}}}\ndata: {{tls.crt: {crt}, tls.key: {key}}}",
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: edge-networks, "
        f"namespace: {NAMESPACE}}}\nspec: {{{gw_ref}, action: DENY, "
        f"rules: [{{from: [{{source: {{notRemoteIpBlocks: ['{ALLOWED_CLIENTS}']}}}}]}}]}}",
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {server}, "
        f"namespace: {server_ns}}}\nspec:\n  parentRefs: [{{name: {GATEWAY}, namespace: {NAMESPACE}}}]\n"
        f"  hostnames: [{HOSTNAME}]\n"
        f"  rules: [{{matches: [{{path: {{type: PathPrefix, value: /}}}}], "
        f"backendRefs: [{{name: {server}, port: 80}}]}}]",
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {server}, namespace: {server_ns}}}\n"
        f"spec: {{clusterIP: {SERVICE_VIP}, selector: {{app: {server}}}, "
        f"ports: [{{port: 80, targetPort: {server_port}}}]}}",
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {GATEWAY}-gateway, namespace: {NAMESPACE}, "
        f"labels: {{gateway.networking.k8s.io/gateway-name: {GATEWAY}, ambit.dev/dataplane-mode: none}}}}\n"
        f"spec: {{nodeName: node-a, serviceAccountName: {GATEWAY}}}\n"
        f"status: {{podIP: {gateway_ip}, phase: Running}}",
    ]
    return "\n---\n".join(docs) + "\n"
