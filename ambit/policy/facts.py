"""What the policy engine decides about and what it answers: the facts of a connection
(`ConnectionFacts`) or a request (`HttpFacts`), and a `Decision` with its dry-run and
CUSTOM parts; the verdict and mode names every process shares. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ambit.policy.jwt import RequestAuth
from ambit.spiffe import SpiffeId

if TYPE_CHECKING:
    from ambit.snapshot import Workload

# Which kind of rule decided: an ALLOW or DENY policy (or the mTLS/waypoint checks, which
# speak as ALLOW/DENY), or none, the default (allow when no ALLOW policy applies, else deny).
DecisionAction = Literal["ALLOW", "DENY", "DEFAULT"]
# The effective PeerAuthentication mode of a port (UNSET has been resolved by inheritance).
EffectiveMtlsMode = Literal["DISABLE", "PERMISSIVE", "STRICT"]
# A connection's verdict as every process names it (the ztunnel's connection records and
# access log, the agent's /flows, `ambit flows`): allowed or denied by a Decision, not
# decided (yet, or ever: refused before any policy was asked), or dropped by the kernel
# (no-bypass, or plaintext into a STRICT port) before any proxy saw it.
Verdict = Literal["allow", "deny", "pending", "dropped"]


@dataclass(frozen=True)
class ConnectionFacts:
    """What the ztunnel knows about an inbound connection (identity from the verified certificate)."""

    src_ip: str
    src_identity: SpiffeId | None
    dst: Workload
    dst_port: int
    mtls: bool


@dataclass(frozen=True)
class HttpFacts:
    """One HTTP request at a waypoint. `headers` names are matched case-insensitively.
    `auth`: the request's verified JWT (`ambit.policy.jwt.authenticate`), None without one."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    auth: RequestAuth | None = field(default=None, hash=False)


@dataclass(frozen=True)
class DryRun:
    """What a dry-run policy would have decided had it been enforced (with the enforced ones)."""

    policy: str  # "ns/name"
    rule: int | None  # its rule that decided, None when another policy or the default did
    decision: Literal["allow", "deny"]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "rule": self.rule, "decision": self.decision, "reason": self.reason}

    def words(self) -> str:
        """`would deny by ns/name rule 0`: how flows and logs show it."""
        return f"would {self.decision} by {self.policy}" + (f" rule {self.rule}" if self.rule is not None else "")


@dataclass(frozen=True)
class CustomCheck:
    """A CUSTOM policy's rule matched: its provider must allow the request too."""

    provider: str
    policy: str  # "ns/name"
    rule: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "policy": self.policy, "rule": self.rule, "reason": self.reason}


class AnyOf(tuple[str, ...]):
    """A list-valued attribute (a JWT's `aud`, a list claim): a value matches when one element does."""

    __slots__ = ()


@dataclass(frozen=True)
class Decision:
    """Which policy and rule decided, and a sentence saying why."""

    allowed: bool
    action: DecisionAction
    policy: str | None  # "ns/name"
    rule: int | None
    reason: str
    # Things an operator should know that did not decide the outcome, e.g. rules
    # skipped because they need HTTP attributes and no waypoint enforces them.
    notes: tuple[str, ...] = ()
    # Allowed so far, but CUSTOM policies matched: each provider must allow it too (only at a
    # waypoint configured with them; anywhere else a matching CUSTOM rule denies).
    custom: tuple[CustomCheck, ...] = ()
    # What each dry-run policy in scope would have decided (never enforced).
    dry_run: tuple[DryRun, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "action": self.action,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "notes": list(self.notes),
            "custom": [c.to_dict() for c in self.custom],
            "dry_run": [d.to_dict() for d in self.dry_run],
        }
