"""Request-target normalization for policy matching (waypoint/paths.py), table-driven."""

from __future__ import annotations

import pytest

from waypoint import WaypointError
from waypoint.paths import PathError, Target, check_authority, normalize_path, parse_target

NORMALIZED = [
    ("/", "/"),
    ("/admin", "/admin"),
    ("//admin", "/admin"),
    ("///a////b//", "/a/b/"),
    ("/a/./b/../c", "/a/c"),
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/.", "/"),
    ("/a/./", "/a/"),
    ("/a//../b", "/b"),  # slashes merged first: "/a/../b"
    ("/%61dmin", "/admin"),
    ("/%41%5a%30%2d%2e%5F%7e", "/AZ0-._~"),
    ("/a/%2e%2e/b", "/b"),
    ("/a%3bb", "/a%3Bb"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/a%20b", "/a%20b"),
    ("/a?b=%2F&c=..", "/a"),
    ("/a/../b?x", "/b"),
    ("/a;x=1/b", "/a;x=1/b"),
    ("/...", "/..."),
    ("/..a/b", "/..a/b"),
    ("http://example.com/a//b", "/a/b"),
    ("HTTP://example.com", "/"),
    ("http://example.com?q", "/"),
]

REFUSED = [
    ("/a%2Fb", "encoded '/'"),
    ("/a%2fb", "encoded '/'"),
    ("/a%5Cb", "encoded backslash"),
    ("/a\\b", "backslash"),
    ("/../x", "climbs above the root"),
    ("/a/../../x", "climbs above the root"),
    ("/%2e%2e/a/%2E%2E/x", "climbs above the root"),
    ("/..", "climbs above the root"),
    ("/a/..;/admin", "dot segment with parameters"),
    ("/a/.;x/b", "dot segment with parameters"),
    ("/a%00b", "encoded a NUL"),
    ("/a%0db", "control character"),
    ("/a%7Fb", "control character"),
    ("/a\x00b", "a NUL"),
    ("/a\tb", "control character"),
    ("/a b", "a space"),
    ("/caf\u00e9", "non-ASCII"),
    ("/a%zzb", "malformed percent-escape"),
    ("/a%4", "malformed percent-escape"),
    ("/a#frag", "fragment"),
    ("", "empty"),
    ("admin", "not origin-form"),
    ("*", "only for OPTIONS"),
    ("example.com:443", "does not proxy CONNECT"),
    ("ftp://example.com/a", "only http and https"),
    ("http:///a", "no authority"),
    ("http://user@example.com/a", "userinfo"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZED)
def test_normalized(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_refused(raw: str, why: str) -> None:
    with pytest.raises(PathError, match=why.replace("(", r"\(")):
        normalize_path(raw)


def test_path_error_is_a_waypoint_error() -> None:
    assert issubclass(PathError, WaypointError)


def test_query_is_kept_aside_as_sent() -> None:
    t = parse_target("/a//b/../c?x=%2F..&y")
    assert t == Target("origin", "/a/c", "x=%2F..&y")
    assert t.forward == "/a/c?x=%2F..&y"
    assert parse_target("/a?").query == ""
    assert parse_target("/a").query is None
    assert parse_target("/a").forward == "/a"


def test_absolute_form_keeps_the_authority() -> None:
    t = parse_target("http://svc.ns:8080/%61pi//v1?q=1")
    assert t == Target("absolute", "/api/v1", "q=1", "http", "svc.ns:8080")
    assert t.forward == "/api/v1?q=1"


def test_asterisk_only_for_options() -> None:
    assert parse_target("*", "OPTIONS") == Target("asterisk", "*")
    with pytest.raises(PathError, match="only for OPTIONS"):
        parse_target("*", "GET")


def test_connect_is_refused_by_name() -> None:
    with pytest.raises(PathError, match="CONNECT"):
        parse_target("10.0.0.1:80", "CONNECT")


def test_messages_quote_the_target_bounded() -> None:
    with pytest.raises(PathError) as err:
        normalize_path("/a%2F" + "x" * 1000)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize("authority", [
    "", "svc", "svc.ns.svc.cluster.local:8080", "10.0.0.1", "10.0.0.1:80", "[fd00::1]:443",
    "xn--caf-dma.example", "a%2Eb",
])
def test_authority_accepted(authority: str) -> None:
    assert check_authority(authority) == authority


@pytest.mark.parametrize("authority", [
    "a b", "user@host", "host:port", "host:123456", "[fd00::1", "a/b", "a\\b", "a?b", "h\x00",
])
def test_authority_refused(authority: str) -> None:
    with pytest.raises(PathError, match="not host"):
        check_authority(authority)


def test_absolute_form_authority_is_checked() -> None:
    with pytest.raises(PathError, match="not host"):
        parse_target("http://a:b:c/x")
