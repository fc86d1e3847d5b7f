"""HTTPRoutes (gateway/routes.py) and their filters (gateway/filters.py): compiled, attached and
matched as Gateway API specifies; errors that name the object and field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from ambit.cluster import (
    ClusterError,
    Gateway,
    Listener,
    Meta,
    RouteObject,
    TlsSecret,
    build_state,
    parse_object,
)
from gateway.filters import header_ops, redirect_location, rewrite_path, split_host
from gateway.listeners import client_address, compile_gateway
from gateway.routes import CompiledRoute, PathMatch, RouteMatch, compile_route, host_matches, select
from gateway.spec import SpecError


def route(spec: str | dict[str, Any], name: str = "r", ns: str = "edge",
          annotations: dict[str, str] | None = None) -> CompiledRoute:
    body = yaml.safe_load(spec) if isinstance(spec, str) else spec
    return compile_route(RouteObject("HTTPRoute", "gateway.networking.k8s.io/v1",
                                     Meta(name, ns, annotations=annotations or {}), body))


PRECEDENCE = """
parentRefs: [{name: gw}]
rules:
- matches: [{path: {type: PathPrefix, value: /}}]
  backendRefs: [{name: root, port: 80}]
- matches: [{path: {type: PathPrefix, value: /api}}]
  backendRefs: [{name: api, port: 80}]
- matches: [{path: {type: PathPrefix, value: /api/v1}}]
  backendRefs: [{name: v1, port: 80}]
- matches: [{path: {type: Exact, value: /api/v1/health}}]
  backendRefs: [{name: health, port: 80}]
- matches: [{path: {type: RegularExpression, value: "/api/v[0-9]+/items/[0-9]+"}}]
  backendRefs: [{name: item, port: 80}]
- matches: [{path: {type: PathPrefix, value: /api/v1}, method: POST}]
  backendRefs: [{name: v1post, port: 80}]
- matches: [{path: {type: PathPrefix, value: /api/v1}, headers: [{name: X-Canary, value: "yes"}]}]
  backendRefs: [{name: canary, port: 80}]
- matches: [{path: {type: PathPrefix, value: /api/v1}, queryParams: [{name: debug, type: RegularExpression, value: "1|true"}]}]
  backendRefs: [{name: debug, port: 80}]
"""


@pytest.mark.parametrize(("method", "path", "query", "headers", "backend"), [
    ("GET", "/", {}, {}, "root"),
    ("GET", "/apix", {}, {}, "root"),  # element-wise prefixes: /api does not match /apix
    ("GET", "/api", {}, {}, "api"),
    ("GET", "/api/", {}, {}, "api"),
    ("GET", "/api/v1", {}, {}, "v1"),
    ("GET", "/api/v1/orders", {}, {}, "v1"),
    ("GET", "/api/v1/health", {}, {}, "health"),  # Exact beats every prefix
    ("GET", "/api/v2/items/42", {}, {}, "item"),  # a regular expression beats prefixes
    ("GET", "/api/v2/items/x", {}, {}, "api"),
    ("POST", "/api/v1/orders", {}, {}, "v1post"),  # a method match beats header/query matches
    ("GET", "/api/v1/orders", {}, {"x-canary": "yes"}, "canary"),
    ("GET", "/api/v1/orders", {}, {"x-canary": "no"}, "v1"),
    ("GET", "/api/v1/orders", {"debug": "true"}, {}, "debug"),
    ("GET", "/api/v1/orders", {"debug": "2"}, {}, "v1"),
    ("POST", "/api/v1/orders", {"debug": "1"}, {"x-canary": "yes"}, "v1post"),
])
def test_match_precedence(method: str, path: str, query: dict[str, str], headers: dict[str, str],
                          backend: str) -> None:
    sel = select([route(PRECEDENCE)], "shop.example.com", method, path, query, headers)
    assert sel is not None and sel.rule.backends[0].name == backend


def test_hostnames_exact_beats_wildcard_beats_none_and_404_when_nothing_fits() -> None:
    rs = [route({"parentRefs": [{"name": "gw"}], "hostnames": hs,
                 "rules": [{"backendRefs": [{"name": n, "port": 80}]}]}, name=n)
          for n, hs in (("any", []), ("wild", ["*.example.com"]), ("exact", ["api.example.com"]),
                        ("other", ["other.test"]))]
    pick = {h: (s.rule.backends[0].name if (s := select(rs, h, "GET", "/", {}, {})) else None)
            for h in ("api.example.com", "www.example.com", "a.b.example.com", "example.com", "x.test",
                      "other.test")}
    assert pick == {"api.example.com": "exact", "www.example.com": "wild", "a.b.example.com": "wild",
                    "example.com": "any", "x.test": "any", "other.test": "other"}
    only = [r for r in rs if r.name != "any"]
    assert select(only, "x.test", "GET", "/", {}, {}) is None
    assert host_matches("*.example.com", "a.example.com") and not host_matches("*.example.com", "example.com")


def test_attachment_by_parent_section_port_and_namespace() -> None:
    gw = Gateway(Meta("gw", "edge"), "ambit-ingress", (
        Listener("http", 80, "HTTP"),
        Listener("shop", 443, "HTTPS", "shop.example.com"),
        Listener("open", 8080, "HTTP", allowed_routes="All")))
    def attached(r: CompiledRoute) -> list[str]:
        return [lst.name for lst in gw.listeners if r.attaches_to(gw, lst)]
    base = {"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}
    assert attached(route({**base, "parentRefs": [{"name": "gw"}]})) == ["http", "shop", "open"]
    assert attached(route({**base, "parentRefs": [{"name": "gw", "sectionName": "shop"}]})) == ["shop"]
    assert attached(route({**base, "parentRefs": [{"name": "gw", "port": 8080}]})) == ["open"]
    assert attached(route({**base, "parentRefs": [{"name": "other"}]})) == []
    # another namespace: only listeners that allow All
    assert attached(route({**base, "parentRefs": [{"name": "gw", "namespace": "edge"}]}, ns="team")) == ["open"]
    # hostnames that cannot meet the listener's
    assert attached(route({**base, "parentRefs": [{"name": "gw"}], "hostnames": ["x.test"]})) == ["http", "open"]


def test_rules_that_cannot_be_served_answer_500_instead_of_falling_through() -> None:
    r = route("""
parentRefs: [{name: gw}]
rules:
- filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}]
  backendRefs: [{name: s, port: 80}]
- backendRefs: [{name: s, port: 80, namespace: other}]
- backendRefs: [{name: s, port: 80, weight: 0}]
- matches: [{path: {value: /ok}}]
  backendRefs: [{name: s, port: 80}]
""")
    assert ["not supported" in (x.error or "") for x in r.rules] == [True, False, False, False]
    assert "ReferenceGrant" in (r.rules[1].error or "") and "weight 0" in (r.rules[2].error or "")
    assert r.rules[3].error is None


@pytest.mark.parametrize(("spec", "field"), [
    ("rules: [{backendRefs: [{name: s, port: 80}]}]", "spec.parentRefs"),
    ("parentRefs: [{name: gw}]\nrules: [{matches: [{path: {type: Prefix, value: /}}]}]",
     "spec.rules[0].matches[0].path.type"),
    ("parentRefs: [{name: gw}]\nrules: [{matches: [{path: {type: RegularExpression, value: '('}}]}]",
     "spec.rules[0].matches[0].path.value"),
    ("parentRefs: [{name: gw}]\nrules: [{backendRef: [{name: s, port: 80}]}]", "spec.rules[0].backendRef"),
    ("parentRefs: [{name: gw}]\nrules: [{backendRefs: [{name: s}]}]", "spec.rules[0].backendRefs[0].port"),
    ("parentRefs: [{name: gw}]\nrules: [{timeouts: {request: 10x}, backendRefs: [{name: s, port: 80}]}]",
     "spec.rules[0].timeouts.request"),
    ("parentRefs: [{name: gw}]\nrules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]}]",
     "spec.rules[0].filters[0].requestRedirect.statusCode"),
    ("parentRefs: [{name: gw}]\nrules: [{filters: [{type: CORS, cors: {allowOrigins: ['*'], "
     "allowCredentials: true}}], backendRefs: [{name: s, port: 80}]}]", "spec.rules[0].filters[0].cors.allowOrigins"),
    ("parentRefs: [{name: gw}]\nrules: [{matches: [{path: {value: /a}}], filters: [{type: URLRewrite, "
     "urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}, {type: RequestRedirect, "
     "requestRedirect: {scheme: https}}]}]", "spec.rules[0].filters"),
])
def test_errors_name_the_object_and_field(spec: str, field: str) -> None:
    with pytest.raises(SpecError) as e:
        route(spec, name="bad")
    assert str(e.value).startswith(f"HTTPRoute edge/bad: {field}:"), str(e.value)


def test_route_annotations_are_its_validation_limits() -> None:
    r = route("parentRefs: [{name: gw}]\nrules: [{backendRefs: [{name: s, port: 80}]}]", annotations={
        "ambit.dev/max-request-body": "1Mi", "ambit.dev/allowed-content-types": "application/json, image/*",
        "ambit.dev/max-header-count": "20", "ambit.dev/max-header-bytes": "8Ki"})
    lim = r.rules[0].limits
    assert (lim.max_body, lim.content_types, lim.max_header_count, lim.max_header_bytes) == (
        1024 * 1024, ("application/json", "image/*"), 20, 8192)
    with pytest.raises(SpecError, match=r"max-request-body\]: 'lots'"):
        route("parentRefs: [{name: gw}]", annotations={"ambit.dev/max-request-body": "lots"})


def test_filters_rewrite_redirect_and_headers() -> None:
    prefix = RouteMatch(PathMatch("PathPrefix", "/api"))
    r = route("""
parentRefs: [{name: gw}]
rules:
- matches: [{path: {value: /api}}]
  filters:
  - {type: URLRewrite, urlRewrite: {hostname: orders.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
  - type: RequestHeaderModifier
    requestHeaderModifier: {set: [{name: X-A, value: "1"}], add: [{name: x-b, value: "2"}], remove: [X-C]}
  backendRefs: [{name: s, port: 80}]
- matches: [{path: {value: /old}}]
  filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
""")
    rw = r.rules[0].rewrite
    assert rw is not None and rw.hostname == "orders.internal"
    assert rewrite_path("/api/orders/7", rw.path, prefix) == "/v2/orders/7"
    assert rewrite_path("/api", rw.path, prefix) == "/v2"
    ops = header_ops(r.rules[0].request_headers)
    assert ops.remove == ("x-a", "x-c") and ops.add == (("x-a", "1"), ("x-b", "2"))
    red = r.rules[1].redirect
    assert red is not None and red.status == 301
    loc = redirect_location(red, scheme="http", authority="shop.example.com:80", path="/old/x", query="a=1",
                            listener_port=80, match=RouteMatch(PathMatch("PathPrefix", "/old")))
    assert loc == "https://shop.example.com/old/x?a=1"
    same = redirect_location(red.__class__(hostname="www.example.com"), scheme="http", authority="a:8080",
                             path="/p", query=None, listener_port=8080, match=prefix)
    assert same == "http://www.example.com:8080/p"
    assert split_host("[::1]:8443") == ("[::1]", 8443) and split_host("Shop.Example.com") == ("shop.example.com", None)


def test_client_address_with_trusted_proxies() -> None:
    assert client_address("10.0.0.1", "1.2.3.4, 5.6.7.8", 0) == ("10.0.0.1", "the TCP peer")
    assert client_address("10.0.0.1", "1.2.3.4, 5.6.7.8", 1)[0] == "5.6.7.8"
    assert client_address("10.0.0.1", "1.2.3.4, 5.6.7.8", 2)[0] == "1.2.3.4"
    assert client_address("10.0.0.1", "5.6.7.8", 2)[0] == "10.0.0.1"


CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nsecret-key-material\n-----END PRIVATE KEY-----\n"


def test_the_model_reads_tls_secrets_and_never_shows_them() -> None:
    import base64

    raw = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
           "metadata": {"name": "shop-tls", "namespace": "edge"},
           "data": {"tls.crt": base64.b64encode(CERT.encode()).decode(),
                    "tls.key": base64.b64encode(KEY.encode()).decode()}}
    s = parse_object(raw)
    assert isinstance(s, TlsSecret) and s.key_pem == KEY.encode() and "secret-key-material" not in repr(s)
    state = build_state([raw])
    assert ("Secret", "edge", "shop-tls") not in state.objects and "secret-key-material" not in repr(state)
    for bad, why in (({**raw, "type": "Opaque"}, "only kubernetes.io/tls"),
                     ({**raw, "data": {"tls.crt": "!!", "tls.key": "x"}}, "not base64"),
                     ({**raw, "data": {}, "stringData": {"tls.crt": CERT}}, "tls.key is missing")):
        with pytest.raises(ClusterError, match=why) as e:
            parse_object(bad)
        assert "secret-key-material" not in str(e.value)


def test_https_listeners_need_their_secret() -> None:
    gw = parse_object(yaml.safe_load("""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge, annotations: {ambit.dev/num-trusted-proxies: "1"}}
spec:
  gatewayClassName: ambit-ingress
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: shop, port: 443, protocol: HTTPS, hostname: shop.example.com,
     tls: {certificateRefs: [{name: shop-tls}]}}
  - {name: api, port: 443, protocol: HTTPS, hostname: "*.api.example.com", tls: {certificateRefs: [{name: none}]}}
  - {name: tcp, port: 5432, protocol: TCP}
"""))
    assert isinstance(gw, Gateway) and gw.is_ingress
    secret = TlsSecret(Meta("shop-tls", "edge"), CERT.encode(), KEY.encode())
    c = compile_gateway(gw, {("edge", "shop-tls"): secret})
    assert sorted(c.ports) == [80, 443] and c.num_trusted_proxies == 1
    assert [lst.name for lst in c.ports[443].listeners] == ["shop"]
    assert len(c.errors) == 2 and "no kubernetes.io/tls Secret edge/none" in c.errors[0] and "'TCP'" in c.errors[1]
    assert c.ports[443].listener_for("shop.example.com") is not None
    assert c.ports[443].listener_for("other.example.com") is None
