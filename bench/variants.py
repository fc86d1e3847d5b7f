"""The rows of the benchmark: each a path from a client pod to a server pod, and what it costs.

A `Variant` says which client pod runs the load, where it connects (`start`
brings up what the path needs through the `Rig`, once, and returns the address),
which proxies' cgroups are its cost (CPU, PSS), which kind of traffic it
carries (`tcp`: the byte-stream metrics; `http`: requests; the direct row both, as
the floor of each), and which HAProxy
row it is compared with. The harness runs every chosen variant interleaved.

The ingress rows (`ambit-gateway`, `haproxy-https`) are `https`: the client, in
the plain pod `clp` (outside the mesh), speaks HTTPS to bench/edge.py's hostname
and certificate, which both serve from the gateway's pod `gw` on node A.

Adding a row: write a `start(rig)` that launches it through `rig.topo.spawn(name,
netns, argv, cgroup=...)` in its own cgroup (a method of `Rig`, run `once`), waits
for it, and returns the address the client connects to; then `register(Variant(...))`
with its proxies' cgroups and its HAProxy counterpart as `baseline`.
`python -m bench.run --only NAME,BASELINE` runs just those (and direct).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bench.rig import SERVER_PORT, Rig

Kind = Literal["tcp", "http"]


@dataclass(frozen=True)
class Variant:
    name: str
    title: str  # the table's row label
    kinds: tuple[Kind, ...]
    client: str  # the client pod
    start: Callable[[Rig], tuple[str, int]]  # brings the path up; the address the client connects to
    proxies: tuple[str, ...] = ()  # cgroups whose CPU and PSS are the path's cost
    baseline: str | None = None  # the HAProxy row it is compared with
    about: str = ""  # one paragraph for the README: what the row is
    # False when its proxies are another row's processes (memory is measured once, on fresh ones)
    own_processes: bool = True
    # HTTP over TLS to bench/edge.py's hostname (the ingress rows); plain HTTP otherwise
    https: bool = False


VARIANTS: dict[str, Variant] = {}


def register(v: Variant) -> Variant:
    VARIANTS[v.name] = v
    return v


def _direct(rig: Rig) -> tuple[str, int]:
    return rig.server("srp")


def _ambit(server: str, *, iptables: bool = False, waypoint: bool = False) -> Callable[[Rig], tuple[str, int]]:
    def start(rig: Rig) -> tuple[str, int]:
        rig.ztunnels()
        if iptables:
            rig.iptables()
        if waypoint:
            rig.waypoint()
        return rig.server(server)

    return start


def _haproxy(name: str, port: int, threads: int | None) -> Callable[[Rig], tuple[str, int]]:
    return lambda rig: rig.haproxy_tcp(name, port, threads)


register(Variant(
    "direct", "direct TCP (no proxy)", ("tcp", "http"), "clp", _direct,
    about="The floor: the client pod talks to the server pod over the veths and the two "
          "nodes' forwarding, with no proxy and no capture.",
))
register(Variant(
    "ambit", "ambit: eBPF → ztunnel A → HBONE → ztunnel B", ("tcp",), "cli", _ambit("srv"),
    proxies=("zta", "ztb"), baseline="haproxy",
    about="ambit's production path: the client's connect is redirected by the cgroup/connect4 "
          "program to ztunnel A, which opens an HTTP/2 CONNECT stream on a pooled mTLS "
          "connection to ztunnel B, which dials the server pod (STRICT: TC and cgroup_skb "
          "programs on both nodes drop anything that bypasses it).",
))
register(Variant(
    "haproxy", "HAProxy mTLS pair, nbthread 1", ("tcp",), "clp", _haproxy("haproxy", 16001, 1),
    proxies=("haproxy-a", "haproxy-b"),
    about="HAProxy 2.6 (C, OpenSSL) as the same two-hop mutual-TLS tunnel between the same "
          "namespaces: plain TCP in on node A, TLS 1.3 with the same CA, key type and cipher "
          "suite to node B, plain TCP to the server. One TLS connection per client connection "
          "(HAProxy does not multiplex TCP), one thread per process.",
))
register(Variant(
    "haproxy-mt", "HAProxy mTLS pair, default threads", ("tcp",), "clp",
    _haproxy("haproxy-mt", 16002, None), proxies=("haproxy-mt-a", "haproxy-mt-b"),
    about="The same HAProxy pair at its default thread count (one per CPU).",
))
register(Variant(
    "ambit-iptables", "ambit, iptables REDIRECT instead of eBPF", ("tcp",), "clt",
    _ambit("srv", iptables=True), proxies=("zta", "ztb"), baseline="haproxy", own_processes=False,
    about="The same ztunnels, but the client pod's traffic is captured the classic way: a nat "
          "PREROUTING REDIRECT on its node (the ztunnel reads SO_ORIGINAL_DST from conntrack). "
          "The difference to `ambit` is the cost of the redirect alone.",
))
register(Variant(
    "ambit-same-node", "ambit same node (ztunnel A only)", ("tcp",), "cli", _ambit("srva"),
    proxies=("zta",), baseline="haproxy", own_processes=False,
    about="Client and server on node A: one ztunnel, no TLS inside the process, the "
          "destination's inbound policy still checked.",
))
register(Variant(
    "ambit-waypoint", "ambit through a waypoint (HTTP/1.1)", ("http",), "cli",
    _ambit("srw", waypoint=True), proxies=("zta", "wpx", "ztb"), baseline="haproxy-http",
    about="HTTP/1.1 requests to a server that uses a waypoint: ztunnel A → HBONE → the "
          "waypoint (`ambit waypoint run` in its pod on node B, parsing and deciding every "
          "request) → HBONE → ztunnel B → server.",
))
register(Variant(
    "haproxy-http", "HAProxy three hops, mode http in the middle", ("http",), "clp",
    lambda rig: rig.haproxy_http("haproxy-http", 16003),
    proxies=("haproxy-http-a", "haproxy-http-w", "haproxy-http-b"),
    about="The waypoint's counterpart: HAProxy in TCP mode with mTLS out on node A, "
          "HAProxy `mode http` with mTLS in and out in the waypoint's pod, HAProxy with mTLS "
          "in on node B; one thread each.",
))

register(Variant(
    "ambit-gateway", "ambit ingress gateway (HTTPS in, HBONE to ztunnel B)", ("http",), "clp",
    lambda rig: rig.gateway(), proxies=("gwx", "ztb"), baseline="haproxy-https", https=True,
    about="An outside client (not in the mesh) sends HTTPS requests (TLS 1.3, SNI) to `ambit gateway "
          "run` in its pod on node A: a Gateway of class `ambit-ingress` terminating TLS for the "
          "hostname, deciding each request (the route, an IP restriction; no JWT, no rate limit) "
          "and handing it over HBONE, with the gateway's own identity, to ztunnel B → server.",
))
register(Variant(
    "haproxy-https", "HAProxy mode http edge (HTTPS in) → HAProxy on node B", ("http",), "clp",
    lambda rig: rig.haproxy_https("haproxy-https", 16004), proxies=("haproxy-https-g", "haproxy-https-b"),
    https=True,
    about="The gateway's counterpart: HAProxy `mode http` in the gateway's pod terminating the same "
          "TLS (same certificate and key, TLS 1.3, same suite), with the same IP restriction, "
          "mTLS to HAProxy in TCP mode on node B, plain TCP to the server; one thread each.",
))

# the metrics, by kind (every variant's JSON has every key; null where it does not apply)
TCP_METRICS = (
    "throughput_1conn_MBps", "throughput_8conn_MBps",
    "latency_p50_us_64B", "latency_p99_us_64B", "latency_p50_us_1KiB", "latency_p99_us_1KiB",
    "latency_p50_us_64B_fixed", "latency_p99_us_64B_fixed",
    "latency_p50_us_1KiB_fixed", "latency_p99_us_1KiB_fixed",
    "connect_us", "conns_per_s", "cpu_s_per_GB", "cpu_s_per_GB_8conn",
    "cpu_us_per_rtt_64B",  # the proxies' CPU per 64-byte round trip (back to back)
    # connect + first byte with few (10) and many (2000) idle connections open, and their ratio
    "connect_us_few_open", "connect_us_many_open", "connect_growth",
    "pss_idle_MiB", "pss_MiB_1k", "pss_MiB_5k", "pss_KiB_per_conn",
)
HTTP_METRICS = ("requests_per_s", "request_p50_us", "request_p99_us")
ALL_METRICS = TCP_METRICS + HTTP_METRICS
# more is better for these; less for every other metric
HIGHER_IS_BETTER = frozenset({"throughput_1conn_MBps", "throughput_8conn_MBps", "conns_per_s", "requests_per_s"})
__all__ = ["ALL_METRICS", "HIGHER_IS_BETTER", "HTTP_METRICS", "SERVER_PORT", "TCP_METRICS", "VARIANTS", "Variant", "register"]
