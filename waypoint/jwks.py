"""The keys of RequestAuthentication rules whose `jwksUri` names a file (a mounted JWK Set).

The policy engine verifies tokens (ambit.policy.jwt) but does no I/O; the waypoint reads
the files here, once, and again when they change (checked at most every few seconds), so
a key rotation by replacing the file is picked up without a restart. A file that cannot
be read or parsed yields no keys: every token that rule checks is refused, never let in.

Only a regular file of at most MAX_BYTES is read (not a FIFO or a device a policy could
name), so the read, done on the request path when the file changed, stays short.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from ambit.policy import Jwks, JwksError, JwtRule, parse_jwks

log = logging.getLogger("ambit.waypoint.jwks")

RECHECK = 5.0  # seconds between stat() calls per file
MAX_BYTES = 1 << 20  # a JWK Set larger than this is refused


@dataclass
class _Entry:
    keys: Jwks | None
    mtime: float
    checked: float


class JwksFiles:
    """`resolve(rule)` for `ambit.policy.authenticate`: the keys in the rule's file."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._files: dict[str, _Entry] = {}

    def resolve(self, rule: JwtRule) -> Jwks | None:
        path = rule.jwks_path
        if not path:
            return None
        now = self._clock()
        e = self._files.get(path)
        if e is not None and now - e.checked < RECHECK:
            return e.keys
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "not a regular file")
            if st.st_size > MAX_BYTES:
                raise OSError(0, f"larger than {MAX_BYTES} bytes")
        except OSError as err:
            if e is None or e.keys is not None:
                log.error("%s: the JWK Set %s cannot be read (%s): its tokens are refused", rule.policy, path,
                          err.strerror)
            self._files[path] = _Entry(None, 0.0, now)
            return None
        mtime = st.st_mtime
        if e is not None and e.mtime == mtime:
            e.checked = now
            return e.keys
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise JwksError(f"larger than {MAX_BYTES} bytes")
            keys: Jwks | None = parse_jwks(data.decode("utf-8", "replace"))
        except (OSError, JwksError) as err:
            log.error("%s: the JWK Set %s is not usable (%s): its tokens are refused", rule.policy, path, err)
            keys = None
        self._files[path] = _Entry(keys, mtime, now)
        return keys
