"""Which protocol a connection speaks, judged from its first bytes. Pure.

HTTP/2 with prior knowledge starts with the connection preface; HTTP/1.x with a
request line (`METHOD SP target SP HTTP/1.x CRLF`). Everything else (TLS, a
database protocol, a server-speaks-first protocol's silence) is opaque: the
glue decides what to do with it. The whole request line is checked, not just
"a word and a space": inline Redis (`GET key`) must not be taken for HTTP.
"""

from __future__ import annotations

import re
from typing import Literal

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# bytes after which a request line still being received is taken for HTTP/1 (h11 then
# applies the real limits and answers 431/400 itself)
MAX_SNIFF = 64 * 1024
_MAX_METHOD = 32

Sniffed = Literal["http1", "http2", "opaque"]

_TCHAR = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
_VISIBLE = re.compile(rb"[\x21-\x7e]*")
_VERSION = b"HTTP/1."


def sniff(first_bytes: bytes) -> Sniffed | None:
    """"http1", "http2" or "opaque"; None when more bytes are needed to tell."""
    if not first_bytes:
        return None
    head = first_bytes[: len(PREFACE)]
    if PREFACE.startswith(head):
        return "http2" if len(head) == len(PREFACE) else None
    # Empty lines before a request line are HTTP/1 too (RFC 9112 2.2: servers may skip
    # them; h11 answers 400): taking them for opaque would let such a request pass
    # around the HTTP rules to a server that skips them.
    body = first_bytes.lstrip(b"\r\n")
    if not body:
        return None if len(first_bytes) < _MAX_METHOD else "opaque"
    return _sniff_http1(body)


def _sniff_http1(data: bytes) -> Sniffed | None:
    method_end = data.find(b" ", 0, _MAX_METHOD + 1)
    if method_end < 0:
        prefix = data[:_MAX_METHOD + 1]
        if len(prefix) <= _MAX_METHOD and _TCHAR.fullmatch(prefix):
            return None
        return "opaque"
    if method_end == 0 or not _TCHAR.fullmatch(data, 0, method_end):
        return "opaque"
    target_start = method_end + 1
    target_end = data.find(b" ", target_start)
    if target_end < 0:
        if not _VISIBLE.fullmatch(data, target_start):
            return "opaque"
        return "http1" if len(data) >= MAX_SNIFF else None
    if target_end == target_start or not _VISIBLE.fullmatch(data, target_start, target_end):
        return "opaque"
    version = data[target_end + 1 : target_end + 1 + len(_VERSION) + 1]
    wanted = _VERSION[: len(version)]
    if len(version) <= len(_VERSION):
        return None if version == wanted else "opaque"
    if version[: len(_VERSION)] != _VERSION or not version[-1:].isdigit():
        return "opaque"
    return "http1"
