"""`ambit policy suggest`: least-privilege AuthorizationPolicies from recorded traffic.

Pure. From the allowed flows the nodes recorded into one namespace's workloads, one ALLOW
policy per destination workload (its pods grouped by their labels, less the per-pod ones
a controller adds; selected by the fewest labels that select only them):
- a connection decided by the ztunnel gives its source principal and destination port
  (plaintext into a PERMISSIVE port gives the source's address as an ipBlock);
- a request decided by a waypoint gives its principal, method, path and port. Path
  segments that look like ids (numbers, UUIDs, long hex) become a prefix (`/orders/*`).
Sources with the same ports and requests share a rule. Every rule is commented with what
was seen; denied flows are not allowed, and are listed. `ambit policy simulate` on the
output, over the same records, shows no observed flow newly denied.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.simulate import Observed, destination_workload, judge
from ambit.cluster import selects
from ambit.peers import serving_waypoint
from ambit.snapshot import Snapshot, Workload
from ambit.spiffe import SpiffeError, SpiffeId

# Labels a controller puts on each pod (they differ between the pods of one workload).
POD_SPECIFIC_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "pod-template-generation",
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-name", "controller-uid", "job-name",
})
# Tried alone first, in this order, to select a workload.
SELECTOR_KEYS = ("app.kubernetes.io/name", "app", "k8s-app", "name", "component")
_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{12,})$")


def generalize_path(path: str) -> str:
    """`/api/v1/charges/7` -> `/api/v1/charges/*`: from the first id-like segment on, a prefix."""
    segs = path.split("/")
    for i, seg in enumerate(segs):
        if i > 0 and _ID_SEGMENT.match(seg):
            return "/".join(segs[:i]) + "/*"
    return path


def collapse_paths(paths: Iterable[str]) -> list[str]:
    """Generalized paths without those a prefix among them already covers."""
    out = {generalize_path(p) for p in paths}
    prefixes = [p[:-1] for p in out if p.endswith("/*")]
    return sorted(p for p in out if p.endswith("/*") or not any(p.startswith(x) for x in prefixes))


def stable_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(labels.items()) if k not in POD_SPECIFIC_LABELS}


def _principal(identity: str | None) -> str | None:
    if not identity:
        return None
    try:
        sid = SpiffeId.parse(identity)
    except SpiffeError:
        return None
    return sid.principal


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "?"


@dataclass
class _Source:
    """What one source (a principal, or a plaintext address) was seen doing to one workload."""

    pods: set[str] = field(default_factory=set)
    ports: dict[int, int] = field(default_factory=dict)  # connections by port
    requests: dict[str, set[str]] = field(default_factory=dict)  # methods by path
    request_ports: set[int] = field(default_factory=set)
    n_requests: int = 0
    last: float = 0.0

    def operations(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        if self.ports:
            ops.append({"operation": {"ports": [str(p) for p in sorted(self.ports)]}})
        by_methods: dict[tuple[str, ...], list[str]] = {}
        for path in collapse_paths(self.requests):
            methods: set[str] = set()
            for p, ms in self.requests.items():
                if generalize_path(p) == path or (path.endswith("/*") and p.startswith(path[:-1])):
                    methods |= ms
            by_methods.setdefault(tuple(sorted(methods)), []).append(path)
        for method_set, paths in sorted(by_methods.items()):
            op: dict[str, Any] = {}
            if self.request_ports:
                op["ports"] = [str(p) for p in sorted(self.request_ports)]
            op["methods"] = list(method_set)
            op["paths"] = sorted(paths)
            ops.append({"operation": op})
        return ops


@dataclass
class Suggestion:
    """One AuthorizationPolicy: the workload it selects and a rule per group of sources."""

    name: str
    namespace: str
    workload: str  # what the comments call it: its selector's value or its pod
    pods: list[str]
    selector: dict[str, str]
    rules: list[tuple[list[str], dict[str, Any]]]  # (comment lines, rule)
    flows: int
    first: float
    last: float
    denied: dict[str, int] = field(default_factory=dict)  # source -> denied flows, not allowed
    notes: list[str] = field(default_factory=list)

    def to_object(self) -> dict[str, Any]:
        return {
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "annotations": {"ambit.dev/suggested-by": "ambit policy suggest"}},
            "spec": {"selector": {"matchLabels": dict(self.selector)}, "action": "ALLOW",
                     "rules": [r for _, r in self.rules]},
        }


@dataclass
class Suggestions:
    namespace: str
    policies: list[Suggestion]
    unselectable: list[str]  # workloads with traffic but no label to select them by
    quiet: list[str]  # workloads of the namespace with no allowed traffic recorded
    flows: int
    nodes: list[str]
    first: float
    last: float


def _group_key(w: Workload) -> tuple[str, tuple[tuple[str, str], ...], str]:
    return w.namespace, tuple(stable_labels(w.labels).items()), w.service_account


def _selector(labels: dict[str, str], key: tuple[str, tuple[tuple[str, str], ...], str],
              others: Iterable[Workload]) -> dict[str, str]:
    """The fewest labels that select this workload's pods and no other workload's."""
    others = [w for w in others if _group_key(w) != key]
    for k in SELECTOR_KEYS:
        if k in labels:
            cand = {k: labels[k]}
            if not any(selects(cand, w.labels) for w in others):
                return cand
    return dict(labels)


def _name(base: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-") or "workload"
    return f"{base[:48].rstrip('-')}-allow-observed"


def suggest(observed: Iterable[Observed], snap: Snapshot, namespace: str) -> Suggestions:
    """Policies for the workloads of `namespace` from the recorded flows into them."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...], str], dict[str, Any]] = {}
    flows, nodes, first, last = 0, set(), 0.0, 0.0
    for obs in observed:
        if not obs.dst_workload or not obs.dst_workload.startswith(f"{namespace}/"):
            continue
        if obs.kind == "conn" and obs.direction not in ("inbound", "inbound_plaintext"):
            continue  # the outbound twin of a connection: judged (and recorded) at its destination
        if obs.kind not in ("conn", "request"):
            continue
        dst = destination_workload(snap, obs)
        if dst is None:
            continue
        flows += obs.count
        nodes.add(obs.node)
        first = min(first, obs.first) if first else obs.first
        last = max(last, obs.last)
        g = groups.setdefault(_group_key(dst), {"workloads": {}, "sources": {}, "denied": {}, "flows": 0,
                                                "first": obs.first, "last": obs.last})
        g["workloads"][dst.uid] = dst
        g["first"] = min(g["first"], obs.first)
        g["last"] = max(g["last"], obs.last)
        # allowed by the policies in force today (as `simulate` judges it; the verdict recorded
        # when the replay cannot judge it): a flow denied today is not made allowed
        today = judge(obs, snap)
        if not (today.allowed if not isinstance(today, str) else obs.verdict == "allow"):
            g["denied"][obs.source] = g["denied"].get(obs.source, 0) + obs.count
            continue
        principal = _principal(obs.src_identity) if obs.mtls or obs.kind == "request" else None
        if obs.kind == "conn" and principal is not None and serving_waypoint(
                snap, SpiffeId.parse(str(obs.src_identity)), dst) is not None:
            continue  # from its waypoint, which enforces with the client's identity (its requests below)
        who = f"principal:{principal}" if principal else (f"ip:{obs.src_ip}" if obs.src_ip else None)
        if who is None or obs.dst_port is None:
            continue
        g["flows"] += obs.count
        src: _Source = g["sources"].setdefault(who, _Source())
        if obs.src_workload:
            src.pods.add(obs.src_workload)
        src.last = max(src.last, obs.last)
        if obs.kind == "request" and obs.route != "waypoint_tcp":  # opaque TCP: a port rule
            src.requests.setdefault(obs.path or "/", set()).add((obs.method or "GET").upper())
            src.request_ports.add(obs.dst_port)
            src.n_requests += obs.count
        else:
            src.ports[obs.dst_port] = src.ports.get(obs.dst_port, 0) + obs.count
    everyone = [w for w in snap.workloads.values() if w.namespace == namespace]
    policies: list[Suggestion] = []
    unselectable: list[str] = []
    used_names: set[str] = set()
    for key, g in sorted(groups.items(), key=lambda kv: sorted(kv[1]["workloads"])):
        pods = sorted(g["workloads"])
        labels = stable_labels(next(iter(g["workloads"].values())).labels)
        if not g["sources"]:
            continue  # only denied flows: nothing to allow (the workload keeps what applies today)
        if not labels:
            unselectable.append(", ".join(pods))
            continue
        selector = _selector(labels, key, everyone)
        base = next((selector[k] for k in SELECTOR_KEYS if k in selector), pods[0].split("/", 1)[1])
        name = _name(base)
        n = 2
        while name in used_names:
            name = _name(f"{base}-{n}")
            n += 1
        used_names.add(name)
        policies.append(Suggestion(
            name=name, namespace=namespace, workload=base, pods=pods, selector=selector,
            rules=_rules(g["sources"]), flows=g["flows"], first=g["first"], last=g["last"],
            denied=dict(sorted(g["denied"].items())),
        ))
    seen = {uid for g in groups.values() for uid in g["workloads"]}
    quiet = sorted(w.uid for w in everyone if w.enrolled and w.uid not in seen
                   and not w.labels.get("gateway.networking.k8s.io/gateway-name"))
    return Suggestions(namespace, policies, unselectable, quiet, flows, sorted(nodes), first, last)


def _rules(sources: Mapping[str, _Source]) -> list[tuple[list[str], dict[str, Any]]]:
    """One rule per set of sources doing the same (same ports and requests), sources sorted."""
    by_ops: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    for who in sorted(sources):
        ops = sources[who].operations()
        by_ops.setdefault(repr(ops), (ops, []))[1].append(who)
    out = []
    for ops, whos in by_ops.values():
        principals = [w.split(":", 1)[1] for w in whos if w.startswith("principal:")]
        ips = [w.split(":", 1)[1] for w in whos if w.startswith("ip:")]
        froms: list[dict[str, Any]] = []
        if principals:
            froms.append({"source": {"principals": principals}})
        if ips:
            froms.append({"source": {"ipBlocks": ips}})
        comments = []
        for who in whos:
            s = sources[who]
            kind, ident = who.split(":", 1)
            label = f"{', '.join(sorted(s.pods))} ({ident})" if s.pods else ident
            if kind == "ip":
                label += ", plaintext: its address, which may change"
            seen = []
            if s.ports:
                seen.append(f"{_n(sum(s.ports.values()), 'connection')} to port{'s' if len(s.ports) > 1 else ''} "
                            f"{', '.join(str(p) for p in sorted(s.ports))}")
            if s.requests:
                seen.append(f"{_n(s.n_requests, 'request')} ({_n(len(s.requests), 'distinct path')})")
            comments.append(f"{label}: {'; '.join(seen)}, last at {_when(s.last)}")
        out.append((comments, {"from": froms, "to": ops}))
    return out


def render(s: Suggestions, command: str) -> str:
    """The policies as commented YAML (a stream of documents `ambit local apply` and kubectl take)."""
    lines = [
        f"# Least-privilege AuthorizationPolicies for namespace {s.namespace}, suggested by",
        f"#   {command}",
        f"# from {s.flows} recorded flows (nodes: {', '.join(s.nodes) or '-'}) between {_when(s.first)} "
        f"and {_when(s.last)}.",
        "# Each policy allows its workload only the sources, ports, methods and paths seen; once",
        "# applied, anything else to it is denied (Istio's default deny under an ALLOW policy).",
        "# Check what it would change before applying:  ambit policy simulate -f FILE",
    ]
    if not s.policies:
        lines.append("# No allowed traffic into this namespace was recorded: nothing to suggest.")
    for w in s.unselectable:
        lines.append(f"# Not written: {w} has traffic but no labels to select it by; label its pods first.")
    if s.quiet:
        lines.append(f"# No traffic recorded to: {', '.join(s.quiet)} (no policy written for them; an ALLOW")
        lines.append("# policy with no rules would deny everything to them).")
    for p in s.policies:
        lines.append("---")
        lines.append(f"# {p.workload} (pods: {', '.join(p.pods)}): {_n(p.flows, 'allowed flow')}, "
                     f"{_when(p.first)} to {_when(p.last)}")
        for src, n in p.denied.items():
            lines.append(f"# not allowed here: {_n(n, 'flow')} from {src}, denied today")
        obj = p.to_object()
        head = {k: obj[k] for k in ("apiVersion", "kind", "metadata")}
        lines += yaml.safe_dump(head, sort_keys=False).rstrip("\n").split("\n")
        lines.append("spec:")
        lines += _indent(yaml.safe_dump({"selector": obj["spec"]["selector"], "action": "ALLOW"},
                                        sort_keys=False), 2)
        lines.append("  rules:")
        for comments, rule in p.rules:
            lines += [f"  # {c}" for c in comments]
            lines += _indent(yaml.safe_dump([rule], sort_keys=False), 2)
    return "\n".join(lines) + "\n"


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _indent(text: str, n: int) -> list[str]:
    return [" " * n + ln for ln in text.rstrip("\n").split("\n")]
