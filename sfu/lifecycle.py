"""Readiness and graceful drain.

Draining follows what load balancers and Kubernetes expect: on SIGTERM the server reports
not-ready (so no new sessions are routed to it), refuses new sessions with 503, and lets the
ones it has finish until `drain_timeout` runs out. Anything that must be waited for holds an
`Activity` for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator


class Lifecycle:
    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self._active: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def accepting(self) -> bool:
        """New sessions are welcome: listening and not draining."""
        return self.ready and not self.draining

    def active(self) -> dict[str, int]:
        return {kind: n for kind, n in self._active.items() if n}

    @contextlib.contextmanager
    def activity(self, kind: str) -> Iterator[None]:
        """Hold for as long as the drain must wait for this piece of work."""
        release = self.hold(kind)
        try:
            yield
        finally:
            release()

    def hold(self, kind: str) -> Callable[[], None]:
        """Like `activity()` for work that outlives one block (a media session): returns the
        release function, which is safe to call more than once."""
        self._active[kind] += 1
        self._idle.clear()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._active[kind] -= 1
            if not any(self._active.values()):
                self._idle.set()

        return release

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self) -> None:
        """Return once nothing is active; the caller bounds the wait (the drain deadline)."""
        await self._idle.wait()
