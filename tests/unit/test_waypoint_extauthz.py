"""Extension providers (waypoint/extauthz.py): their configuration, and both wire formats, without I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from waypoint import WaypointError
from waypoint.exchange import Request
from waypoint.extauthz import (
    CheckRequest,
    ExtAuthz,
    Provider,
    ProviderError,
    _fields,
    _sub,
    grpc_check_request,
    grpc_check_result,
    http_check_request,
    http_check_result,
    parse_mesh_config,
    parse_provider_flag,
)

MESH = """
extensionProviders:
- name: authz
  envoyExtAuthzHttp:
    service: foo/authz.foo.svc.cluster.local
    port: "8000"
    pathPrefix: /check
    timeout: 250ms
    statusOnError: "503"
    includeRequestHeadersInCheck: [X-User]
    includeAdditionalHeadersInCheck: {x-from: waypoint}
- name: g
  envoyExtAuthzGrpc: {service: 10.0.0.1, port: 9000}
- name: otel
  opentelemetry: {service: otel.svc, port: 4317}
"""


def test_mesh_config_and_the_istio_configmap_holding_it() -> None:
    http, grpc = parse_mesh_config(MESH)
    assert (http.kind, http.host, http.port, http.path_prefix, http.timeout, http.status_on_error) == (
        "http", "authz.foo.svc.cluster.local", 8000, "/check", 0.25, 503)
    assert http.include_request_headers == ("x-user",) and http.include_additional_headers == (("x-from", "waypoint"),)
    assert (grpc.kind, grpc.port, grpc.timeout, grpc.fail_open) == ("grpc", 9000, 600.0, False)
    cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio}\ndata:\n  mesh: |\n" + "".join(
        f"    {line}\n" for line in MESH.strip().splitlines())
    assert [p.name for p in parse_mesh_config(cm)] == ["authz", "g"]


@pytest.mark.parametrize(("text", "why"), [
    ("extensionProviders:\n- envoyExtAuthzHttp: {service: a, port: 1}", "needs a `name`"),
    ("extensionProviders:\n- {name: a, envoyExtAuthzHttp: {port: 1}}", "service is required"),
    ("extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a, port: 0}}", "is not a port"),
    ("extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a, port: 1, timeout: soon}}", "not a duration"),
    ("extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a, port: 1, statusOnError: '200'}}", "4xx/5xx"),
    ("extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a, port: 1, pathPrefix: x}}", "start with /"),
    ("extensionProviders:\n- {name: a, envoyExtAuthzGrpc: {service: a, port: 1}}\n"
     "- {name: a, envoyExtAuthzGrpc: {service: b, port: 1}}", "names repeat"),
    ("extensionProviders: {name: a}", "must be a list"),
])
def test_bad_mesh_config(text: str, why: str) -> None:
    with pytest.raises(ProviderError, match=why):
        parse_mesh_config(text)


def test_provider_flag() -> None:
    p = parse_provider_flag("ext=http://authz.foo.svc.cluster.local:8000/check/")
    assert (p.name, p.kind, p.host, p.port, p.path_prefix) == ("ext", "http", "authz.foo.svc.cluster.local", 8000,
                                                               "/check")
    assert parse_provider_flag("g=grpc://10.0.0.1:9000").describe() == "g=grpc://10.0.0.1:9000"
    for bad in ("nope", "x=ftp://a:1", "x=grpc://a", "=http://a:1"):
        with pytest.raises(ProviderError):
            parse_provider_flag(bad)


REQ = CheckRequest("PUT", "/a/b?c=d", "web.shop", "http", "HTTP/2",
                   [("authorization", "Bearer t"), ("x-user", "bob"), ("cookie", "s=1")],
                   "10.0.0.5", "spiffe://cluster.local/ns/shop/sa/c", "10.0.0.9", 8080, None)


def test_http_check_request_sends_what_envoy_sends() -> None:
    p = Provider("a", "http", "authz", 80, path_prefix="/check", include_request_headers=("x-user",))
    r = http_check_request(p, REQ)
    assert (r.method, r.target) == (b"PUT", b"/check/a/b?c=d")
    headers = {k.decode(): v.decode() for k, v in r.headers}
    assert headers == {"host": "web.shop", "authorization": "Bearer t", "x-user": "bob", "content-length": "0",
                       "connection": "close"}


def test_http_check_results() -> None:
    p = Provider("a", "http", "authz", 80, headers_to_upstream_on_allow=("x-id",))
    ok = http_check_result(p, 200, [("x-id", "7"), ("x-envoy-auth-headers-to-remove", "Authorization, cookie"),
                                    ("connection", "close")], b"")
    assert ok.allowed and ok.upstream_headers == (("x-id", "7"),) and ok.remove_headers == ("authorization", "cookie")
    no = http_check_result(p, 302, [("location", "/login"), ("transfer-encoding", "chunked"), ("content-length", "2")],
                           b"go")
    assert not no.allowed and no.deny_status == 403 and no.body == b"go"
    assert no.response_headers == (("location", "/login"),)  # all but hop-by-hop and framing
    assert http_check_result(p, 429, [], b"").deny_status == 429


def test_grpc_messages_round_trip_by_field_number() -> None:
    msg = grpc_check_request(REQ, now=1.5)
    (attributes,) = [v for n, v in _fields(msg) if n == 1]
    assert isinstance(attributes, bytes)
    parts = dict(_fields(attributes))
    assert set(parts) == {1, 2, 4}
    # CheckResponse{status{code 7}, denied_response{status{401}, headers[{header{x, y}}], body "no"}}
    hv = b"\x0a\x01x\x12\x01y"
    denied = b"\x0a\x03\x08\x91\x03" + b"\x12" + bytes([len(hv) + 2]) + b"\x0a" + bytes([len(hv)]) + hv + b"\x1a\x02no"
    res = grpc_check_result(Provider("g", "grpc", "a", 1), b"\x0a\x02\x08\x07" + b"\x12" + bytes([len(denied)]) + denied)
    assert (res.allowed, res.status, res.deny_status, res.body, res.response_headers) == (
        False, 7, 401, b"no", (("x", "y"),))
    assert grpc_check_result(Provider("g", "grpc", "a", 1), b"").allowed  # no status: OK
    with pytest.raises(ValueError):
        grpc_check_result(Provider("g", "grpc", "a", 1), b"\x0a\x05\x08")


def test_the_provider_is_told_the_normalized_target_the_app_gets() -> None:
    # review 14: `/ext/public/../admin` was sent raw, so a provider allowing /ext/public/*
    # allowed the app's /ext/admin; an absolute-form target put scheme and authority in the path
    p = Provider("a", "http", "authz", 80, path_prefix="/check")
    for raw, path, query, sent in (("/ext/public/../admin", "/ext/admin", None, "/ext/admin"),
                                   ("http://evil/ext/public/x?q=1", "/ext/public/x", "q=1", "/ext/public/x?q=1")):
        req = Request("GET", "http", "web.shop", raw, path, query, [("x", "1")], "HTTP/1.1")
        check = CheckRequest.of(req, source_ip="10.0.0.5", source_principal=None, destination_ip="10.0.0.9",
                                destination_port=80, destination_principal=None)
        assert check.target == sent
        assert http_check_request(p, check).target == f"/check{sent}".encode()
        (attributes,) = [v for n, v in _fields(grpc_check_request(check, now=1.0)) if n == 1]
        assert isinstance(attributes, bytes)
        request = _sub(attributes, 4)
        assert request is not None
        http = _sub(request, 2)
        assert http is not None and _sub(http, 4) == sent.encode()


def test_obs_text_headers_are_sent_as_received() -> None:
    # review 14: `Authorization: Basic é` made building the h11 request raise, and that was
    # taken for "provider down" (failOpen let it through)
    req = replace(REQ, headers=[("authorization", b"Basic \xc3\xa9 \xff".decode("utf-8", "surrogateescape"))])
    r = http_check_request(Provider("a", "http", "authz", 80), req)
    assert dict(r.headers)[b"authorization"] == b"Basic \xc3\xa9 \xff"
    grpc_check_request(req, now=1.0).decode("latin-1")  # valid protobuf strings: U+FFFD for the bad byte
    assert "Basic é \ufffd".encode() in grpc_check_request(req, now=1.0)


def _no_endpoints(host: str, port: int) -> tuple[str, int]:
    raise WaypointError(f"Service {host} has no endpoints for port {port}")


async def test_only_the_provider_failing_is_failopen_a_local_error_denies() -> None:
    p = Provider("open", "http", "authz.pay.svc", 9000, timeout=2.0, fail_open=True,
                 headers_to_upstream_on_allow=("x-authz-user",))
    authz = ExtAuthz([p], resolve=_no_endpoints)
    down = await authz.check("open", REQ)  # the provider cannot be reached: failOpen
    assert down.allowed and "failOpen" in down.reason
    assert down.remove_headers == ("x-authz-user",)  # the client's own copy never reaches the app
    # a value h11 cannot frame: never sent, and never failOpen
    bad = await authz.check("open", replace(REQ, headers=[("authorization", "a\r\nx-injected: 1")]))
    assert not bad.allowed and bad.deny_status == 403 and "cannot build" in bad.reason
    strict = ExtAuthz([replace(p, fail_open=False, status_on_error=503)], resolve=_no_endpoints)
    assert (await strict.check("open", REQ)).deny_status == 503
