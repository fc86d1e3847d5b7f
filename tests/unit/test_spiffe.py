"""SPIFFE ID parsing: every rule of the SPIFFE-ID standard, and the ns/sa shape."""

from __future__ import annotations

import pytest

from ambit.spiffe import SpiffeError, SpiffeId, validate_trust_domain

GOOD = [
    ("spiffe://cluster.local/ns/default/sa/default", ("cluster.local", "default", "default")),
    ("spiffe://example.org/ns/shop/sa/Front_End-1.v2", ("example.org", "shop", "Front_End-1.v2")),
    ("spiffe://td_with-under.score/ns/a/sa/b", ("td_with-under.score", "a", "b")),
]

BAD = [
    ("", "empty"),
    ("http://cluster.local/ns/a/sa/b", "scheme is not 'spiffe'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "lowercase"),
    ("spiffe:/cluster.local/ns/a/sa/b", "exactly 'spiffe://'"),
    ("cluster.local/ns/a/sa/b", "scheme is not 'spiffe'"),
    ("spiffe:///ns/a/sa/b", "trust domain is empty"),
    ("spiffe://Cluster.local/ns/a/sa/b", "trust domains are lowercase"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "has a port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "userinfo"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://cluster.local/ns//sa/b", "empty segment"),
    ("spiffe://cluster.local/ns/a/sa/b/", "empty segment"),
    ("spiffe://cluster.local//ns/a/sa/b", "empty segment"),
    ("spiffe://cluster.local/ns/./sa/b", "'.' segment"),
    ("spiffe://cluster.local/ns/../sa/b", "'..' segment"),
    ("spiffe://cluster.local/ns/a%20b/sa/b", "percent-encoded"),
    ("spiffe://clu%73ter.local/ns/a/sa/b", "percent-encoded"),
    ("spiffe://cluster.local/ns/a b/sa/b", "characters outside"),
    ("spiffe://cluster.local/ns/a/sa/é", "characters outside"),
    ("spiffe://clu$ter/ns/a/sa/b", "characters outside"),
    ("spiffe://cluster.local", "not of the form /ns/"),
    ("spiffe://cluster.local/workload", "not of the form /ns/"),
    ("spiffe://cluster.local/ns/a/sa", "not of the form /ns/"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "not of the form /ns/"),
    ("spiffe://cluster.local/sa/a/ns/b", "not of the form /ns/"),
    ("spiffe://cluster.local/ns/a/sa/" + "x" * 2048, "longer than 2048 bytes"),
    ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "longer than 255 bytes"),
]


@pytest.mark.parametrize(("uri", "parts"), GOOD)
def test_parse_good(uri: str, parts: tuple[str, str, str]) -> None:
    ident = SpiffeId.parse(uri)
    assert (ident.trust_domain, ident.namespace, ident.service_account) == parts
    assert ident.uri == uri
    assert str(ident) == uri
    assert SpiffeId.parse(str(ident)) == ident


@pytest.mark.parametrize(("uri", "rule"), BAD)
def test_parse_bad_names_the_rule(uri: str, rule: str) -> None:
    with pytest.raises(SpiffeError) as e:
        SpiffeId.parse(uri)
    assert rule in str(e.value)


def test_for_workload_and_construction_validate() -> None:
    assert SpiffeId.for_workload("cluster.local", "ns1", "sa1").uri == "spiffe://cluster.local/ns/ns1/sa/sa1"
    with pytest.raises(SpiffeError, match="empty segment"):
        SpiffeId("cluster.local", "", "sa")
    with pytest.raises(SpiffeError, match="characters outside"):
        SpiffeId("cluster.local", "a/b", "sa")
    with pytest.raises(SpiffeError, match="port"):
        SpiffeId("x:1", "a", "b")


def test_ids_are_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")
    assert {a: 1}[SpiffeId("cluster.local", "a", "b")] == 1


def test_validate_trust_domain() -> None:
    assert validate_trust_domain("example.org") == "example.org"
    with pytest.raises(SpiffeError, match="lowercase"):
        validate_trust_domain("Example.org")
