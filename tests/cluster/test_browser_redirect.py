"""Two real Chromiums and two `sfu serve` nodes with `cluster.rooms: redirect` (a real Redis):
Alice's join at n1 places the room there; Bob opens the demo page of n2, whose server answers
his join with `redirect`, and his page follows it to n1 (another origin). Both decode each
other, E2EE on. Then n1 is killed with SIGKILL: the room is placed afresh on n2 once n1's
entries expire (`node_ttl` 2 s), and both pages rejoin there by themselves; Alice's page,
served by the dead node, knows n2 only from her `joined`.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.browser.calls import Deadline, decoding, page_event, slowest
from tests.browser.support import BrowserPeer, eventually
from tests.cluster.support import Node, cluster_formed, serve_nodes

pytestmark = [pytest.mark.slow]


@pytest.fixture
def nodes(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    logs = tmp_path_factory.mktemp("nodes")
    extra = {"SFU_RTC__ANNOUNCED_IPS": "[127.0.0.1]"}
    with serve_nodes(redis_url, logs, "redirect", names=("n1", "n2"), extra=extra) as started:
        yield started


async def _participants(http: aiohttp.ClientSession, node: Node) -> float:
    async with http.get(f"{node.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("sfu_participants "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_browser_follows_a_redirect_and_both_rejoin_when_the_room_s_node_dies(
    nodes: list[Node], browsers: list[BrowserPeer]
) -> None:
    n1, n2 = nodes
    alice, bob, _ = browsers
    room, passphrase = f"moved-{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    async with aiohttp.ClientSession() as http:
        await cluster_formed(http, nodes)
        ids = {"Alice": (await alice.join(n1.url, room, passphrase))["id"]}
        ids["Bob"] = (await bob.join(n2.url, room, passphrase))["id"]
        # Both are served by n1: Bob's page was sent there.
        assert await _participants(http, n1) == 2
        assert await _participants(http, n2) == 0
        start = Deadline("redirected call", 30)
        await slowest(decoding(alice, ids["Bob"], start), decoding(bob, ids["Alice"], start))

        step = "the room's node killed"
        killed_at = time.monotonic()
        n1.process.send_signal(signal.SIGKILL)
        rejoined = Deadline(step, 10)
        for peer in (alice, bob):
            event = await eventually(
                lambda peer=peer: page_event(peer, "rejoined"),
                rejoined.left(),
                f"[{step}] {peer.name}'s page rejoining",
            )
            assert event["node"] == f"ws://127.0.0.1:{n2.port}/rtc", event
        took = time.monotonic() - killed_at
        new = {
            peer.name: (await peer.eval("() => window.blindfoldTest.self"))["id"]
            for peer in (alice, bob)
        }
        assert new["Alice"] != ids["Alice"]
        back = Deadline(step, 15)
        back.start = killed_at
        again = await slowest(decoding(alice, new["Bob"], back), decoding(bob, new["Alice"], back))
        assert await _participants(http, n2) == 2
    for peer in (alice, bob):
        assert peer.problems() == [], f"{peer.name}: {peer.problems()}\n{peer.log()}"
    print(f"\nredirect failover: both rejoined {took:.2f} s after the kill, decoding {again:.2f} s")
