"""The ingress rows' parts without the benchmark: the edge's objects compile into the gateway's
view, HAProxy accepts its edge configuration, and the load generator's HTTPS (TLS 1.3 only,
the suite checked) against a loopback server with the edge's certificate."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambit.cluster import build_state, load_documents
from bench import edge, haproxy, load
from bench.rig import cluster_yaml
from bench.topology import Topology
from gateway.view import build_view
from tests.tools import tool


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return edge.write_tls(tmp_path_factory.mktemp("edge"))


@pytest.mark.unit
def test_edge_objects_make_a_gateway_with_one_https_listener_and_its_route(tls: dict[str, Path]) -> None:
    topo = Topology(tag="abcdef")
    objects = edge.cluster_yaml(tls, gateway_ip=topo.pod_ip("gw"), server_ns="bench", server="srv",
                                server_port=8080)
    state = build_state(load_documents(cluster_yaml(topo)) + load_documents(objects))
    view = build_view(state, edge.NAMESPACE, edge.GATEWAY)
    assert view.errors == ()
    assert str(view.identity) == "spiffe://cluster.local/ns/edge/sa/ingress"
    assert view.subject is not None and view.subject.ip == topo.pod_ip("gw")
    assert view.gateway is not None
    (port,) = view.gateway.ports.values()
    assert (port.port, port.protocol, port.listeners[0].hostname) == (edge.PORT, "HTTPS", edge.HOSTNAME)
    (route,) = view.routes["https"]
    assert [(b.name, b.port) for b in route.rules[0].backends] == [("srv", 80)]


@pytest.mark.unit
def test_haproxy_accepts_the_edge_configuration(tls: dict[str, Path], tmp_path: Path) -> None:
    exe = tool("haproxy", "haproxy")
    from controlplane.pki import CaMaterial

    haproxy.write_certs(CaMaterial.generate("cluster.local"), tmp_path)
    cfg = tmp_path / "edge.cfg"
    cfg.write_text(haproxy.https_edge(("127.0.0.1", 16004), ("127.0.0.2", 16004), tls["pem"],
                                      haproxy.cert_paths(tmp_path), 1, edge.ALLOWED_CLIENTS))
    r = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def https_server(tls: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """bench.load's HTTP answer behind TLS with the edge's certificate (TLS 1.2 only when asked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls["pem"])
    if getattr(request, "param", None) == "tls1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(c,), daemon=True).start()

    def one(c: socket.socket) -> None:
        try:
            with ctx.wrap_socket(c, server_side=True) as t:
                load.Server._http(t, bytearray())
        except (OSError, ssl.SSLError):
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield lsock.getsockname()[:2]
    finally:
        stop.set()
        lsock.close()


def _client_tls(tls: dict[str, Path], cipher: str = haproxy.CIPHERSUITE) -> dict[str, str]:
    return {"server_name": edge.HOSTNAME, "ca": str(tls["ca"]), "cipher": cipher}


@pytest.mark.integration
def test_https_requests_and_rate(tls: dict[str, Path], https_server: tuple[str, int]) -> None:
    host, port = https_server
    c = load.Client()
    r = c.http(host, port, count=20, authority=edge.HOSTNAME, tls=_client_tls(tls))
    assert r["n"] == 20 and r["p50"] > 0
    q = c.http_rate(host, port, seconds=0.2, concurrency=2, authority=edge.HOSTNAME, tls=_client_tls(tls))
    assert q["count"] > 0


@pytest.mark.integration
def test_another_suite_than_the_rows_is_refused(tls: dict[str, Path], https_server: tuple[str, int]) -> None:
    host, port = https_server
    with pytest.raises(ConnectionError, match=r"TLS_AES_256_GCM_SHA384, not TLSv1\.3 TLS_CHACHA20"):
        load.Client().http(host, port, count=1, authority=edge.HOSTNAME,
                           tls=_client_tls(tls, "TLS_CHACHA20_POLY1305_SHA256"))


@pytest.mark.integration
@pytest.mark.parametrize("https_server", ["tls1.2"], indirect=True)
def test_tls_below_1_3_is_refused(tls: dict[str, Path], https_server: tuple[str, int]) -> None:
    host, port = https_server
    with pytest.raises(ssl.SSLError):
        load.Client().http(host, port, count=1, authority=edge.HOSTNAME, tls=_client_tls(tls))
