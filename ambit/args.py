"""Argument types and the user-facing error shared by every command line (`ambit ...`).

Pure: parsing only.
"""

from __future__ import annotations

import argparse
import datetime as dt

from ambit import AmbitError
from ambit.durations import parse_duration


class CliError(AmbitError):
    """A user-facing error: printed without a traceback, exit status 1 (or `.status`)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def duration(text: str) -> dt.timedelta:
    """`90s`, `30m`, `24h`, `365d`, `1h30m` or plain seconds (ambit.durations), as an argparse
    type (positive only)."""
    try:
        value = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 24h, 365d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    try:
        return dt.timedelta(seconds=value)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r}: too long a duration") from None
