"""A rule's request and response edits, as Gateway API specifies them. Pure.

- `RequestHeaderModifier`/`ResponseHeaderModifier`: `set` replaces every field of
  that name, `add` appends one, `remove` deletes them (names case-insensitive);
- `URLRewrite`: the path (`ReplaceFullPath`, or `ReplacePrefixMatch` of the path prefix
  that matched) and the host sent to the backend; the query is kept;
- `RequestRedirect`: a local 3xx whose `Location` keeps what the filter does not change
  (the scheme, the host without its port, the path, the query); the port is the
  listener's, left out when it is the scheme's default, and a changed scheme without a
  port takes that scheme's default (Gateway API's rules).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routes import HeaderEdit, PathModifier, Redirect, RouteMatch

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HeaderOps:
    """A HeaderEdit as the engine's verdict takes it: fields to remove, then to append."""

    remove: tuple[str, ...] = ()
    add: tuple[tuple[str, str], ...] = ()

    def __add__(self, other: HeaderOps) -> HeaderOps:
        return HeaderOps(self.remove + other.remove, self.add + other.add)


def header_ops(edit: HeaderEdit | None) -> HeaderOps:
    if edit is None:
        return HeaderOps()
    return HeaderOps(tuple(n for n, _ in edit.set) + edit.remove, edit.set + edit.add)


def rewrite_path(path: str, modifier: PathModifier | None, match: RouteMatch) -> str:
    """The path after a URLRewrite or RequestRedirect path modifier."""
    if modifier is None:
        return path
    if modifier.kind == "ReplaceFullPath":
        return modifier.value
    prefix = match.path.value.rstrip("/")
    rest = path[len(prefix):] if path.startswith(prefix) else path
    out = modifier.value.rstrip("/") + rest
    return out if out.startswith("/") else "/" + out


def split_host(authority: str) -> tuple[str, int | None]:
    """`host[:port]` (or `[v6]:port`) -> (lower-case host, port or None)."""
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[:end + 1], authority[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif authority.count(":") == 1:
        h, _, p = authority.partition(":")
        if p.isdigit():
            host, port = h, int(p)
    return host.lower(), port


def redirect_location(redirect: Redirect, *, scheme: str, authority: str, path: str, query: str | None,
                      listener_port: int, match: RouteMatch) -> str:
    """The `Location` of a RequestRedirect."""
    new_scheme = redirect.scheme or scheme
    host = redirect.hostname or split_host(authority)[0]
    if redirect.port is not None:
        port: int | None = redirect.port
    elif redirect.scheme is not None and redirect.scheme != scheme:
        port = None
    else:
        port = listener_port
    if port == DEFAULT_PORTS.get(new_scheme):
        port = None
    new_path = rewrite_path(path, redirect.path, match)
    out = f"{new_scheme}://{host}{f':{port}' if port else ''}{new_path}"
    return out if query is None else f"{out}?{query}"
