"""What a person in a call notices, measured in real browsers: whether a viewer keeps decoding
a sender (getStats() framesDecoded, sampled), how long until it decodes again, and when a
tile leaves a page. Shared by the browser call tests here and the cluster's browser test.

Decoding is measured with framesDecoded, not with videoWidth: the VP8 header that carries the
size is in the clear, so a frame can have a size without having been decrypted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from tests.browser.support import BrowserPeer, eventually

# How often the watchers sample framesDecoded: at 15 fps a healthy stream decodes about 7
# frames in each window, so an empty window is a real interruption.
SAMPLE = 0.5


async def decoded(viewer: BrowserPeer, sender_id: str) -> int:
    """Video frames `viewer` has decoded of `sender_id`, over every inbound stream labelled
    with that sender (a recycled receiver may also list its previous sender's stream)."""
    stats = await viewer.stats()
    if stats is None:
        return 0
    return sum(
        int(entry["framesDecoded"] or 0)
        for entry in stats["inbound"]
        if entry["participant"] == sender_id and entry["kind"] == "video"
    )


class Deadline:
    """A step's deadline, counted from when its action started."""

    def __init__(self, step: str, seconds: float) -> None:
        self.step, self.seconds = step, seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return max(0.1, self.start + self.seconds - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start


async def decoding(
    viewer: BrowserPeer, sender_id: str, deadline: Deadline, frames: int = 10
) -> float:
    """Wait until `viewer` has decoded `frames` more frames of `sender_id`; returns the
    seconds since the deadline's start."""
    start = await decoded(viewer, sender_id)

    async def grown() -> bool:
        return await decoded(viewer, sender_id) >= start + frames

    try:
        await eventually(
            grown,
            deadline.left(),
            f"[{deadline.step}] {viewer.name} decoding {frames} frames of {sender_id} "
            f"within {deadline.seconds}s",
        )
    except AssertionError as err:
        # What the viewer's browser saw of that sender: tells a stream that never arrived
        # from one that arrived but did not decode (no keyframe, no key).
        stats = await viewer.stats()
        seen = [e for e in stats["inbound"] if e["participant"] == sender_id]
        raise AssertionError(f"{err}; inbound: {seen}; e2ee: {stats['e2ee']}") from None
    return deadline.elapsed()


async def tile_gone(viewer: BrowserPeer, participant: str, deadline: Deadline) -> float:
    async def gone() -> bool:
        return bool(
            await viewer.eval(
                '(id) => document.querySelector(`.tile[data-participant="${CSS.escape(id)}"]`)'
                " === null",
                participant,
            )
        )

    await eventually(
        gone,
        deadline.left(),
        f"[{deadline.step}] {participant}'s tile leaving {viewer.name}'s page "
        f"within {deadline.seconds}s",
    )
    return deadline.elapsed()


async def slowest(*checks: Awaitable[float]) -> float:
    """Run checks together (each against its own deadline); the slowest one's time."""
    return max(await asyncio.gather(*checks))


class Watch:
    """Samples one viewer's decoded frames of one sender every SAMPLE seconds while something
    else happens; `stalls` lists the windows in which nothing new was decoded."""

    def __init__(self, viewer: BrowserPeer, sender_id: str, sender: str) -> None:
        self.viewer, self.sender_id, self.sender = viewer, sender_id, sender
        self.stalls: list[tuple[float, int, int]] = []
        self.samples = 0
        self._start = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = await decoded(self.viewer, self.sender_id)
        while True:
            await asyncio.sleep(SAMPLE)
            now = await decoded(self.viewer, self.sender_id)
            self.samples += 1
            if now <= last:
                self.stalls.append((round(time.monotonic() - self._start, 1), last, now))
            last = now

    def __enter__(self) -> Watch:
        self._start = time.monotonic()
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def check(self, step: str) -> None:
        assert self.samples >= 2, f"[{step}] too few samples of {self.viewer.name}"
        assert self.stalls == [], (
            f"[{step}] {self.viewer.name} stopped decoding {self.sender} "
            f"(seconds since start, frames before, frames after): {self.stalls}"
        )


async def keeps_decoding(pairs: list[Watch], step: str, seconds: float = 3.0) -> None:
    """framesDecoded keeps growing on every watched stream for `seconds`."""
    for watch in pairs:
        watch.__enter__()
    try:
        await asyncio.sleep(seconds)
    finally:
        for watch in pairs:
            watch.__exit__()
    for watch in pairs:
        watch.check(step)


async def page_event(peer: BrowserPeer, kind: str) -> dict[str, Any] | None:
    """The first event of `kind` the demo page's room reported, if any."""
    events = await peer.eval("() => window.blindfoldTest.events()")
    return next((e for e in events if e["type"] == kind), None)
