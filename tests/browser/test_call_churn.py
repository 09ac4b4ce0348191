"""Three real Chromium participants who leave, rejoin, reload and close their tab: the
others' media must keep flowing, and what they see must follow at once.

The call of conftest.py (Alice with a tone, Bob) gets Carol; all three run the demo page with
E2EE on and the same passphrase. The deadlines are the ones a person in the call would notice
(3 s for someone to vanish or for media to carry on, 5 s to see someone again), counted from
the click, reload or close; they are polled, not timed precisely (tests/browser/calls.py).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.browser.calls import Deadline, Watch, decoding, keeps_decoding, slowest, tile_gone
from tests.browser.conftest import Call
from tests.browser.support import eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


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
    timings["all three decoding"] = await slowest(
        *(
            decoding(viewer, sender_id, start)
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
            keeps_decoding(watches, step),
            slowest(tile_gone(alice, bob_id, left), tile_gone(carol, bob_id, left)),
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
    timings["Bob decoded again"] = await slowest(
        decoding(alice, bob_id, back),
        decoding(carol, bob_id, back),
        decoding(bob, alice_id, back),
        decoding(bob, carol_id, back),
    )

    # Carol reloads her tab: the page rejoins by itself (room and passphrase in the link, her
    # name remembered), everyone decodes her again within 5 s, her old tile goes within 3 s,
    # and Alice and Bob never stop decoding each other meanwhile.
    step = "Carol reloads"
    with Watch(alice, bob_id, "Bob") as a_sees_b, Watch(bob, alice_id, "Alice") as b_sees_a:
        reloaded = Deadline(step, 5)
        gone = Deadline(step, 3)
        await carol.page.reload()
        timings["Carol's old tile gone"] = await slowest(
            tile_gone(alice, carol_id, gone), tile_gone(bob, carol_id, gone)
        )
        await eventually(
            lambda: carol.eval("() => window.blindfoldTest.joined"),
            reloaded.left(),
            f"[{step}] Carol's page rejoining by itself",
        )
        new_carol = (await carol.eval("() => window.blindfoldTest.self"))["id"]
        assert new_carol != carol_id
        timings["Carol decoded again"] = await slowest(
            decoding(alice, new_carol, reloaded),
            decoding(bob, new_carol, reloaded),
            decoding(carol, alice_id, reloaded),
            decoding(carol, bob_id, reloaded),
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
            keeps_decoding([Watch(alice, bob_id, "Bob"), Watch(bob, alice_id, "Alice")], step),
            slowest(tile_gone(alice, carol_id, closed), tile_gone(bob, carol_id, closed)),
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
