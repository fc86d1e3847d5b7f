"""Istio's security API, read verbatim: `AuthorizationPolicy`, `PeerAuthentication` and
`RequestAuthentication` (`security.istio.io/v1` and `v1beta1`).

Pure, split by job: `compile` validates and compiles one object (errors name the
object and the field path), `match` holds the compiled form, `index` the set in
force (`PolicySet`), `jwt` the request authentication a waypoint runs first
(`authenticate` a request's JWTs against `PolicySet.jwt_rules`), and `decide`
the decisions: `authorize` an L4 connection at the ztunnel, `authorize_http` an
HTTP request at a waypoint (with the `RequestAuth` that `authenticate` found),
`mtls_mode` the effective PeerAuthentication mode per port, and `status` what ambit
enforces of each accepted policy, and where (`PolicySet.statuses`). Their vocabulary is
typed here too (`Action`, `MtlsMode`, `DecisionAction`), with the `Verdict`
every process records for a connection.
"""

from __future__ import annotations

from ambit.policy.compile import compile_policy
from ambit.policy.decide import authorize, authorize_http, authorize_opaque, check
from ambit.policy.facts import (
    ConnectionFacts,
    CustomCheck,
    Decision,
    DecisionAction,
    DryRun,
    EffectiveMtlsMode,
    HttpFacts,
    Verdict,
)
from ambit.policy.index import PolicySet
from ambit.policy.jwks import Jwks, JwksError, KeyResolver, parse_jwks
from ambit.policy.jwt import AuthnResult, RequestAuth, authenticate, output_headers
from ambit.policy.match import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRequestAuthn,
    JwtRule,
    MtlsMode,
    PolicyError,
)
from ambit.policy.mtls import mtls_mode, mtls_policy, mtls_port_modes
from ambit.policy.status import NOT_FULLY_ENFORCED, FieldStatus, PolicyStatus, policy_status

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "NOT_FULLY_ENFORCED",
    "Action",
    "AuthnResult",
    "CompiledAuthz",
    "CompiledPeerAuthn",
    "CompiledPolicy",
    "CompiledRequestAuthn",
    "ConnectionFacts",
    "CustomCheck",
    "Decision",
    "DecisionAction",
    "DryRun",
    "EffectiveMtlsMode",
    "FieldStatus",
    "HttpFacts",
    "Jwks",
    "JwksError",
    "JwtRule",
    "KeyResolver",
    "MtlsMode",
    "PolicyError",
    "PolicySet",
    "PolicyStatus",
    "RequestAuth",
    "Verdict",
    "authenticate",
    "authorize",
    "authorize_http",
    "authorize_opaque",
    "check",
    "compile_policy",
    "mtls_mode",
    "mtls_policy",
    "mtls_port_modes",
    "output_headers",
    "parse_jwks",
    "policy_status",
]
