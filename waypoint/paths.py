"""Request targets: parse one, and normalize its path for policy matching. Pure.

The normalized path is what policy matches *and* what the waypoint forwards, so
the destination sees exactly the path the policy judged. The rules are stricter
than Istio's default, on purpose: anything two servers could read two ways is
refused (a `PathError`, answered 400) rather than guessed.

- the query is split off and kept aside (never matched, forwarded as sent);
- percent-escapes of unreserved characters (ALPHA DIGIT - . _ ~) are decoded,
  every other escape keeps its byte with upper-case hex;
- dot segments are resolved (RFC 3986 5.2.4) after duplicate slashes are merged;
- refused: an encoded `/` or `\\` (%2F, %5C), a raw `\\`, a malformed escape, `..`
  that climbs above the root, a dot segment with parameters (`..;`, which Tomcat
  reads as `..`), a NUL or any control character (raw or escaped), a raw space
  or non-ASCII character (escaped UTF-8, `%C3%A9`, is kept as written), a
  fragment, and a target that is not origin-form. Absolute-form
  (`http://host/path`) is accepted: its path is normalized and its authority
  kept for the caller; `*` only for OPTIONS; authority-form only means CONNECT,
  which the waypoint does not proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from waypoint import WaypointError

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# visible ASCII only: no controls, no space, no DEL, nothing above 0x7e
_VISIBLE = re.compile(r"[\x21-\x7e]*")
_ABSOLUTE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?]*)(?P<rest>.*)", re.S)
_AUTHORITY_FORM = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]+:[0-9]+")
# RFC 3986 3.2.2-3.2.3: an IP literal or a reg-name, then an optional port; no userinfo
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{0,5})?")


class PathError(WaypointError):
    """A request target the waypoint refuses (answered 400); the message says why."""


@dataclass(frozen=True)
class Target:
    """A parsed request target.

    `path` is normalized ("*" for OPTIONS *); `query` is as sent, without its
    "?" (None when there was no "?"); `scheme` and `authority` come from an
    absolute-form target only.
    """

    form: Literal["origin", "absolute", "asterisk"]
    path: str
    query: str | None = None
    scheme: str | None = None
    authority: str | None = None

    @property
    def forward(self) -> str:
        """The origin-form target to send upstream: the normalized path and the query."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def parse_target(raw_target: str, method: str = "GET") -> Target:
    """Parse and normalize a request target (an HTTP/1 request-target or an HTTP/2 :path)."""
    if not raw_target:
        raise PathError("empty request target")
    if not _VISIBLE.fullmatch(raw_target):
        bad = next(c for c in raw_target if not "\x21" <= c <= "\x7e")
        raise PathError(
            f"request target {_show(raw_target)} contains {_name(bad)}: "
            "only visible ASCII is allowed, percent-encode the rest"
        )
    if "#" in raw_target:
        raise PathError(f"request target {_show(raw_target)} contains a fragment ('#')")
    if raw_target == "*":
        if method != "OPTIONS":
            raise PathError(f"request target '*' is only for OPTIONS, not {method}")
        return Target("asterisk", "*")
    if raw_target.startswith("/"):
        path, query = _split_query(raw_target)
        return Target("origin", normalize_path_only(path), query)
    absolute = _ABSOLUTE.fullmatch(raw_target)
    if absolute is not None:
        scheme = absolute["scheme"].lower()
        authority = absolute["authority"]
        if scheme not in ("http", "https"):
            raise PathError(f"absolute-form target with scheme {scheme!r}: only http and https")
        if not authority:
            raise PathError(f"absolute-form target {_show(raw_target)} has no authority")
        if "@" in authority:
            raise PathError(
                f"absolute-form target {_show(raw_target)} carries userinfo ('@'): refused"
            )
        check_authority(authority)
        path, query = _split_query(absolute["rest"])
        return Target("absolute", normalize_path_only(path or "/"), query, scheme, authority)
    if method == "CONNECT" or _AUTHORITY_FORM.fullmatch(raw_target):
        raise PathError(
            f"authority-form target {_show(raw_target)} (CONNECT): the waypoint does not "
            "proxy CONNECT"
        )
    raise PathError(f"request target {_show(raw_target)} is not origin-form (must start with '/')")


def check_authority(authority: str) -> str:
    """Return a Host / :authority value unchanged, or raise PathError when it is not
    `host[:port]` (RFC 9112 3.2: such a request gets 400): policy matches hosts, so a
    value two servers could read two ways is refused."""
    if not _AUTHORITY.fullmatch(authority):
        raise PathError(f"authority {_show(authority)} is not host[:port]")
    return authority


def normalize_path(raw_target: str) -> str:
    """The normalized path of a request target, for policy matching (the query dropped)."""
    return parse_target(raw_target).path


def normalize_path_only(path: str) -> str:
    """Normalize an origin-form path (no query): escapes, duplicate slashes, dot segments."""
    if not path.startswith("/"):
        raise PathError(f"path {_show(path)} does not start with '/'")
    if "\\" in path:
        raise PathError(f"path {_show(path)} contains a backslash, which some servers read as '/'")
    decoded = _decode_unreserved(path)
    merged = re.sub(r"/{2,}", "/", decoded)
    return _remove_dot_segments(merged, path)


def _split_query(target: str) -> tuple[str, str | None]:
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        hexpair = path[i + 1 : i + 3]
        if len(hexpair) != 2 or not set(hexpair) <= _HEX:
            raise PathError(f"path {_show(path)} has a malformed percent-escape at offset {i}")
        byte = int(hexpair, 16)
        char = chr(byte)
        if char == "/":
            raise PathError(
                f"path {_show(path)} contains an encoded '/' (%2F): servers disagree on "
                "whether it separates segments"
            )
        if char == "\\":
            raise PathError(f"path {_show(path)} contains an encoded backslash (%5C)")
        if byte < 0x20 or byte == 0x7F:
            raise PathError(f"path {_show(path)} contains an encoded {_name(char)}")
        out.append(char if char in _UNRESERVED else f"%{byte:02X}")
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str, original: str) -> str:
    segments = path[1:].split("/")
    out: list[str] = []
    for index, seg in enumerate(segments):
        last = index == len(segments) - 1
        head = seg.split(";", 1)[0]
        if seg != head and head in (".", ".."):
            raise PathError(
                f"path {_show(original)} has a dot segment with parameters ({seg!r}), "
                "which some servers read as '..'"
            )
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if not out or out == [""]:
                raise PathError(f"path {_show(original)} climbs above the root with '..'")
            out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def _show(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


def _name(char: str) -> str:
    code = ord(char)
    if code == 0:
        return "a NUL"
    if code < 0x20 or code == 0x7F:
        return f"a control character (0x{code:02x})"
    if char == " ":
        return "a space"
    return f"a non-ASCII character ({char!r})"
