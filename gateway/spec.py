"""Reading the specs of HTTPRoutes, RateLimitPolicies and Gateways. Pure.

Every error names the object and the field path, and suggests the field meant
(`HTTPRoute edge/orders: spec.rules[0].matches[0].path.type: 'Prefix' is not one of
Exact, PathPrefix, RegularExpression`), as the policy compiler does. Durations are
Gateway API's (`1h30m`, `500ms`), sizes Kubernetes quantities (`64Ki`, `1M`, `1000`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ambit.durations import parse_duration
from gateway import GatewayError


class SpecError(GatewayError):
    """An object the gateway cannot serve as written; the message names it and the field."""


_SIZE = re.compile(r"([0-9]+)(Ki|Mi|Gi|k|K|M|G)?")
_SIZE_UNITS = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3,
               "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


class Where:
    """Names one object in errors: `<kind> <ns>/<name>: <path>: <why>`."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.obj = f"{kind} {namespace}/{name}"

    def error(self, path: str, why: str) -> SpecError:
        return SpecError(f"{self.obj}: {path}: {why}")

    def mapping(self, path: str, v: object, *, allowed: Sequence[str] | None = None) -> Mapping[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.error(path, f"expected a mapping, got {type_name(v)}")
        if allowed is not None:
            for k in v:
                if k not in allowed:
                    raise self.error(f"{path}.{k}", f"unknown field{close_match(str(k), allowed)}; "
                                     f"{path.rsplit('.', 1)[-1].split('[')[0] or 'this'} accepts "
                                     f"{', '.join(allowed)}")
        return v

    def list(self, path: str, v: object) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.error(path, f"expected a list, got {type_name(v)}")
        return v

    def string(self, path: str, v: object, *, required: bool = False) -> str | None:
        if v is None or v == "":
            if required:
                raise self.error(path, "is required")
            return None
        if not isinstance(v, str):
            raise self.error(path, f"expected a string, got {type_name(v)}")
        return v

    def enum(self, path: str, v: object, allowed: Sequence[str], default: str) -> str:
        if v is None:
            return default
        if v not in allowed:
            hint = " (YAML reads unquoted on/off/yes/no as booleans)" if isinstance(v, bool) else ""
            raise self.error(path, f"{v!r} is not one of {', '.join(allowed)}{close_match(str(v), allowed)}{hint}")
        return str(v)

    def integer(self, path: str, v: object, *, lo: int, hi: int, default: int | None = None) -> int:
        if v is None and default is not None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise self.error(path, f"expected a whole number, got {type_name(v)}")
        try:
            n = int(v)
        except ValueError:
            raise self.error(path, f"{v!r} is not a whole number") from None
        if not lo <= n <= hi:
            raise self.error(path, f"{n} is out of range {lo}..{hi}")
        return n

    def duration(self, path: str, v: object) -> float | None:
        """A Gateway API duration (`1h`, `10s`, `500ms`, `1m30s`) in seconds; None when unset."""
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise self.error(path, f"expected a duration such as 10s or 500ms, got {v!r}")
        try:
            return parse_duration(v, strict=True)
        except ValueError:
            raise self.error(path, f"{v!r} is not a duration (e.g. 10s, 500ms, 1h30m)") from None

    def size(self, path: str, v: object) -> int:
        """A byte count: a number or a quantity (`64Ki`, `1Mi`, `10M`)."""
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
        m = _SIZE.fullmatch(str(v).strip()) if isinstance(v, str) else None
        if m is None:
            raise self.error(path, f"{v!r} is not a size in bytes (e.g. 1048576, 64Ki, 1Mi)")
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def type_name(v: object) -> str:
    if v is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(v), type(v).__name__)


def close_match(name: str, allowed: Sequence[str]) -> str:
    low = name.lower()
    for a in allowed:
        if a.lower() == low or a.lower().rstrip("s") == low.rstrip("s") or (
                len(low) > 3 and (a.lower().startswith(low) or low.startswith(a.lower()))):
            return f" (did you mean {a!r}?)"
    return ""
