"""Durations as people write them in ambit's inputs: flags, Gateway API specs, Istio's mesh config. Pure.

One grammar for all of them: one or more `<number><unit>` (`90s`, `500ms`, `1h30m`,
`1.5s`; units `ms`, `s`, `m`, `h`, `d`), or a bare number of seconds. Gateway API's own
form (GEP-2257: whole numbers of at most five digits, units `h`, `m`, `s`, `ms`, at most
four parts, a unit always) is the `strict` subset, so a spec that works here also passes
the API server's validation.
"""

from __future__ import annotations

import re

_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STRICT = re.compile(r"(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}")
_BARE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_duration(text: object, *, strict: bool = False) -> float:
    """Seconds in `text` (see the module docstring); ValueError naming what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1h30m)")
    t = text if strict else text.strip()  # the API server's pattern takes no spaces
    if strict:
        if not _STRICT.fullmatch(t):
            raise ValueError(f"{text!r} is not a Gateway API duration (e.g. 10s, 500ms, 1h30m: "
                             "whole numbers, units h, m, s, ms)")
    elif _BARE.fullmatch(t):
        return float(t)
    total, pos = 0.0, 0
    for m in _PART.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise ValueError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1h30m)")
    return total
