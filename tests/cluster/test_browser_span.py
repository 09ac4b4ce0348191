"""Three real Chromiums in one call across three `sfu serve` nodes (`cluster.rooms: span`, a
real Redis), each on the demo page of its own node with E2EE on and the same passphrase: the
passphrase key exchange crosses nodes, everyone decodes everyone. Then Alice's node is killed
with SIGKILL. Her page, served by that node, has no other URL; it rejoins through a node its
`joined` named, within 5 s, while Bob and Carol never stop decoding each other, and everyone
decodes everyone again.

The dead node's Redis entries still list the old Alice until they expire (`node_ttl`, 5 s
here); her new join replaces her (the same identity) at once, so her old tile leaves Bob's
and Carol's pages well before that.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.browser.calls import Deadline, Watch, decoding, page_event, slowest, tile_gone
from tests.browser.support import (
    BrowserPeer,
    eventually,
)
from tests.cluster.support import Node, cluster_formed, serve_nodes

pytestmark = [pytest.mark.slow]


@pytest.fixture
def nodes(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    logs = tmp_path_factory.mktemp("nodes")
    extra = {"SFU_RTC__ANNOUNCED_IPS": "[127.0.0.1]", "SFU_CLUSTER__NODE_TTL": "5"}
    with serve_nodes(redis_url, logs, "span", extra=extra) as started:
        yield started


async def _self_id(peer: BrowserPeer) -> str:
    return str((await peer.eval("() => window.blindfoldTest.self"))["id"])


async def test_a_browser_call_across_three_nodes_survives_one_of_them(
    nodes: list[Node], browsers: list[BrowserPeer]
) -> None:
    async with aiohttp.ClientSession() as http:
        await cluster_formed(http, nodes)
    n1, n2, n3 = nodes
    alice, bob, carol = browsers
    room, passphrase = f"span-{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    ids: dict[str, str] = {}
    for peer, node in zip(browsers, nodes, strict=True):
        ids[peer.name] = (await peer.join(node.url, room, passphrase))["id"]
    timings: dict[str, float] = {}

    # Everyone decodes everyone: the key exchange and the media crossed the nodes.
    start = Deadline("three nodes, one call", 40)
    timings["all decoding"] = await slowest(
        *(
            decoding(viewer, ids[sender.name], start)
            for viewer in browsers
            for sender in browsers
            if sender is not viewer
        )
    )
    # Alice's page was served by n1 and was given no other URL: n1 named n2 and n3.
    assert await alice.eval("() => location.origin") == n1.url
    joined = await page_event(alice, "joined")
    assert joined is not None

    # Kill Alice's node. Bob and Carol keep decoding each other all along; Alice's page
    # rejoins by itself through n2 or n3.
    step = "Alice's node killed"
    watches = [Watch(bob, ids["Carol"], "Carol"), Watch(carol, ids["Bob"], "Bob")]
    for watch in watches:
        watch.__enter__()
    try:
        killed = Deadline(step, 5)
        killed_at = time.monotonic()
        n1.process.send_signal(signal.SIGKILL)
        rejoined = await eventually(
            lambda: page_event(alice, "rejoined"),
            killed.left(),
            f"[{step}] Alice's page rejoining within 5 s",
        )
        timings["Alice rejoined"] = time.monotonic() - killed_at
        assert rejoined["node"] in (
            f"ws://127.0.0.1:{n2.port}/rtc",
            f"ws://127.0.0.1:{n3.port}/rtc",
        ), rejoined
        new_alice = await _self_id(alice)
        assert new_alice != ids["Alice"]
        # Everyone decodes the new Alice, and she everyone, within 10 s of the kill (a new
        # participant: a new key exchange across nodes, new connections, a keyframe).
        back = Deadline(step, 10)
        back.start = killed_at
        timings["everyone decoding again"] = await slowest(
            decoding(bob, new_alice, back),
            decoding(carol, new_alice, back),
            decoding(alice, ids["Bob"], back),
            decoding(alice, ids["Carol"], back),
        )
        # The old Alice goes with her rejoin, not when n1's entries expire (4.5-5 s).
        gone = Deadline(step, 3)
        gone.start = killed_at
        timings["old Alice's tile gone"] = await slowest(
            tile_gone(bob, ids["Alice"], gone), tile_gone(carol, ids["Alice"], gone)
        )
    finally:
        for watch in watches:
            watch.__exit__()
    for watch in watches:
        watch.check(step)

    for peer in browsers:
        assert peer.problems() == [], f"{peer.name}: {peer.problems()}\n{peer.log()}"
    print("cluster browser timings (s):", {k: round(v, 2) for k, v in timings.items()})
