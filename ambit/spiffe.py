"""SPIFFE IDs of workloads: parsing, validation and formatting of `spiffe://<td>/ns/<ns>/sa/<sa>`.

Pure. Validation follows the SPIFFE-ID standard (scheme, trust domain and path
character sets, no empty or dot segments, no query/fragment/port/userinfo, size
limits), then the Istio shape of the path. Every rejection says which rule failed.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ambit import AmbitError

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
# The SPIFFE-ID standard's allowed sets: trust domains are lowercase only,
# path segments may also hold uppercase letters.
TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


class SpiffeError(AmbitError):
    """A string is not a valid workload SPIFFE ID; the message names the rule it breaks."""


def validate_trust_domain(td: str) -> str:
    """Return `td` if it is a valid SPIFFE trust domain name, else raise SpiffeError."""
    if not td:
        raise SpiffeError("trust domain is empty")
    if len(td.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if ":" in td:
        raise SpiffeError(f"trust domain {td!r} has a port; SPIFFE IDs carry no port")
    if "@" in td:
        raise SpiffeError(f"trust domain {td!r} has userinfo; SPIFFE IDs carry no userinfo")
    if "%" in td:
        raise SpiffeError(f"trust domain {td!r} is percent-encoded; SPIFFE IDs forbid it")
    bad = sorted(set(td) - TRUST_DOMAIN_CHARS)
    if bad:
        hint = " (trust domains are lowercase)" if any(c.isupper() for c in bad) else ""
        raise SpiffeError(
            f"trust domain {td!r} has characters outside [a-z0-9.-_]: {''.join(bad)!r}{hint}"
        )
    return td


def _validate_segment(seg: str, uri: str) -> None:
    if not seg:
        raise SpiffeError(f"{uri!r}: path has an empty segment")
    if "/" in seg:
        raise SpiffeError(f"{uri!r}: segment {seg!r} contains '/' (characters outside [A-Za-z0-9.-_])")
    if seg in (".", ".."):
        raise SpiffeError(f"{uri!r}: path has a {seg!r} segment")
    if "%" in seg:
        raise SpiffeError(f"{uri!r}: path is percent-encoded; SPIFFE IDs forbid it")
    bad = sorted(set(seg) - PATH_CHARS)
    if bad:
        raise SpiffeError(
            f"{uri!r}: path segment {seg!r} has characters outside [A-Za-z0-9.-_]: {''.join(bad)!r}"
        )


def validate_uri(uri: str) -> tuple[str, list[str]]:
    """Check `uri` against the SPIFFE-ID standard; return (trust domain, path segments)."""
    if not isinstance(uri, str):
        raise SpiffeError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
    if not uri:
        raise SpiffeError("SPIFFE ID is empty")
    if len(uri.encode()) > MAX_ID_BYTES:
        raise SpiffeError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    if not uri.startswith(SCHEME):
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        if scheme.lower() == "spiffe":
            raise SpiffeError(f"{uri!r}: scheme must be exactly 'spiffe://' (lowercase, with //)")
        raise SpiffeError(f"{uri!r}: scheme is not 'spiffe' (got {scheme or 'none'!r})")
    rest = uri[len(SCHEME):]
    if "?" in rest:
        raise SpiffeError(f"{uri!r}: has a query; SPIFFE IDs carry none")
    if "#" in rest:
        raise SpiffeError(f"{uri!r}: has a fragment; SPIFFE IDs carry none")
    td, slash, path = rest.partition("/")
    try:
        validate_trust_domain(td)
    except SpiffeError as e:
        raise SpiffeError(f"{uri!r}: {e}") from None
    if not slash:
        return td, []
    segments = path.split("/")
    for seg in segments:
        _validate_segment(seg, uri)
    return td, segments


@dataclass(frozen=True)
class SpiffeId:
    """A workload identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        # Construction goes through the same rules as parsing, so no invalid
        # SpiffeId can exist anywhere in the process.
        validate_trust_domain(self.trust_domain)
        _validate_segment(self.namespace, self.uri)
        _validate_segment(self.service_account, self.uri)
        validate_uri(self.uri)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a workload SPIFFE ID; raise SpiffeError naming the rule it breaks."""
        td, segments = validate_uri(uri)
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise SpiffeError(
                f"{uri!r}: path is not of the form /ns/<namespace>/sa/<service-account>"
            )
        return cls(td, segments[1], segments[3])

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, sa: str) -> SpiffeId:
        """The identity of a workload running as service account `sa` in `namespace`."""
        return cls(trust_domain, namespace, sa)

    @property
    def principal(self) -> str:
        """`<trust domain>/ns/<ns>/sa/<sa>`: the form Istio's policies name a source by."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        return SCHEME + self.principal

    def __str__(self) -> str:
        return self.uri
