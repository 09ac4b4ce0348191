"""Three real Chromium participants who leave, rejoin, reload and close their tab: the
others' media must keep flowing, and what they see must follow at once.

The deadlines are the ones a person in the call would notice (3 s for someone to vanish or
for media to carry on, 5 s to see someone again); they are polled, not timed precisely.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.browser.conftest import Call
from tests.browser.support import BrowserPeer, eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


async def _decoded(viewer: BrowserPeer, sender_id: str) -> int:
    entry = await viewer.inbound(sender_id, "video")
    return int(entry["framesDecoded"] or 0) if entry is not None else 0


async def _decoding(viewer: BrowserPeer, sender_id: str, within: float, frames: int = 10) -> None:
    start = await _decoded(viewer, sender_id)

    async def grown() -> bool:
        return await _decoded(viewer, sender_id) >= start + frames

    await eventually(grown, within, f"{viewer.name} decoding {frames} frames of {sender_id}")


async def _tile_gone(viewer: BrowserPeer, participant: str, within: float) -> None:
    async def gone() -> bool:
        return bool(
            await viewer.eval(
                '(id) => document.querySelector(`.tile[data-participant="${id}"]`) === null',
                participant,
            )
        )

    await eventually(gone, within, f"{participant}'s tile leaving {viewer.name}'s page")


class Watch:
    """Samples one viewer's decoded frames of one sender every 0.5 s while something else
    happens; `stalls` lists the windows in which nothing new was decoded."""

    def __init__(self, viewer: BrowserPeer, sender_id: str) -> None:
        self.viewer, self.sender_id = viewer, sender_id
        self.stalls: list[tuple[int, int]] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = await _decoded(self.viewer, self.sender_id)
        while True:
            await asyncio.sleep(1.0)
            now = await _decoded(self.viewer, self.sender_id)
            self.samples += 1
            if now <= last:
                self.stalls.append((last, now))
            last = now

    def __enter__(self) -> Watch:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def test_leave_rejoin_reload_and_close_keep_the_call_up(call: Call) -> None:
    alice, bob = call.alice, call.bob
    carol = await call.launch("Carol", video=call.media.quadrants, audio=call.media.silence)
    carol_id = (await carol.join(call.server.base, call.room, call.passphrase))["id"]
    alice_id, bob_id = call.alice_id, call.bob_id
    everyone = {alice_id: alice, bob_id: bob, carol_id: carol}
    for viewer_id, viewer in everyone.items():
        for sender_id in everyone:
            if sender_id != viewer_id:
                await _decoding(viewer, sender_id, within=20)

    # Bob leaves: Alice and Carol keep decoding each other, and his tile goes at once.
    await bob.leave()
    await _decoding(alice, carol_id, within=3)
    await _decoding(carol, alice_id, within=3)
    await _tile_gone(alice, bob_id, within=3)
    await _tile_gone(carol, bob_id, within=3)

    # Bob rejoins (a new participant): everyone decodes him within 5 s.
    bob_id = (await bob.join(call.server.base, call.room, call.passphrase))["id"]
    await _decoding(alice, bob_id, within=5)
    await _decoding(carol, bob_id, within=5)
    await _decoding(bob, alice_id, within=5)
    await _decoding(bob, carol_id, within=5)

    # Carol reloads her tab: the page rejoins by itself, everyone decodes her again within
    # 5 s, and Alice and Bob never stop decoding each other meanwhile.
    with Watch(alice, bob_id) as a_sees_b, Watch(bob, alice_id) as b_sees_a:
        await carol.page.reload()
        await carol.page.wait_for_function("() => window.blindfoldTest.joined", timeout=10_000)
        new_carol = (await carol.eval("() => window.blindfoldTest.self"))["id"]
        assert new_carol != carol_id
        await _decoding(alice, new_carol, within=5)
        await _decoding(bob, new_carol, within=5)
        await _decoding(carol, alice_id, within=5)
        await _decoding(carol, bob_id, within=5)
        await _tile_gone(alice, carol_id, within=3)
    assert a_sees_b.samples >= 2
    assert a_sees_b.stalls == [], "Alice stopped decoding Bob while Carol reloaded"
    assert b_sees_a.stalls == [], "Bob stopped decoding Alice while Carol reloaded"

    # Carol closes her tab without clicking Leave: she is gone for the others within 3 s.
    await carol.page.close()
    await _tile_gone(alice, new_carol, within=3)
    await _tile_gone(bob, new_carol, within=3)
    await _decoding(alice, bob_id, within=3)
    await _decoding(bob, alice_id, within=3)
