"""The upstream HTTP/2 connections of one downstream connection.

One connection is current: opened (through the glue) when a stream first
needs it, then kept. Streams that need an upstream wait here, in order, for
the connection to open or for one of its stream slots
(SETTINGS_MAX_CONCURRENT_STREAMS) to free. A connection that goes away (the
server's graceful GOAWAY) is retired: its streams finish, new ones go to a new
current connection, and it is closed once idle. A failed open hands the
streams that waited for it back to the proxy (which answers them 503); the
next stream tries again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ambit.tasks import TaskSet
from waypoint.h2side import H2Side

X = TypeVar("X")


class Upstreams(Generic[X]):
    """The current upstream connection, the retired ones, and the streams waiting for one."""

    def __init__(
        self,
        *,
        tasks: TaskSet,
        open_side: Callable[[], Awaitable[H2Side[X]]],
        start_stream: Callable[[X, H2Side[X]], None],
        open_failed: Callable[[list[X], Exception], None],
        alive: Callable[[X], bool],
    ) -> None:
        self._tasks = tasks
        self._open_side = open_side
        self._start_stream = start_stream
        self._open_failed = open_failed
        self._alive = alive
        self.current: H2Side[X] | None = None
        self.retired: list[H2Side[X]] = []
        self.waiting: deque[X] = deque()
        self._opening: asyncio.Task[None] | None = None
        self._closed = False

    def want(self, x: X) -> None:
        """`x` needs an upstream stream: `start_stream(x, side)` is called when it can have one."""
        self.waiting.append(x)
        self.start_waiting()

    def start_waiting(self) -> None:
        """Start what waits, as far as the current connection allows; open one if needed."""
        while self.waiting:
            side = self.current
            if side is None:
                if self._opening is None and not self._closed and not self._tasks.closed:
                    self._opening = self._tasks.spawn("open-upstream", self._open())
                return
            if side.conn.open_outbound_streams >= side.conn.remote_settings.max_concurrent_streams:
                return  # a slot frees when one of its streams closes
            x = self.waiting.popleft()
            if self._alive(x):
                self._start_stream(x, side)

    async def _open(self) -> None:
        try:
            side = await self._open_side()
        except Exception as e:
            self._opening = None
            waiting, self.waiting = [x for x in self.waiting if self._alive(x)], deque()
            self._open_failed(waiting, e)
            return
        self._opening = None
        if self._closed:
            side.close()
            return
        self.current = side
        self.start_waiting()

    def retire(self, side: H2Side[X]) -> None:
        """No new streams on `side`; it closes once its streams are done."""
        if side is self.current:
            self.current = None
            self.retired.append(side)
        self.close_if_idle(side)
        self.start_waiting()

    def lost(self, side: H2Side[X]) -> None:
        """`side` is gone (failed or closed): forget it."""
        if side is self.current:
            self.current = None
        elif side in self.retired:
            self.retired.remove(side)

    def close_if_idle(self, side: H2Side[X]) -> None:
        if side in self.retired and not side.exchanges and not side.outq:
            self.retired.remove(side)
            side.close()

    def sides(self) -> list[H2Side[X]]:
        return ([self.current] if self.current is not None else []) + list(self.retired)

    def close(self) -> None:
        """Close every upstream connection; nothing opens from now on."""
        self._closed = True
        self.waiting.clear()
        for side in self.sides():
            side.close()
        self.current = None
        self.retired.clear()
