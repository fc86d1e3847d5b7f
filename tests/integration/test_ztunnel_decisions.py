"""The ztunnel's pure parts by table: outbound routing, inbound checks, SOCKS5, SO_ORIGINAL_DST, flags."""

from __future__ import annotations

import socket
import struct

import pytest

from ambit.cluster import build_state, load_documents
from ambit.peers import client_address
from ambit.snapshot import Snapshot, build_snapshot
from ambit.spiffe import SpiffeId
from tests.integration.ztunnel_harness import NAMESPACES, node_yaml, pod_yaml, service_yaml
from ztunnel import socks5
from ztunnel.config import ConfigError, Listen, parse_listen
from ztunnel.conntrack import Route
from ztunnel.hbone.wire import BadRequest, parse_authority
from ztunnel.inbound import check_inbound
from ztunnel.origdst import OrigDstError, parse_sockaddr
from ztunnel.outbound import plan_outbound, resolve_name
from ztunnel.refusal import Refusal

HBONE, LOCAL, PASSTHROUGH, REFUSE = Route.HBONE, Route.LOCAL, Route.PASSTHROUGH, Route.REFUSE

STRICT = """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {"9090": {mode: PERMISSIVE}}}
"""


def snap(node: str = "node-a", extra: str = "") -> Snapshot:
    text = NAMESPACES + node_yaml("node-a", "10.0.0.11") + node_yaml("node-b", "10.0.0.12")
    text += pod_yaml("shop", "client", "node-a", "client", "10.1.0.1")
    text += pod_yaml("shop", "local", "node-a", "local", "10.1.0.2")
    text += pod_yaml("shop", "web-0", "node-b", "web", "10.2.0.1", {"app": "web"})
    text += pod_yaml("shop", "web-1", "node-b", "web", "10.2.0.2", {"app": "web"})
    text += pod_yaml("legacy", "old", "node-b", "default", "10.2.0.9")
    text += service_yaml("shop", "web", "10.96.0.10", {"app": "web"}, 80, 8080)
    text += service_yaml("shop", "empty", "10.96.0.11", {"app": "none"}, 80, 8080)
    return build_snapshot(build_state(load_documents(text + extra)), node)


@pytest.mark.parametrize(
    ("src", "dst", "port", "kind", "final"),
    [
        ("10.1.0.1", "10.2.0.1", 8080, HBONE, ("10.2.0.1", 8080)),
        ("10.1.0.1", "10.1.0.2", 7000, LOCAL, ("10.1.0.2", 7000)),
        ("10.1.0.1", "10.2.0.9", 5432, PASSTHROUGH, ("10.2.0.9", 5432)),
        ("10.1.0.1", "192.0.2.1", 443, PASSTHROUGH, ("192.0.2.1", 443)),
        ("10.1.0.1", "10.96.0.10", 80, HBONE, ("10.2.0.1", 8080)),
        ("10.1.0.1", "10.96.0.10", 81, REFUSE, None),
        ("10.1.0.1", "10.96.0.11", 80, REFUSE, None),
        ("10.9.9.9", "10.2.0.1", 8080, REFUSE, None),
        ("10.2.0.1", "10.1.0.1", 8080, REFUSE, None),  # a pod of another node
        # addresses that mean the node itself when the ztunnel dials them from the node's netns
        ("10.1.0.1", "0.0.0.0", 15000, REFUSE, None),
        ("10.1.0.1", "0.1.2.3", 15010, REFUSE, None),
        ("10.1.0.1", "127.0.0.1", 15000, REFUSE, None),
        ("10.1.0.1", "127.9.9.9", 15000, REFUSE, None),
        ("10.1.0.1", "224.0.0.1", 80, REFUSE, None),
        ("10.1.0.1", "255.255.255.255", 80, REFUSE, None),
    ],
)
def test_plan_outbound(src: str, dst: str, port: int, kind: Route, final: tuple[str, int] | None) -> None:
    p = plan_outbound(snap(), src, dst, port)
    assert p.kind == kind, p.reason
    if final is not None:
        assert (p.dst_ip, p.dst_port) == final
    if kind == HBONE:
        assert p.node_address == "10.0.0.12"
    if kind == REFUSE:
        assert p.refusal is not None and p.reason
    else:
        assert p.refusal is None


def test_loopback_passthrough_only_for_loopback_rigs() -> None:
    assert plan_outbound(snap(), "10.1.0.1", "127.0.0.5", 80).refusal is Refusal.FORBIDDEN_DESTINATION
    assert plan_outbound(snap(), "10.1.0.1", "127.0.0.5", 80, loopback_workloads=True).kind == PASSTHROUGH
    # never the unspecified address, which the kernel would also deliver to the node itself
    assert plan_outbound(snap(), "10.1.0.1", "0.0.0.0", 80, loopback_workloads=True).kind == REFUSE


def test_unenrolled_source_gets_no_identity() -> None:
    """An unenrolled pod that reaches 15001 directly is refused, never proxied with its SA's identity."""
    s = snap(extra=pod_yaml("legacy", "sneaky", "node-a", "default", "10.1.0.9"))
    p = plan_outbound(s, "10.1.0.9", "10.2.0.1", 8080)
    assert p.kind == REFUSE and p.refusal is Refusal.UNKNOWN_SOURCE
    assert "not enrolled" in p.reason


def test_client_address_trust() -> None:
    s = snap()
    client = SpiffeId("cluster.local", "shop", "client")
    # no header: the peer's address
    assert client_address(s, "10.0.0.11", client, None).ip == "10.0.0.11"
    # the client's own identity from the client's node: trusted
    got = client_address(s, "10.0.0.11", client, "10.1.0.1")
    assert got.ip == "10.1.0.1" and got.workload is not None and got.workload.uid == "shop/client"
    # another identity, another node, an unknown address: refused
    assert client_address(s, "10.0.0.11", SpiffeId("cluster.local", "shop", "local"), "10.1.0.1").ip is None
    assert client_address(s, "10.0.0.12", client, "10.1.0.1").ip is None
    assert client_address(s, "10.0.0.11", client, "10.9.9.9").ip is None
    assert client_address(s, "10.0.0.11", None, "10.1.0.1").ip is None


def test_vip_round_robin() -> None:
    s = snap()
    assert {plan_outbound(s, "10.1.0.1", "10.96.0.10", 80, pick=i).dst_ip for i in range(4)} == {"10.2.0.1", "10.2.0.2"}


def test_resolve_name() -> None:
    s = snap()
    assert resolve_name(s, "web.shop.svc.cluster.local") == "10.96.0.10"
    assert resolve_name(s, "web.shop") == "10.96.0.10"
    assert resolve_name(s, "10.2.0.1") == "10.2.0.1"
    assert resolve_name(s, "web.other.svc.cluster.local") is None
    assert resolve_name(s, "example.com") is None


def test_check_inbound() -> None:
    s = snap("node-b", STRICT)
    assert s.errors == ()
    client = SpiffeId("cluster.local", "shop", "client")
    ok = check_inbound(s, "10.2.0.1", 8080, src_ip="10.0.0.11", src_identity=client, mtls=True)
    assert ok.status == 200
    assert check_inbound(s, "10.1.0.1", 8080, src_ip="x", src_identity=client, mtls=True).status == 400
    assert check_inbound(s, "10.2.0.9", 80, src_ip="x", src_identity=client, mtls=True).status == 400
    wrong_sni = check_inbound(s, "10.2.0.1", 8080, src_ip="10.0.0.11", src_identity=client, mtls=True,
                              tls_identity=SpiffeId("cluster.local", "shop", "other"))
    assert wrong_sni.status == 400 and "TLS connection was opened for" in wrong_sni.reason
    plain = check_inbound(s, "10.2.0.1", 8080, src_ip="10.1.0.1", src_identity=None, mtls=False)
    assert plain.status == 401 and "STRICT" in plain.reason and plain.refusal is Refusal.STRICT_MTLS
    assert check_inbound(s, "10.2.0.1", 9090, src_ip="10.1.0.1", src_identity=None, mtls=False).status == 200


def test_parse_authority() -> None:
    assert parse_authority("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_authority("[fd00::1]:443") == ("fd00::1", 443)
    for bad in ("10.0.0.1", "host:80", "10.0.0.1:0", "10.0.0.1:99999", ":80"):
        with pytest.raises(BadRequest):
            parse_authority(bad)


def test_parse_sockaddr() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.1.2.3") + b"\0" * 8
    assert parse_sockaddr(v4) == ("10.1.2.3", 8080)
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + b"\0" * 4
          + socket.inet_pton(socket.AF_INET6, "fd00::7") + b"\0" * 4)
    assert parse_sockaddr(v6) == ("fd00::7", 443)
    with pytest.raises(OrigDstError):
        parse_sockaddr(b"\x01\x00")
    with pytest.raises(OrigDstError, match="family"):
        parse_sockaddr(struct.pack("=H", 99) + b"\0" * 14)


def test_socks5_handshake() -> None:
    hs = socks5.Socks5Handshake()
    msg = b"\x05\x02\x00\x02" + b"\x05\x01\x00\x03\x05web.x" + struct.pack("!H", 80) + b"payload"
    out, used = hs.feed(msg[:3])
    assert (out, used) == (b"", 0)
    out, used = hs.feed(msg)
    assert out == b"\x05\x00" and msg[used:] == b"payload"
    assert hs.request == socks5.Socks5Request("web.x", 80, True)
    with pytest.raises(socks5.Socks5Error) as e:
        socks5.Socks5Handshake().feed(b"\x05\x01\x02")
    assert e.value.reply == b"\x05\xff"
    with pytest.raises(socks5.Socks5Error, match="command 2") as e:
        socks5.Socks5Handshake().feed(b"\x05\x01\x00\x05\x02\x00\x01" + b"\0" * 6)
    assert e.value.reply[1] == socks5.COMMAND_NOT_SUPPORTED
    with pytest.raises(socks5.Socks5Error, match="not SOCKS5"):
        socks5.Socks5Handshake().feed(b"GET / HTTP/1.1\r\n")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:15000", "--admin") == Listen("127.0.0.1", 15000)
    assert parse_listen("10.0.0.1", "--hbone", 15008) == Listen("10.0.0.1", 15008)
    assert parse_listen("[::1]:80", "--x") == Listen("::1", 80)
    for bad, why in (("host:80", "not an IP"), ("1.2.3.4:x", "not a number"), ("1.2.3.4:70000", "out of range")):
        with pytest.raises(ConfigError, match=why):
            parse_listen(bad, "--hbone")


WAYPOINT = """
---
apiVersion: v1
kind: Namespace
metadata: {name: pay, labels: {ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: pay}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
""" + pod_yaml("pay", "wp-0", "node-b", "wp", "10.2.0.50", {"gateway.networking.k8s.io/gateway-name": "wp"}) \
    + pod_yaml("pay", "charges", "node-b", "charges", "10.2.0.51", {"app": "charges"}) \
    + service_yaml("pay", "charges", "10.96.0.30", {"app": "charges"}, 80, 8080)


def test_traffic_to_a_service_with_a_waypoint_goes_to_the_waypoint() -> None:
    s = snap(extra=WAYPOINT)
    p = plan_outbound(s, "10.1.0.1", "10.96.0.30", 80)
    assert p.kind == Route.WAYPOINT and p.node_address == "10.2.0.50", p.reason
    assert p.waypoint is not None and p.waypoint.uid == "pay/wp"
    # the authority is what the client dialed (the VIP): the waypoint picks the endpoint
    assert (p.dst_ip, p.dst_port) == ("10.96.0.30", 80)
    # a waypoint for services (the default) does not take pod-IP traffic: it goes to the pod's
    # ztunnel, which admits only the waypoint
    direct = plan_outbound(s, "10.1.0.1", "10.2.0.51", 8080)
    assert direct.kind == Route.HBONE
    chk = check_inbound(snap("node-b", WAYPOINT), "10.2.0.51", 8080, src_ip="10.1.0.1",
                        src_identity=SpiffeId("cluster.local", "shop", "client"), mtls=True)
    assert chk.refusal is Refusal.POLICY_DENIED and "must come through it" in chk.reason
    # from the waypoint itself: admitted, its policies were enforced there
    chk = check_inbound(snap("node-b", WAYPOINT), "10.2.0.51", 8080, src_ip="10.1.0.1",
                        src_identity=SpiffeId("cluster.local", "pay", "wp"), mtls=True)
    assert chk.refusal is None and "arrived through waypoint wp" in chk.reason, chk.reason


def test_a_waypoint_for_workloads_takes_pod_ip_traffic() -> None:
    s = snap(extra=WAYPOINT.replace("metadata: {name: wp, namespace: pay}",
                                    "metadata: {name: wp, namespace: pay, labels: {ambit.dev/waypoint-for: all}}"))
    p = plan_outbound(s, "10.1.0.1", "10.2.0.51", 8080)
    assert p.kind == Route.WAYPOINT and p.dst is not None and p.dst.uid == "pay/charges"


def test_a_missing_or_stopped_waypoint_refuses_never_bypasses() -> None:
    gone = snap(extra=WAYPOINT.replace("ambit-waypoint", "something-else"))
    p = plan_outbound(gone, "10.1.0.1", "10.96.0.30", 80)
    assert p.kind == Route.REFUSE and p.refusal is Refusal.WAYPOINT_UNAVAILABLE
    assert "does not exist" in p.reason
    stopped = snap(extra=WAYPOINT.replace("phase: Running", "phase: Failed", 1))
    p = plan_outbound(stopped, "10.1.0.1", "10.96.0.30", 80)
    assert p.kind == Route.REFUSE and p.refusal is Refusal.WAYPOINT_UNAVAILABLE
    assert "no running pod" in p.reason


def test_a_waypoint_may_name_its_client() -> None:
    s = snap("node-b", WAYPOINT)
    wp_id = SpiffeId("cluster.local", "pay", "wp")
    got = client_address(s, "10.2.0.50", wp_id, "10.1.0.1")
    assert got.ip == "10.1.0.1" and "waypoint pay/wp" in got.reason
    # the waypoint's identity from an address that is not one of its pods: refused
    assert client_address(s, "10.2.0.99", wp_id, "10.1.0.1").ip is None
