"""Istio's security API, read verbatim: `AuthorizationPolicy` and `PeerAuthentication`
(`security.istio.io/v1` and `v1beta1`).

Pure, split by job: `compile` validates and compiles one object (errors name the
object and the field path), `match` holds the compiled form, `index` the set in
force (`PolicySet`), and `decide` the decisions: `authorize` an L4 connection at
the ztunnel, `authorize_http` an HTTP request at a waypoint, `mtls_mode` the
effective PeerAuthentication mode per port. Their vocabulary is typed here
too (`Action`, `MtlsMode`, `DecisionAction`), with the `Verdict` every process
records for a connection.
"""

from __future__ import annotations

from ambit.policy.compile import compile_policy
from ambit.policy.decide import (
    ConnectionFacts,
    Decision,
    DecisionAction,
    EffectiveMtlsMode,
    HttpFacts,
    Verdict,
    authorize,
    authorize_http,
    check,
    mtls_mode,
    mtls_policy,
    mtls_port_modes,
)
from ambit.policy.index import PolicySet
from ambit.policy.match import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    MtlsMode,
    PolicyError,
)

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "Action",
    "CompiledAuthz",
    "CompiledPeerAuthn",
    "CompiledPolicy",
    "ConnectionFacts",
    "Decision",
    "DecisionAction",
    "EffectiveMtlsMode",
    "HttpFacts",
    "MtlsMode",
    "PolicyError",
    "PolicySet",
    "Verdict",
    "authorize",
    "authorize_http",
    "check",
    "compile_policy",
    "mtls_mode",
    "mtls_policy",
    "mtls_port_modes",
]
