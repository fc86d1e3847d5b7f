"""`ambit policy simulate`: replay recorded flows against the policies in force and against
the same policies with proposed objects applied, and say what would change.

Pure. Input: the replayable records of the nodes' flow histories (`agent.history`,
aggregated: one `Observed` per distinct set of facts, with a count), and per node the
snapshot in force and the cluster objects it was compiled from (the agent's `/objects`).
Each record is judged twice by the real policy engine, as the proxy that recorded it
decides: a connection at the destination's ztunnel with `authorize` (its identity from
the certificate; a plaintext one, whose source identity is unknown, with `mtls=False`), a
request at a waypoint with `authorize_http`. The changes are grouped by source and
destination workload, with the deciding rule before and after.

What a replay cannot know: request headers and JWT claims are not recorded (a rule on
them is judged as if they were absent; a request's verified JWT principal is kept), and
an authentication failure (401 from RequestAuthentication) is not replayed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import AgentError
from ambit.cluster import POLICY_KINDS, ClusterError, PolicyObject, build_state, parse_object
from ambit.peers import serving_waypoint
from ambit.policy import (
    ConnectionFacts,
    Decision,
    HttpFacts,
    PolicyError,
    RequestAuth,
    authorize,
    authorize_http,
    authorize_opaque,
    compile_policy,
)
from ambit.snapshot import Snapshot, Workload, build_snapshot
from ambit.spiffe import SpiffeError, SpiffeId
from ambit.wire.snapshot import WireError, decode_snapshot


class SimulateError(AgentError):
    """A proposed object or an agent's answer cannot be used; names which and why."""


# ---------------------------------------------------------------------------
# what was observed


@dataclass(frozen=True)
class Observed:
    """One distinct set of recorded facts (a row of `FlowHistory.aggregate`) and how often."""

    kind: str  # conn | request | drop
    node: str
    src_ip: str | None
    src_workload: str | None
    src_identity: str | None
    dst_workload: str | None
    dst_identity: str | None
    dst_port: int | None
    mtls: bool
    verdict: str | None
    policy: str | None = None
    rule: int | None = None
    direction: str | None = None
    route: str | None = None
    method: str | None = None
    host: str | None = None
    path: str | None = None
    status: int | None = None
    waypoint: str | None = None
    dst_meta: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    request_principal: str | None = None
    count: int = 1
    first: float = 0.0
    last: float = 0.0

    @classmethod
    def from_row(cls, row: Mapping[str, Any], node: str | None = None) -> Observed:
        def s(k: str) -> str | None:
            v = row.get(k)
            return str(v) if v not in (None, "") else None

        def i(k: str) -> int | None:
            v = row.get(k)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        extra = row.get("extra") if isinstance(row.get("extra"), Mapping) else {}
        meta = row.get("dst_meta")
        return cls(
            kind=str(row.get("kind") or "conn"), node=node or str(row.get("node") or ""),
            src_ip=s("src_ip"), src_workload=s("src_workload"), src_identity=s("src_identity"),
            dst_workload=s("dst_workload"), dst_identity=s("dst_identity"), dst_port=i("dst_port"),
            mtls=bool(row.get("mtls")), verdict=s("verdict"), policy=s("policy"), rule=i("rule"),
            direction=s("direction"), route=s("route"), method=s("method"), host=s("host"), path=s("path"),
            status=i("status"), waypoint=s("waypoint"), dst_meta=meta if isinstance(meta, Mapping) else None,
            request_principal=str(extra.get("request_principal")) if extra and extra.get("request_principal") else None,
            count=int(row.get("count") or 1), first=float(row.get("first") or row.get("t_start") or 0.0),
            last=float(row.get("last") or row.get("t_end") or 0.0),
        )

    @property
    def source(self) -> str:
        """The source as `ambit flows` names it: its workload, else its identity, else its address."""
        if self.src_workload:
            return self.src_workload
        if self.src_identity:
            return self.src_identity.removeprefix("spiffe://")
        return self.src_ip or "?"

    @property
    def destination(self) -> str:
        return self.dst_workload or "?"

    @property
    def what(self) -> str:
        """The request, or the port."""
        if self.kind == "request" and self.route != "waypoint_tcp":
            return f"{self.method or '?'} {self.path or '/'}"
        return f"port {self.dst_port}" if self.dst_port is not None else "-"


# ---------------------------------------------------------------------------
# judging one record


def _identity(text: str | None) -> SpiffeId | None:
    if not text:
        return None
    try:
        return SpiffeId.parse(text)
    except SpiffeError:
        return None


def destination_workload(snap: Snapshot, obs: Observed) -> Workload | None:
    """The destination as the snapshot knows it; a pod that has gone since, from what the
    history kept of it (namespace, labels, Services, waypoint, identity)."""
    if not obs.dst_workload:
        return None
    w = snap.workload(obs.dst_workload)
    if w is not None:
        return w
    meta = obs.dst_meta
    ident = _identity(obs.dst_identity)
    if meta is None or ident is None or "/" not in obs.dst_workload:
        return None
    ns, name = obs.dst_workload.split("/", 1)
    labels = meta.get("labels")
    services = meta.get("services")
    labels = labels if isinstance(labels, Mapping) else {}
    services = services if isinstance(services, list) else []
    waypoint = meta.get("waypoint")
    return Workload(uid=obs.dst_workload, name=name, namespace=ns, service_account=ident.service_account,
                    ip="", node="", node_address=None, labels={str(k): str(v) for k, v in labels.items()},
                    identity=ident, waypoint=str(waypoint) if waypoint else None, enrolled=True,
                    services=tuple(str(s) for s in services))


def skip_reason(obs: Observed) -> str | None:
    """Why a record cannot be replayed (None: it can)."""
    if obs.kind == "request":
        if obs.route == "gateway":
            return "requests decided at an ingress gateway (its routes and policies are not replayed)"
        if not obs.method and obs.route != "waypoint_tcp":
            return "malformed requests (refused before any policy)"
        if obs.status == 401 and obs.verdict == "deny":
            return "requests refused by RequestAuthentication (JWTs are not replayed)"
        if obs.dst_port is None:
            return "requests without a destination port"
        return None
    if obs.kind == "drop" and obs.route != "drop_strict":
        return "connections dropped by the kernel for bypassing the mesh (not a policy decision)"
    if obs.dst_port is None:
        return "connections without a destination port"
    return None


def judge(obs: Observed, snap: Snapshot) -> Decision | str:
    """The decision `snap`'s policies give this record, or why it cannot be judged."""
    why = skip_reason(obs)
    if why is not None:
        return why
    dst = destination_workload(snap, obs)
    if dst is None:
        return "flows to a workload that no longer exists (and whose labels were not recorded)"
    assert obs.dst_port is not None
    src = _identity(obs.src_identity)
    if obs.kind == "request":
        facts = ConnectionFacts(obs.src_ip or "", src, dst, obs.dst_port, True)
        if obs.route == "waypoint_tcp":
            return authorize_opaque(facts, snap.policies)
        auth = RequestAuth(obs.request_principal) if obs.request_principal else None
        http = HttpFacts(obs.method or "", obs.path or "/", obs.host or "", {}, auth=auth)
        return authorize_http(facts, http, snap.policies)
    # a connection at the destination's ztunnel: plaintext (no identity) as the ztunnel judges it
    mtls = obs.mtls and src is not None
    facts = ConnectionFacts(obs.src_ip or "", src if mtls else None, dst, obs.dst_port, mtls)
    via = mtls and serving_waypoint(snap, src, dst) is not None
    return authorize(facts, snap.policies, via_waypoint=via)


def describe(d: Decision) -> str:
    """A decision in a few words: the verdict and the rule that decided."""
    verdict = "allow" if d.allowed else "deny"
    if d.policy and d.rule is not None:
        return f"{verdict}: {d.action} {d.policy} rule {d.rule}"
    if d.policy:
        return f"{verdict}: {d.policy} ({d.action})"
    if d.allowed:
        return f"{verdict}: {'through its waypoint' if 'waypoint' in d.reason else 'no ALLOW policy applies'}"
    if "waypoint" in d.reason:
        return f"{verdict}: must come through its waypoint"
    return f"{verdict}: no ALLOW rule matched (default deny)"


# ---------------------------------------------------------------------------
# the simulation


@dataclass(frozen=True)
class Change:
    obs: Observed
    before: Decision
    after: Decision


@dataclass
class Simulation:
    newly_denied: list[Change] = field(default_factory=list)
    newly_allowed: list[Change] = field(default_factory=list)
    flows: int = 0  # recorded flows (and requests) looked at
    unchanged: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    # judged differently today than when recorded: the policies changed since (or the record
    # lacks a fact the rule reads, such as a header)
    drifted: int = 0

    @property
    def breaks(self) -> bool:
        return bool(self.newly_denied)


SnapshotPair = tuple[Snapshot, Snapshot]


def simulate(observed: Iterable[Observed], pairs: Mapping[str, SnapshotPair], default: SnapshotPair) -> Simulation:
    """Judge every record before (the policies in force) and after (with the proposal), each by
    the snapshot pair of the node that recorded it (`default` for a node not in `pairs`)."""
    sim = Simulation()
    for obs in observed:
        sim.flows += obs.count
        before_snap, after_snap = pairs.get(obs.node, default)
        before = judge(obs, before_snap)
        if isinstance(before, str):
            sim.skipped[before] += obs.count
            continue
        after = judge(obs, after_snap)
        if isinstance(after, str):
            sim.skipped[after] += obs.count
            continue
        if obs.verdict in ("allow", "deny", "dropped") and before.allowed != (obs.verdict == "allow"):
            sim.drifted += obs.count
        if before.allowed and not after.allowed:
            sim.newly_denied.append(Change(obs, before, after))
        elif after.allowed and not before.allowed:
            sim.newly_allowed.append(Change(obs, before, after))
        else:
            sim.unchanged += obs.count
    return sim


@dataclass(frozen=True)
class ChangeGroup:
    """The changed flows of one source to one destination with the same rules before and after."""

    source: str
    destination: str
    what: tuple[str, ...]  # ports or requests, most frequent first
    flows: int
    first: float
    last: float
    before: str
    after: str
    before_reason: str
    after_reason: str
    nodes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "what": list(self.what),
                "flows": self.flows, "first": self.first, "last": self.last, "before": self.before,
                "after": self.after, "before_reason": self.before_reason, "after_reason": self.after_reason,
                "nodes": list(self.nodes)}


def group_changes(changes: Iterable[Change]) -> list[ChangeGroup]:
    """Changes grouped by (source, destination, rule before, rule after), most flows first."""
    groups: dict[tuple[str, str, str, str], list[Change]] = {}
    for c in changes:
        key = (c.obs.source, c.obs.destination, describe(c.before), describe(c.after))
        groups.setdefault(key, []).append(c)
    out = []
    for (src, dst, before, after), cs in groups.items():
        what: collections.Counter[str] = collections.Counter()
        for c in cs:
            what[c.obs.what] += c.obs.count
        out.append(ChangeGroup(
            source=src, destination=dst, what=tuple(w for w, _ in what.most_common()),
            flows=sum(c.obs.count for c in cs), first=min(c.obs.first for c in cs),
            last=max(c.obs.last for c in cs), before=before, after=after,
            before_reason=cs[0].before.reason, after_reason=cs[0].after.reason,
            nodes=tuple(sorted({c.obs.node for c in cs})),
        ))
    out.sort(key=lambda g: (-g.flows, g.source, g.destination, g.before, g.after))
    return out


# ---------------------------------------------------------------------------
# the proposal


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    try:
        o = parse_object(obj)
    except ClusterError as e:
        raise SimulateError(str(e)) from e
    return str(obj.get("kind")), o.meta.namespace, o.meta.name


def apply_proposal(objects: Sequence[Mapping[str, Any]], proposed: Sequence[Mapping[str, Any]],
                   delete: bool = False) -> list[Mapping[str, Any]]:
    """The cluster's objects with the proposed policies added or replacing theirs (or, with
    `delete`, removed). Only policy kinds may be proposed: a simulation replays policy changes."""
    if not proposed:
        raise SimulateError("the proposal has no objects")
    by_key = {object_key(o): o for o in objects}
    for p in proposed:
        kind, ns, name = key = object_key(p)
        if kind not in POLICY_KINDS:
            raise SimulateError(f"{kind} {ns}/{name}: only {', '.join(POLICY_KINDS)} can be simulated "
                                "(recorded flows are replayed against policy changes)")
        if delete:
            if key not in by_key:
                raise SimulateError(f"{kind} {ns}/{name} is not in the cluster: nothing to delete")
            del by_key[key]
            continue
        try:
            obj = parse_object(p)
            assert isinstance(obj, PolicyObject)
            compile_policy(obj)
        except (PolicyError, ClusterError) as e:
            raise SimulateError(f"the proposal is invalid: {e}") from e
        by_key[key] = p
    return list(by_key.values())


def snapshot_in_force(agent_objects: Mapping[str, Any]) -> Snapshot:
    """The snapshot in force on a node, from its agent's `/objects` answer."""
    try:
        encoded = {(str(k), str(ns), str(n)): v for k, ns, n, v in agent_objects["snapshot"]}
        return decode_snapshot(encoded)
    except (KeyError, TypeError, ValueError, WireError) as e:
        raise SimulateError(f"the agent's /objects answer cannot be read: {e}") from e


def snapshot_pair(agent_objects: Mapping[str, Any], proposed: Sequence[Mapping[str, Any]],
                  delete: bool = False) -> SnapshotPair:
    """From an agent's `/objects` answer: the snapshot in force, and the one the proposal makes
    (compiled from the same cluster objects, the last good versions of invalid ones kept)."""
    before = snapshot_in_force(agent_objects)
    try:
        objects = list(agent_objects["objects"])
    except (KeyError, TypeError) as e:
        raise SimulateError(f"the agent's /objects answer cannot be read: {e}") from e
    applied = apply_proposal(objects, proposed, delete)
    try:
        state = build_state(applied)
    except ClusterError as e:
        raise SimulateError(f"the cluster's objects with the proposal: {e}") from e
    after = build_snapshot(state, before.node, trust_domain=before.trust_domain,
                           root_namespace=before.policies.root_namespace, previous=before)
    return before, after
