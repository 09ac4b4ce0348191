"""Three `sfu serve` processes and a real Redis, `cluster.rooms: span`: one room whose
participants sit on all three nodes. Everyone decodes everyone (E2EE on; a keyless observer
decodes nothing) through one relay per pair of nodes; then one node is killed with SIGKILL:
the participants on the other two never stop receiving each other, and the killed node's
participant is back in the call through another node by itself."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.cluster.support import (
    COLOURS,
    Node,
    Participant,
    cast,
    cluster_formed,
    join_all,
    left,
    serve_nodes,
    until,
)


@pytest.fixture(
    params=[
        pytest.param({}, id="one-media-plane-per-node"),
        # Two workers per node, each room spread over both: node relays, worker relays and
        # mirrors of mirrors all in one call.
        pytest.param(
            {"SFU_RTC__WORKERS": "2", "SFU_RTC__ROOM_TRANSPORTS_PER_WORKER": "1"},
            id="two-workers-per-node",
        ),
    ]
)
def nodes(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[list[Node]]:
    logs = tmp_path_factory.mktemp("nodes")
    with serve_nodes(redis_url, logs, "span", extra=request.param) as started:
        yield started


async def _metric(http: aiohttp.ClientSession, node: Node, name: str) -> float:
    async with http.get(f"{node.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {node.name}'s metrics")


def _sees(people: list[Participant], since: dict[str, dict[str, int]], frames: int) -> bool:
    return all(
        p.seen.get(other, 0) >= since[p.name].get(other, 0) + frames
        for p in people
        for other in COLOURS
        if other != p.name
    )


async def test_a_room_spans_three_nodes_and_survives_one_of_them(nodes: list[Node]) -> None:
    async with aiohttp.ClientSession() as http:
        await cluster_formed(http, nodes)
        n1, n2, n3 = nodes
        # alice is given no other node: when n1 dies she finds the call through the nodes
        # her `joined` named.
        people, eve = cast(nodes, alice_fallbacks=False)
        alice, bob, carol = people
        async with left([*people, eve]):
            await join_all(people, eve)
            # Nobody was redirected: each participant is served where it arrived.
            assert [p.client.base_url for p in people] == [n1.url, n2.url, n3.url]
            # Each `joined` named the two other live nodes, which rejoins may go through.
            assert alice.client.joined["nodes"] == [
                f"ws://127.0.0.1:{n.port}/rtc" for n in (n2, n3)
            ]
            assert alice.client.entry_urls == [n1.url, n2.url, n3.url]
            zero: dict[str, dict[str, int]] = {p.name: {} for p in people}
            took = await until(lambda: _sees(people, zero, 10), "everyone decoding everyone", 40)
            # Every participant is listed on every node (ids are the same everywhere).
            ids = {p.client.participant_id for p in [*people, eve]}
            for person in people:
                others = {q["id"] for q in person.client.joined.get("participants", [])}
                events = []
                while not person.client.events.empty():
                    events.append(person.client.events.get_nowait())
                others |= {
                    e["participant"]["id"] for e in events if e.get("type") == "participant_joined"
                }
                assert ids - {person.client.participant_id} <= others, person.name
            # The blind key-exchange relay crosses nodes: to one participant, and to everyone.
            await bob.client.relay("dG8gY2Fyb2w=", to=carol.client.participant_id)
            message = await carol.client.next_event("relay", within=5)
            assert message["from"] == bob.client.participant_id
            assert message["payload"] == "dG8gY2Fyb2w="
            await alice.client.relay("aGVsbG8=")
            for person in (bob, carol, eve):
                message = await person.client.next_event("relay", within=5)
                assert message["from"] == alice.client.participant_id, person.name
                assert message["payload"] == "aGVsbG8="
            # The keyless observer gets the same encrypted frames and can open none.
            assert eve.seen == {}
            assert eve.context.counters.unknown_kid > 0
            assert eve.context.counters.frames_unprotected == 0
            # One relay from each node to each of the two others.
            for node in nodes:
                assert await _metric(http, node, "sfu_cluster_relays") == 2, node.name
            if await _metric(http, n2, "sfu_media_workers") == 2:
                # n2 holds bob's two transports and eve's, spread over its two workers.
                assert await _metric(http, n2, "sfu_relays") >= 1

            # SIGKILL alice's node. bob (n2) and carol (n3) must keep receiving each other.
            killed_at = time.monotonic()
            n1.process.send_signal(signal.SIGKILL)
            longest_gap = 0.0
            last = {
                name: (time.monotonic(), dict(p.seen))
                for name, p in (("bob", bob), ("carol", carol))
            }
            while time.monotonic() - killed_at < 4.0:
                await asyncio.sleep(0.1)
                for name, person, other in (("bob", bob, "carol"), ("carol", carol, "bob")):
                    at, seen = last[name]
                    if person.seen.get(other, 0) > seen.get(other, 0):
                        last[name] = (time.monotonic(), dict(person.seen))
                    else:
                        longest_gap = max(longest_gap, time.monotonic() - at)
            assert longest_gap < 1.0, (
                f"bob and carol stopped receiving each other for {longest_gap:.2f} s"
            )

            await until(lambda: alice.rejoined_at is not None, "alice rejoined", 15)
            assert alice.rejoined_at is not None
            rejoin = alice.rejoined_at - killed_at
            assert alice.client.base_url in (n2.url, n3.url)
            before = {p.name: dict(p.seen) for p in people}
            back = await until(lambda: _sees(people, before, 10), "decoding again", 20)
            for node in (n2, n3):
                assert await _metric(http, node, "sfu_cluster_relays") == 1, node.name
            print(
                f"\ncall up in {took:.2f} s; node killed -> alice rejoined in {rejoin:.2f} s, "
                f"everyone decoding everyone {time.monotonic() - killed_at:.2f} s after the kill "
                f"(+{back:.2f} s); bob/carol longest gap {longest_gap:.2f} s"
            )
            assert rejoin <= 5.0, f"alice rejoined {rejoin:.2f} s after the kill"
