"""External authorization for CUSTOM AuthorizationPolicies: the extension providers a waypoint asks.

A provider is configured as in Istio's mesh config (`extensionProviders`):
`envoyExtAuthzHttp` (an HTTP service: the request's method, its path under
`pathPrefix`, its Host, Authorization and the `includeRequestHeadersInCheck` headers,
no body; 200 allows, anything else denies with that status, body and headers) or
`envoyExtAuthzGrpc` (`envoy.service.auth.v3.Authorization/Check`; status OK allows,
anything else denies, with the `denied_response` status, 403 by default). A provider
that cannot be reached, or does not answer within its `timeout`, denies with
`statusOnError` (403) unless `failOpen`. The waypoint takes them from `--mesh-config
FILE` (Istio's mesh config, or the `istio` ConfigMap holding it) and from
`--extension-provider NAME=http://HOST:PORT/PREFIX` or `NAME=grpc://HOST:PORT`.

What a provider is told is what the application will get: the normalized origin-form
target (the path policy matched, and the query), never the raw request-target. Building
the check request cannot be made to fail by a client (header values travel as the bytes
received); `failOpen` covers only the provider itself failing (no connection, no answer
in time, an answer that is not HTTP or not a CheckResponse, gRPC UNAVAILABLE or
DEADLINE_EXCEEDED); any other error denies, with `statusOnError`. The names a provider
may set on the forwarded request (`headersToUpstreamOnAllow`) are always removed from the
client's request, so a client cannot send them itself when the provider leaves one out.

`service` is a host: `<name>.<namespace>.svc[.cluster.local]` is looked up in the
waypoint's cluster state and dialed at one of that Service's endpoints (there is no
kube-proxy in the local cluster); anything else is an address or a DNS name. The call
is plain HTTP/1.1 or gRPC over TCP from the waypoint, outside the mesh's mTLS: a
provider whose pods are STRICT must accept plaintext on that port (portLevelMtls), or
run outside the mesh.

The provider configuration and both wire formats are pure (`parse_*`, `http_check_request`,
`http_check_result`, `grpc_check_request`, `grpc_check_result`); `ExtAuthz.check` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import h11
import yaml

from ambit.durations import parse_duration
from waypoint import WaypointError
from waypoint.exchange import Request
from waypoint.headers import HOP_BY_HOP

DEFAULT_TIMEOUT = 600.0  # Istio's default for both kinds
ALWAYS_SENT = ("host", "authorization")  # besides :method and :path, as Envoy sends them
log = logging.getLogger("ambit.waypoint.extauthz")
GRPC_METHOD = "/envoy.service.auth.v3.Authorization/Check"
MAX_BODY = 64 * 1024  # of a provider's answer, kept for the denied client


class ProviderError(WaypointError):
    """An extension provider's configuration is invalid; names the provider and the field."""


class ProviderUnavailable(WaypointError):
    """The provider itself failed: no connection, no answer in time, a malformed answer.
    The only failure `failOpen` lets a request through on."""


@dataclass(frozen=True)
class Provider:
    """One ext-authz extension provider, as Istio's mesh config describes it."""

    name: str
    kind: Literal["http", "grpc"]
    service: str  # host; `ns/host` is read as host
    port: int
    path_prefix: str = ""  # http
    timeout: float = DEFAULT_TIMEOUT
    fail_open: bool = False
    status_on_error: int = 403
    include_request_headers: tuple[str, ...] = ()  # http: lower-cased
    include_additional_headers: tuple[tuple[str, str], ...] = ()  # http
    headers_to_upstream_on_allow: tuple[str, ...] = ()  # http: lower-cased
    headers_to_downstream_on_deny: tuple[str, ...] = ()  # http: lower-cased; empty: all
    headers_to_downstream_on_allow: tuple[str, ...] = ()  # http: lower-cased

    @property
    def host(self) -> str:
        return self.service.split("/", 1)[-1]

    def describe(self) -> str:
        scheme = "grpc" if self.kind == "grpc" else "http"
        return f"{self.name}={scheme}://{self.host}:{self.port}{self.path_prefix}"


def _duration(name: str, field_name: str, v: object) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    try:
        return parse_duration(v)
    except ValueError:
        raise ProviderError(f"extension provider {name}: {field_name}: {v!r} is not a duration (e.g. 2s, 500ms)") from None


def _names(name: str, field_name: str, v: object) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ProviderError(f"extension provider {name}: {field_name}: expected a list of header names")
    return tuple(x.lower() for x in v)


def _port(name: str, v: object) -> int:
    try:
        port = int(str(v))
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ProviderError(f"extension provider {name}: port: {v!r} is not a port (1-65535)")
    return port


def parse_provider(raw: Mapping[str, Any]) -> Provider | None:
    """One entry of `extensionProviders`; None for kinds that are not ext-authz (tracing, logs)."""
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProviderError("an extension provider needs a `name`")
    for key, kind in (("envoyExtAuthzHttp", "http"), ("envoyExtAuthzGrpc", "grpc")):
        spec = raw.get(key)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise ProviderError(f"extension provider {name}: {key} must be a mapping")
        service = spec.get("service")
        if not isinstance(service, str) or not service:
            raise ProviderError(f"extension provider {name}: {key}.service is required")
        status = spec.get("statusOnError", "403")
        try:
            status_on_error = int(str(status))
        except ValueError:
            status_on_error = 0
        if not 400 <= status_on_error <= 599:
            raise ProviderError(f"extension provider {name}: statusOnError: {status!r} is not a 4xx/5xx status")
        extra = spec.get("includeAdditionalHeadersInCheck") or {}
        if not isinstance(extra, Mapping):
            raise ProviderError(f"extension provider {name}: includeAdditionalHeadersInCheck must be a mapping")
        prefix = spec.get("pathPrefix") or ""
        if prefix and not str(prefix).startswith("/"):
            raise ProviderError(f"extension provider {name}: pathPrefix {prefix!r} must start with /")
        return Provider(
            name=name, kind=kind,  # type: ignore[arg-type]
            service=service, port=_port(name, spec.get("port")), path_prefix=str(prefix),
            timeout=_duration(name, "timeout", spec["timeout"]) if spec.get("timeout") is not None
            else DEFAULT_TIMEOUT,
            fail_open=bool(spec.get("failOpen", False)), status_on_error=status_on_error,
            include_request_headers=_names(name, "includeRequestHeadersInCheck",
                                           spec.get("includeRequestHeadersInCheck")),
            include_additional_headers=tuple((str(k).lower(), str(v)) for k, v in extra.items()),
            headers_to_upstream_on_allow=_names(name, "headersToUpstreamOnAllow", spec.get("headersToUpstreamOnAllow")),
            headers_to_downstream_on_deny=_names(name, "headersToDownstreamOnDeny",
                                                 spec.get("headersToDownstreamOnDeny")),
            headers_to_downstream_on_allow=_names(name, "headersToDownstreamOnAllow",
                                                  spec.get("headersToDownstreamOnAllow")),
        )
    return None


def parse_mesh_config(text: str) -> list[Provider]:
    """The ext-authz providers of Istio's mesh config: the YAML itself, or the `istio`
    ConfigMap that holds it under `data.mesh`."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ProviderError(f"mesh config: not YAML ({e})") from None
    if isinstance(doc, Mapping) and doc.get("kind") == "ConfigMap":
        return parse_mesh_config(str((doc.get("data") or {}).get("mesh") or ""))
    if not isinstance(doc, Mapping):
        raise ProviderError("mesh config: expected a mapping")
    raw = doc.get("extensionProviders") or []
    if not isinstance(raw, list):
        raise ProviderError("mesh config: extensionProviders must be a list")
    out = [p for p in (parse_provider(r) for r in raw if isinstance(r, Mapping)) if p is not None]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ProviderError(f"mesh config: extension provider names repeat: {', '.join(names)}")
    return out


def parse_provider_flag(value: str) -> Provider:
    """`NAME=http://HOST:PORT[/PATH_PREFIX]` or `NAME=grpc://HOST:PORT` (--extension-provider)."""
    name, sep, url = value.partition("=")
    u = urlsplit(url)
    if not sep or not name or u.scheme not in ("http", "grpc") or not u.hostname:
        raise ProviderError(f"--extension-provider {value!r}: expected NAME=http://HOST:PORT/PREFIX "
                            "or NAME=grpc://HOST:PORT")
    try:
        port = u.port or (80 if u.scheme == "http" else 0)
    except ValueError:
        port = 0
    if not port:
        raise ProviderError(f"--extension-provider {value!r}: a port is required")
    return Provider(name=name, kind="http" if u.scheme == "http" else "grpc", service=u.hostname, port=port,
                    path_prefix=u.path.rstrip("/") if u.scheme == "http" else "")


# ---------------------------------------------------------------------------
# what is asked, and what is answered


@dataclass(frozen=True)
class CheckRequest:
    """What the waypoint tells a provider about one request."""

    method: str
    target: str  # origin-form: the normalized path (what policy matched and the app gets) and the query
    host: str
    scheme: str
    protocol: str  # HTTP/1.1, HTTP/2
    headers: Sequence[tuple[str, str]]  # lower-cased names
    source_ip: str
    source_principal: str | None
    destination_ip: str
    destination_port: int
    destination_principal: str | None

    @classmethod
    def of(cls, req: Request, *, source_ip: str, source_principal: str | None, destination_ip: str,
           destination_port: int, destination_principal: str | None) -> CheckRequest:
        """What to tell a provider about `req`: its normalized target, never the raw one (which
        `/public/../admin` or an absolute-form URL would make differ from what is forwarded)."""
        target = req.path if req.query is None else f"{req.path}?{req.query}"
        return cls(req.method, target, req.authority, req.scheme, req.protocol,
                   [(n.lower(), v) for n, v in req.headers], source_ip, source_principal,
                   destination_ip, destination_port, destination_principal)


@dataclass(frozen=True)
class CheckResult:
    """A provider's answer: allowed, or the response the client gets instead."""

    allowed: bool
    status: int  # of the provider's answer (HTTP status, or gRPC code for grpc)
    reason: str
    deny_status: int = 403
    body: bytes = b""
    response_headers: tuple[tuple[str, str], ...] = ()  # to the client (deny, or allow)
    upstream_headers: tuple[tuple[str, str], ...] = ()  # set on the forwarded request (allow)
    remove_headers: tuple[str, ...] = ()  # removed from the forwarded request (allow)


_NOT_FORWARDED = frozenset(h.decode() for h in HOP_BY_HOP) | {"content-length", "host", ":authority"}


def _keep(headers: Iterable[tuple[str, str]], names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`headers` named in `names` (all when empty), minus hop-by-hop and framing fields."""
    wanted = set(names)
    return tuple((n, v) for n, v in headers
                 if n not in _NOT_FORWARDED and not n.startswith(":") and (not wanted or n in wanted))


def _raw(text: str) -> bytes:
    """A field as the bytes received: `Request` values are UTF-8 decoded with surrogateescape,
    so this gives back exactly what the client sent (obs-text included) and never fails."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _utf8(text: str) -> bytes:
    """A protobuf `string`: valid UTF-8 always (bytes that are not become U+FFFD, as Envoy
    sanitizes header values for its CheckRequest)."""
    return _raw(text).decode("utf-8", "replace").encode("utf-8")


def http_check_request(p: Provider, req: CheckRequest) -> h11.Request:
    """Envoy's HTTP authorization request: the same method, the path under the prefix, Host,
    Authorization and the configured headers, and no body. Fields are bytes (as received);
    h11 still refuses what cannot be framed (a CR, LF or NUL), which the caller denies."""
    allowed = set(ALWAYS_SENT) | set(p.include_request_headers)
    headers = [(b"host", _raw(req.host or f"{p.host}:{p.port}"))]
    headers += [(_raw(n), _raw(v)) for n, v in req.headers if n in allowed and n != "host"]
    headers += [(_raw(n), _raw(v)) for n, v in p.include_additional_headers]
    headers += [(b"content-length", b"0"), (b"connection", b"close")]
    return h11.Request(method=_raw(req.method), target=_raw(p.path_prefix + req.target), headers=headers)


def http_check_result(p: Provider, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> CheckResult:
    """200 allows (with `headersToUpstreamOnAllow` set on the request); anything else denies
    with the provider's status, body and (`headersToDownstreamOnDeny`, else all) headers."""
    if status == 200:
        remove = next((v for n, v in headers if n == "x-envoy-auth-headers-to-remove"), "")
        return CheckResult(
            True, status, f"provider {p.name} allowed (HTTP 200)",
            upstream_headers=_keep(headers, p.headers_to_upstream_on_allow) if p.headers_to_upstream_on_allow else (),
            response_headers=(_keep(headers, p.headers_to_downstream_on_allow)
                              if p.headers_to_downstream_on_allow else ()),
            remove_headers=tuple(h.strip().lower() for h in remove.split(",") if h.strip()),
        )
    deny = status if 400 <= status <= 599 else 403
    return CheckResult(False, status, f"provider {p.name} denied (HTTP {status})", deny, body[:MAX_BODY],
                       _keep(headers, p.headers_to_downstream_on_deny))


# --- gRPC: envoy.service.auth.v3, encoded by hand (the few fields ambit sends and reads)


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _str_field(number: int, value: str) -> bytes:
    return _bytes_field(number, _utf8(value)) if value else b""


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _map_field(number: int, items: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(_bytes_field(number, _str_field(1, k) + _str_field(2, v)) for k, v in items)


def _peer(ip: str, port: int, principal: str | None) -> bytes:
    socket_address = _str_field(2, ip) + _int_field(3, port)  # SocketAddress: address, port_value
    return _bytes_field(1, _bytes_field(1, socket_address)) + _str_field(4, principal or "")


def grpc_check_request(req: CheckRequest, now: float | None = None) -> bytes:
    """A CheckRequest{attributes: AttributeContext{source, destination, request{time, http}}}."""
    merged: dict[str, str] = {}
    for n, v in req.headers:
        merged[n] = f"{merged[n]},{v}" if n in merged else v
    merged.setdefault(":authority", req.host)
    merged.setdefault(":method", req.method)
    merged.setdefault(":path", req.target)
    http = (_str_field(2, req.method) + _map_field(3, sorted(merged.items())) + _str_field(4, req.target)
            + _str_field(5, req.host) + _str_field(6, req.scheme) + _varint(9 << 3) + _varint(-1)
            + _str_field(10, req.protocol))
    t = time.time() if now is None else now
    stamp = _int_field(1, int(t)) + _int_field(2, int((t % 1) * 1e9))
    request = _bytes_field(1, stamp) + _bytes_field(2, http)
    attributes = (_bytes_field(1, _peer(req.source_ip, 0, req.source_principal))
                  + _bytes_field(2, _peer(req.destination_ip, req.destination_port, req.destination_principal))
                  + _bytes_field(4, request))
    return _bytes_field(1, attributes)


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            n = varint()
            if i + n > len(data):
                raise ValueError("truncated field")
            out.append((number, data[i:i + n]))
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _sub(data: bytes, number: int) -> bytes | None:
    for n, v in _fields(data):
        if n == number and isinstance(v, bytes):
            return v
    return None


def _int(data: bytes, number: int) -> int:
    for n, v in _fields(data):
        if n == number and isinstance(v, int):
            return v
    return 0


def _header_options(data: bytes, number: int) -> tuple[tuple[str, str], ...]:
    out = []
    for n, v in _fields(data):
        if n == number and isinstance(v, bytes):
            hv = _sub(v, 1) or b""  # HeaderValueOption.header: HeaderValue{key, value}
            key = (_sub(hv, 1) or b"").decode("utf-8", "replace").lower()
            if key:
                out.append((key, (_sub(hv, 2) or b"").decode("utf-8", "replace")))
    return tuple(out)


def grpc_check_result(p: Provider, response: bytes) -> CheckResult:
    """A CheckResponse: status.code 0 allows (with ok_response's headers and headers_to_remove);
    else deny, with denied_response's status (403 by default), headers and body."""
    status = _sub(response, 1)
    code = _int(status, 1) if status is not None else 0
    if code == 0:
        ok = _sub(response, 3) or b""
        remove = tuple((v.decode("utf-8", "replace").lower() for n, v in _fields(ok)
                        if n == 5 and isinstance(v, bytes)))
        return CheckResult(True, 0, f"provider {p.name} allowed (gRPC OK)",
                           upstream_headers=_keep(_header_options(ok, 2), ()),
                           response_headers=_keep(_header_options(ok, 6), ()), remove_headers=remove)
    denied = _sub(response, 2) or b""
    http_status = _int(_sub(denied, 1) or b"", 1)
    deny = http_status if 400 <= http_status <= 599 else 403
    body = (_sub(denied, 3) or b"")[:MAX_BODY]
    return CheckResult(False, code, f"provider {p.name} denied (gRPC code {code})", deny, body,
                       _keep(_header_options(denied, 2), ()))


# ---------------------------------------------------------------------------
# asking


Resolve = Callable[[str, int], tuple[str, int]]


class ExtAuthz:
    """The providers a waypoint can ask, and the asking. `resolve(host, port)` -> (address, port)."""

    def __init__(self, providers: Iterable[Provider] = (), resolve: Resolve | None = None) -> None:
        self.providers: dict[str, Provider] = {}
        for p in providers:
            if p.name in self.providers:
                raise ProviderError(f"extension provider {p.name} is configured twice")
            self.providers[p.name] = p
        self.resolve: Resolve = resolve or (lambda host, port: (host, port))
        self._channels: dict[str, Any] = {}  # grpc.aio channels by target, kept open

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.providers)

    async def check(self, name: str, req: CheckRequest) -> CheckResult:
        """Ask provider `name`. The provider failing (`ProviderUnavailable`: no connection, a
        timeout, a malformed answer) is `statusOnError`, or allowed when failOpen; any other
        error (building the check request, a bug) denies: a client must not be able to turn
        its own request into "the provider is down"."""
        p = self.providers[name]
        try:
            if p.kind == "http":
                wire = h11.Connection(h11.CLIENT)
                message = wire.send(http_check_request(p, req)) + wire.send(h11.EndOfMessage())
            else:
                message = grpc_check_request(req)
        except Exception as e:  # whatever it is, it is ours, not the provider's
            return CheckResult(False, 0, f"provider {p.name} not asked: cannot build the check request "
                               f"({type(e).__name__}: {e})", p.status_on_error,
                               b"RBAC: access denied (the request cannot be checked)")
        try:
            async with asyncio.timeout(p.timeout):
                if p.kind == "http":
                    result = await self._http(p, wire, message)
                else:
                    result = await self._grpc(p, message)
        except (OSError, TimeoutError, ProviderUnavailable) as e:
            why = "timed out" if isinstance(e, TimeoutError) else f"failed: {e or type(e).__name__}"
            if p.fail_open:
                return CheckResult(True, 0, f"provider {p.name} {why}; failOpen lets the request through",
                                   remove_headers=p.headers_to_upstream_on_allow)
            return CheckResult(False, 0, f"provider {p.name} {why}", p.status_on_error,
                               b"RBAC: access denied (the external authorizer did not answer)")
        except Exception as e:  # a local error denies, failOpen or not
            log.exception("extension provider %s: local error", p.name)
            return CheckResult(False, 0, f"provider {p.name}: local error ({type(e).__name__}: {e})",
                               p.status_on_error, b"RBAC: access denied (the request cannot be checked)")
        if result.allowed and p.headers_to_upstream_on_allow:
            # the names the provider may set are never the client's to send
            gone = dict.fromkeys((*result.remove_headers, *p.headers_to_upstream_on_allow))
            result = replace(result, remove_headers=tuple(gone))
        return result

    def _where(self, p: Provider) -> tuple[str, int]:
        try:
            return self.resolve(p.host, p.port)
        except WaypointError as e:  # e.g. its Service has no endpoints: the provider is down
            raise ProviderUnavailable(str(e)) from None

    async def _http(self, p: Provider, conn: h11.Connection, message: bytes) -> CheckResult:
        host, port = self._where(p)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(message)
            await writer.drain()
            status, headers, body = 0, [], bytearray()
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    raise ProviderUnavailable(f"malformed answer: {e}") from None
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in event.headers]
                elif isinstance(event, h11.Data):
                    if len(body) < MAX_BODY:
                        body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if not status:
                raise ProviderUnavailable("the provider closed the connection without answering")
            return http_check_result(p, status, headers, bytes(body))
        finally:
            writer.close()

    async def _grpc(self, p: Provider, message: bytes) -> CheckResult:
        import grpc  # only a waypoint with a gRPC provider pays for grpc's import

        host, port = self._where(p)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(target)
        call = channel.unary_unary(GRPC_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            response = await call(message)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ProviderUnavailable(f"gRPC {e.code().name}: {e.details()}") from None
            # the provider answered with an error of its own (it could not read the request,
            # does not implement Check...): not "down", so failOpen does not apply
            return CheckResult(False, 0, f"provider {p.name} answered gRPC {e.code().name}: {e.details()}",
                               p.status_on_error, b"RBAC: access denied (the external authorizer refused to check)")
        try:
            return grpc_check_result(p, bytes(response))
        except ValueError as e:
            raise ProviderUnavailable(f"malformed CheckResponse: {e}") from None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
