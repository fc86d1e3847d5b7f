"""Argument types and the user-facing error shared by every command line (`ambit ...`).

Pure: parsing only.
"""

from __future__ import annotations

import argparse
import datetime as dt

from ambit import AmbitError


class CliError(AmbitError):
    """A user-facing error: printed without a traceback, exit status 1 (or `.status`)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> dt.timedelta:
    """`90s`, `30m`, `24h`, `365d` or plain seconds, as an argparse type (positive only)."""
    t = text.strip()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 24h, 365d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return dt.timedelta(seconds=value)
