"""Three real Chromium participants who leave, rejoin, reload and close their tab: the
others' media must keep flowing, and what they see must follow at once.

The call of conftest.py (Alice with a tone, Bob) gets Carol; all three run the demo page with
E2EE on and the same passphrase. The deadlines are the ones a person in the call would notice
(3 s for someone to vanish or for media to carry on, 5 s to see someone again), counted from
the click, reload or close; they are polled, not timed precisely. Decoding is measured with
getStats() framesDecoded (testing-here.md: videoWidth would prove nothing, the VP8 header that
carries the size is in the clear).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable

import pytest

from tests.browser.conftest import Call
from tests.browser.support import BrowserPeer, eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

# How often the watchers sample framesDecoded: at 15 fps a healthy stream decodes about 7
# frames in each window, so an empty window is a real interruption.
SAMPLE = 0.5


async def _decoded(viewer: BrowserPeer, sender_id: str) -> int:
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


async def _decoding(
    viewer: BrowserPeer, sender_id: str, deadline: Deadline, frames: int = 10
) -> float:
    """Wait until `viewer` has decoded `frames` more frames of `sender_id`; returns the
    seconds since the deadline's start."""
    start = await _decoded(viewer, sender_id)

    async def grown() -> bool:
        return await _decoded(viewer, sender_id) >= start + frames

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


async def _tile_gone(viewer: BrowserPeer, participant: str, deadline: Deadline) -> float:
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


async def _all(*checks: Awaitable[float]) -> float:
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
        last = await _decoded(self.viewer, self.sender_id)
        while True:
            await asyncio.sleep(SAMPLE)
            now = await _decoded(self.viewer, self.sender_id)
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


async def _keeps_decoding(pairs: list[Watch], step: str, seconds: float = 3.0) -> None:
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


async def test_leave_rejoin_reload_and_close_keep_the_call_up(call: Call) -> None:
    timings: dict[str, float] = {}
    base, room, passphrase = call.server.base, call.room, call.passphrase
    alice, bob = call.alice, call.bob

    # A page opened without a link makes up a readable room and a passphrase, both in the
    # link (so the invite always has them).
    blank = await alice.context.new_page()
    await blank.goto(f"{base}/")
    made_up = await blank.input_value("#room-input")
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{2}", made_up), made_up
    link = await blank.evaluate("() => location.hash")
    assert f"room={made_up}" in link, link
    assert re.search(r"passphrase=[\w-]{16,}", link), link
    await blank.close()

    carol = await call.launch("Carol", video=call.media.quadrants, audio=call.media.silence)
    carol_id = (await carol.join(base, room, passphrase))["id"]
    alice_id, bob_id = call.alice_id, call.bob_id
    everyone = {alice_id: alice, bob_id: bob, carol_id: carol}
    names = {alice_id: "Alice", bob_id: "Bob", carol_id: "Carol"}
    start = Deadline("three in the call", 30)
    timings["all three decoding"] = await _all(
        *(
            _decoding(viewer, sender_id, start)
            for viewer_id, viewer in everyone.items()
            for sender_id in everyone
            if sender_id != viewer_id
        )
    )

    # Alice (the only one with sound) is the active speaker: her tile on Carol's page has a
    # thick outline and a label, not a thin border.
    speaker = f'.tile.speaking[data-participant="{alice_id}"]'
    await carol.page.wait_for_selector(speaker, timeout=10_000)
    outline, label = await carol.eval(
        """(selector) => {
            const tile = document.querySelector(selector);
            return [parseFloat(getComputedStyle(tile).outlineWidth),
                    getComputedStyle(tile, '::after').content];
        }""",
        speaker,
    )
    assert outline >= 4, outline
    assert "speaking" in label, label

    # Bob clicks Leave: Alice and Carol keep decoding each other, and his tile goes at once.
    step = "Bob leaves"
    left = Deadline(step, 3)
    await bob.page.click("#leave-button")
    watches = [Watch(alice, carol_id, "Carol"), Watch(carol, alice_id, "Alice")]
    timings["Bob's tile gone"] = (
        await asyncio.gather(
            _keeps_decoding(watches, step),
            _all(_tile_gone(alice, bob_id, left), _tile_gone(carol, bob_id, left)),
        )
    )[1]
    await bob.page.wait_for_selector("#join-view:not([hidden])", timeout=5000)

    # Bob rejoins (a new participant): everyone decodes him, and he them, within 5 s.
    step = "Bob rejoins"
    back = Deadline(step, 5)
    await bob.page.click("#join-button")
    await eventually(
        lambda: bob.eval("() => window.blindfoldTest.joined"), back.left(), f"[{step}] joined"
    )
    old_bob, bob_id = bob_id, (await bob.eval("() => window.blindfoldTest.self"))["id"]
    assert bob_id != old_bob
    names[bob_id] = "Bob"
    timings["Bob decoded again"] = await _all(
        _decoding(alice, bob_id, back),
        _decoding(carol, bob_id, back),
        _decoding(bob, alice_id, back),
        _decoding(bob, carol_id, back),
    )

    # Carol reloads her tab: the page rejoins by itself (room and passphrase in the link, her
    # name remembered), everyone decodes her again within 5 s, her old tile goes within 3 s,
    # and Alice and Bob never stop decoding each other meanwhile.
    step = "Carol reloads"
    with Watch(alice, bob_id, "Bob") as a_sees_b, Watch(bob, alice_id, "Alice") as b_sees_a:
        reloaded = Deadline(step, 5)
        gone = Deadline(step, 3)
        await carol.page.reload()
        timings["Carol's old tile gone"] = await _all(
            _tile_gone(alice, carol_id, gone), _tile_gone(bob, carol_id, gone)
        )
        await eventually(
            lambda: carol.eval("() => window.blindfoldTest.joined"),
            reloaded.left(),
            f"[{step}] Carol's page rejoining by itself",
        )
        new_carol = (await carol.eval("() => window.blindfoldTest.self"))["id"]
        assert new_carol != carol_id
        timings["Carol decoded again"] = await _all(
            _decoding(alice, new_carol, reloaded),
            _decoding(bob, new_carol, reloaded),
            _decoding(carol, alice_id, reloaded),
            _decoding(carol, bob_id, reloaded),
        )
    a_sees_b.check(step)
    b_sees_a.check(step)
    carol_id = new_carol

    # Carol closes her tab without clicking Leave: she is gone for the others within 3 s,
    # and they keep decoding each other.
    step = "Carol closes her tab"
    closed = Deadline(step, 3)
    await carol.page.close()
    timings["closed tab gone"] = (
        await asyncio.gather(
            _keeps_decoding([Watch(alice, bob_id, "Bob"), Watch(bob, alice_id, "Alice")], step),
            _all(_tile_gone(alice, carol_id, closed), _tile_gone(bob, carol_id, closed)),
        )
    )[1]

    # Bob leaves too: Alice, alone, sees the invite state in the call view itself.
    step = "Alice alone"
    alone = Deadline(step, 3)
    await bob.page.click("#leave-button")
    await alice.page.wait_for_selector("#alone:not([hidden])", timeout=alone.left() * 1000)
    shown = await alice.page.text_content("#alone-link")
    assert shown is not None
    assert f"room={room}" in shown, shown
    assert passphrase not in shown, "the alone state shows the passphrase on screen"
    assert await alice.page.is_visible("#copy-link-alone")
    timings["alone shown"] = alone.elapsed()

    for peer in (alice, bob, carol):
        assert peer.problems() == [], f"{peer.name}: {peer.problems()}\n{peer.log()}"
    print("churn timings (s):", {k: round(v, 2) for k, v in timings.items()})
