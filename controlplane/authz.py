"""Issuance decisions of the CA, as pure functions: what a CSR asks for, and may this node have it.

`inspect_csr` turns a PEM CSR into the one SPIFFE ID it requests or refuses it
(INVALID_ARGUMENT: unparsable, bad signature, zero or several URI SANs,
non-SPIFFE URI, foreign trust domain). `authorize_caller` decides whether the
caller may have that identity: a node (its ztunnel) only while it hosts a pod
with that namespace and service account, against one cluster snapshot
(`authorize`); a workload (a pod that showed its own ServiceAccount token, e.g.
a waypoint) only its own identity, Istio's rule for istiod's CSRs.
PERMISSION_DENIED otherwise, saying what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambit.cluster import ClusterState
from ambit.spiffe import SpiffeError, SpiffeId

OK = "OK"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
PERMISSION_DENIED = "PERMISSION_DENIED"
UNAUTHENTICATED = "UNAUTHENTICATED"


@dataclass(frozen=True)
class Verdict:
    """`code` is a gRPC status name; `reason` is safe to return to the caller."""

    code: str
    reason: str
    identity: SpiffeId | None = None

    @property
    def allowed(self) -> bool:
        return self.code == OK


@dataclass(frozen=True)
class NodeCaller:
    """A node's ztunnel: it may obtain the identities of the pods scheduled on the node."""

    node: str

    def describe(self) -> str:
        return f"node {self.node}"


@dataclass(frozen=True)
class WorkloadCaller:
    """A pod that proved its own ServiceAccount (a token bound to it, the pod running): it
    may obtain exactly `spiffe://<td>/ns/<namespace>/sa/<service_account>`."""

    namespace: str
    service_account: str
    pod: str  # the name of the pod the token is bound to
    node: str | None = None  # where that pod runs (for the audit line)

    def describe(self) -> str:
        return f"pod {self.namespace}/{self.pod} (service account {self.namespace}/{self.service_account})"


Caller = NodeCaller | WorkloadCaller


@dataclass(frozen=True)
class CsrFacts:
    identity: SpiffeId
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def inspect_csr(csr_pem: str, trust_domain: str) -> CsrFacts | Verdict:
    """The identity and key a CSR asks for, or an INVALID_ARGUMENT verdict naming the problem."""
    def bad(reason: str) -> Verdict:
        return Verdict(INVALID_ARGUMENT, reason)

    if not csr_pem.strip():
        return bad("csr is empty")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as e:
        return bad(f"csr is not a PEM PKCS#10 request: {e}")
    if not csr.is_signature_valid:
        return bad("csr signature does not verify (corrupted, or not signed by its own key)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            return bad(f"csr key curve {key.curve.name} is not allowed; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            return bad(f"csr RSA key of {key.key_size} bits is too small; use 2048 or more")
    else:
        return bad(f"csr key type {type(key).__name__} is not allowed; use ECDSA P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return bad("csr has no subjectAltName; it must carry exactly one spiffe:// URI SAN")
    except ValueError as e:
        return bad(f"csr extensions are malformed: {e}")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return bad(f"csr has {len(uris)} URI SANs; it must carry exactly one spiffe:// URI SAN")
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        return bad("csr has DNS/IP/email SANs; only one spiffe:// URI SAN is allowed")
    uri = uris[0]
    if not uri.startswith("spiffe://"):
        return bad(f"csr URI SAN {uri!r} is not a SPIFFE ID")
    try:
        ident = SpiffeId.parse(uri)
    except SpiffeError as e:
        return bad(f"csr URI SAN is not a valid workload SPIFFE ID: {e}")
    if ident.trust_domain != trust_domain:
        return bad(f"csr asks for trust domain {ident.trust_domain!r}; this CA issues only {trust_domain!r}")
    return CsrFacts(ident, key)


def authorize(node: str, identity: SpiffeId, cluster: ClusterState) -> Verdict:
    """May `node` obtain `identity`? Only while a pod with that namespace and SA is scheduled there."""
    ns, sa = identity.namespace, identity.service_account
    if cluster.node_hosts_identity(node, ns, sa):
        return Verdict(OK, f"node {node} hosts a pod with service account {ns}/{sa}", identity)
    elsewhere = sorted(
        {p.node_name or "<unscheduled>" for p in cluster.pods.values() if p.namespace == ns and p.service_account == sa}
    )
    if elsewhere:
        where = f"pods with service account {ns}/{sa} are scheduled on: {', '.join(elsewhere)}"
    elif ns not in cluster.namespaces and not any(p.namespace == ns for p in cluster.pods.values()):
        where = f"namespace {ns} has no pods"
    else:
        where = f"no pod in namespace {ns} runs as service account {sa}"
    known = "" if not cluster.nodes or node in cluster.nodes else f" (node {node} is not in the cluster state)"
    return Verdict(
        PERMISSION_DENIED,
        f"node {node} may not obtain {identity}: no pod with service account {ns}/{sa} is scheduled on it; {where}{known}",
        identity,
    )


def authorize_caller(caller: Caller, identity: SpiffeId, cluster: ClusterState) -> Verdict:
    """May `caller` obtain `identity`? A node: `authorize`. A workload: its own identity only."""
    if isinstance(caller, NodeCaller):
        return authorize(caller.node, identity, cluster)
    ns, sa = caller.namespace, caller.service_account
    if (identity.namespace, identity.service_account) == (ns, sa):
        return Verdict(OK, f"{caller.describe()} asks for its own identity", identity)
    own = SpiffeId(identity.trust_domain, ns, sa)
    return Verdict(
        PERMISSION_DENIED,
        f"{caller.describe()} may obtain only its own identity {own}, not {identity}: a ServiceAccount "
        "token speaks for that ServiceAccount alone",
        identity,
    )
