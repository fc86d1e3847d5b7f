"""Named, owned background tasks: every task the ztunnel starts is kept here and stopped here.

A bare `asyncio.create_task` can be garbage-collected mid-flight and its
exception is lost; `TaskSet` keeps a strong reference, logs a crash with the
task's name, and cancels everything it owns on `close()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("ambit.ztunnel.tasks")

T = TypeVar("T")


class TaskSet:
    """Owns a set of named asyncio tasks."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, name: str, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start `coro` as a task named `<owner>/<name>`; a crash is logged, never silent."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.owner}: cannot start task {name!r} after close()")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}/{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)

    @property
    def closed(self) -> bool:
        """close() has begun: spawn() refuses new tasks."""
        return self._closed

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every owned task and wait (bounded) for them to finish."""
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                log.warning("task %s did not stop within %.1fs", t.get_name(), timeout)


def use_uvloop() -> bool:
    """Install uvloop's event loop policy when it is available (faster sockets and TLS)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
