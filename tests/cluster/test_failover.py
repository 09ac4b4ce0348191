"""Three `sfu serve` processes and a real Redis, `cluster.rooms: redirect`: participants enter
through all three nodes, meet in one call on the room's node (redirects), with E2EE on; then
that node is killed with SIGKILL and every participant is back in the call, on another node,
by itself."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.cluster.support import (
    COLOURS,
    Node,
    cast,
    join_all,
    left,
    ready,
    serve_nodes,
    until,
)


@pytest.fixture
def nodes(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    with serve_nodes(redis_url, tmp_path_factory.mktemp("nodes"), "redirect") as started:
        yield started


async def test_three_nodes_one_call_and_a_killed_node_s_participants_come_back(
    nodes: list[Node],
) -> None:
    async with aiohttp.ClientSession() as http:
        for node in nodes:
            await ready(http, node)
    n1, n2, n3 = nodes
    people, eve = cast(nodes)
    async with left([*people, eve]):
        # alice's join places the room on n1 (all nodes idle: the one asked wins the tie);
        # the others enter through n2 and n3 and are redirected there.
        await join_all(people, eve)
        assert {p.client.base_url for p in [*people, eve]} == {n1.url}

        def everyone_sees_everyone(since: dict[str, dict[str, int]]) -> bool:
            return all(
                p.seen.get(other, 0) >= since[p.name].get(other, 0) + 10
                for p in people
                for other in COLOURS
                if other != p.name
            )

        zero: dict[str, dict[str, int]] = {p.name: {} for p in people}
        await until(lambda: everyone_sees_everyone(zero), "everyone decoding everyone", 40)
        # The keyless observer gets the same encrypted frames and can open none of them.
        assert eve.seen == {}
        assert eve.context.counters.unknown_kid > 0
        assert eve.context.counters.frames_unprotected == 0

        # SIGKILL the room's node: no goodbye, its Redis entries simply stop being renewed.
        killed_at = time.monotonic()
        n1.process.send_signal(signal.SIGKILL)
        before = {p.name: dict(p.seen) for p in people}
        await until(lambda: all(p.rejoined_at is not None for p in people), "everyone rejoined", 15)
        rejoin = max(p.rejoined_at or 0 for p in people) - killed_at
        assert rejoin <= 5.0, f"the last participant rejoined {rejoin:.2f} s after the kill"
        try:
            back = await until(lambda: everyone_sees_everyone(before), "decoding again", 20)
        except AssertionError:
            state = {
                p.name: (
                    p.client.base_url,
                    p.client.rejoins,
                    before[p.name],
                    p.seen,
                    p.context.counters,
                    len(p.client.remote_tracks),
                    p.client.subscriber.connectionState,
                    p.client.publisher.connectionState if p.client.publisher else None,
                )
                for p in people
            }
            raise AssertionError(f"not everyone decodes everyone again: {state}") from None
        homes = {p.client.base_url for p in people}
        assert len(homes) == 1
        assert homes <= {n2.url, n3.url}
        print(
            f"\nnode killed -> all rejoined in {rejoin:.2f} s, everyone decoding everyone "
            f"{rejoin + back:.2f} s after the kill (on {homes.pop()})"
        )
