"""Two nodes in this process, coordinated by a real Redis, with `cluster.rooms: redirect`: the
registry, room placement, WHIP and WHEP redirects (307), room-protocol redirects, a clean
stop, and the errors a wrong cluster configuration gives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiortc import RTCPeerConnection

from sfu.app import Server, StartupError
from sfu.client.room import RoomClient
from sfu.client.whip import Subscription
from sfu.client.whip import subscribe as whep_subscribe
from sfu.config import ConfigError, load_config
from tests.conftest import free_port
from tests.media.harness import (
    ColourTrack,
    Counter,
    ToneTrack,
    make_config,
    metrics_text,
    publish,
)
from tests.media.harness import token as mint


def _cluster_env(redis_url: str, node: str, port: int, rooms: str = "redirect") -> dict[str, str]:
    return {
        "SFU_HTTP__PORT": str(port),
        "SFU_CLUSTER__ENABLED": "true",
        "SFU_CLUSTER__ROOMS": rooms,
        "SFU_CLUSTER__REDIS_URL": redis_url,
        "SFU_CLUSTER__NODE_ID": node,
        "SFU_CLUSTER__ADVERTISED_URL": f"http://127.0.0.1:{port}",
        "SFU_CLUSTER__HEARTBEAT_INTERVAL": "0.2",
        "SFU_CLUSTER__NODE_TTL": "1",
    }


@contextlib.asynccontextmanager
async def node(redis_url: str, name: str, rooms: str = "redirect") -> AsyncIterator[Server]:
    server = Server(make_config(**_cluster_env(redis_url, name, free_port(), rooms)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def two(redis_url: str) -> AsyncIterator[tuple[Server, Server]]:
    async with node(redis_url, "alpha") as a, node(redis_url, "beta") as b:
        await asyncio.sleep(0.5)  # a heartbeat each: both see both
        yield a, b


async def test_nodes_see_each_other_and_requests_follow_the_room(
    two: tuple[Server, Server],
) -> None:
    a, b = two
    assert a.cluster is not None
    assert b.cluster is not None
    assert {n.id for n in a.cluster.nodes} == {"alpha", "beta"}
    assert {n.url for n in b.cluster.nodes} == {a.url, b.url}

    # The room is placed where its first request arrives (equal load: the node itself).
    pc, _ = await publish(a, room="stage", tracks=[ColourTrack(), ToneTrack()])
    viewer: Subscription | None = None
    try:
        assert a.rooms.get("stage") is not None
        # A viewer asking the other node is sent to the room's node with a 307 and follows.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{b.url}/whep/stage/cam",
                data="v=0",
                headers={"Authorization": f"Bearer {mint(b, 'stage', 'probe', subscribe=True)}"},
                allow_redirects=False,
            ) as response,
        ):
            assert response.status == 307
            assert response.headers["Location"] == f"{a.url}/whep/stage/cam"
        # The Python WHEP client follows it, keeping its token (aiohttp alone would drop the
        # Authorization header on a redirect to another origin).
        viewer, session = await _decoding_viewer(
            f"{b.url}/whep/stage/cam", mint(b, "stage", "viewer", subscribe=True)
        )
        assert session.startswith(a.url)
        assert b.rooms.get("stage") is None
        assert a.rooms.count("whep") == 1
        assert b.cluster.placements["redirect"] >= 2

        # The room protocol: a join at the wrong node is redirected, and the client follows.
        client = RoomClient(b.url, mint(b, "stage", "carol", subscribe=True))
        try:
            joined = await client.connect()
            assert joined["type"] == "joined"
            assert client.base_url == a.url
            assert len(a.hub.by_resume) == 1
            # `joined` names the other live nodes, where a rejoin may go if this one dies.
            assert joined["nodes"] == [b.url.replace("http", "ws", 1) + "/rtc"]
        finally:
            await client.leave()
        # A draining node takes no one back: it is no longer named.
        b.lifecycle.start_draining()
        alpha = a.cluster
        await _until(
            lambda: any(n.id == "beta" and n.draining for n in alpha.nodes),
            "alpha seeing beta drain",
        )
        client = RoomClient(a.url, mint(a, "stage", "dave", subscribe=True))
        try:
            assert (await client.connect())["nodes"] == []
        finally:
            await client.leave()

        text = await metrics_text(b)
        assert 'sfu_cluster_placements_total{result="redirect"}' in text
        assert "sfu_cluster_up 1.0" in text
        assert 'sfu_cluster_node_load{node="alpha"}' in text
    finally:
        if viewer is not None:
            await viewer.close()
        await pc.close()


async def test_a_node_that_stops_leaves_the_registry_and_its_rooms_at_once(
    redis_url: str,
) -> None:
    async with node(redis_url, "gamma") as c:
        async with node(redis_url, "delta") as d:
            pc, _ = await publish(d, room="moving", tracks=[ColourTrack()])
            await pc.close()
            probe = aioredis.from_url(redis_url, decode_responses=True)
            try:
                assert await probe.get("blindfold:room:moving") == "delta"
            finally:
                await probe.aclose()
        # delta stopped cleanly: its entries are gone now, not after the TTL.
        probe = aioredis.from_url(redis_url, decode_responses=True)
        try:
            assert await probe.get("blindfold:node:delta") is None
            assert await probe.get("blindfold:room:moving") is None
        finally:
            await probe.aclose()
        assert c.cluster is not None
        assert await c.cluster.place("moving") is None  # placed here now


async def test_one_identity_is_one_participant_across_nodes(redis_url: str) -> None:
    """`span`: the same identity joining through another node replaces the older participant,
    as on one node; a stale replace (a lower slot) never removes a newer one."""
    async with node(redis_url, "east", "span") as east, node(redis_url, "west", "span") as west:
        assert east.federation is not None
        assert west.federation is not None
        first = RoomClient(east.url, mint(east, "hall", "sam", subscribe=True))
        watcher = RoomClient(west.url, mint(west, "hall", "obs", subscribe=True))
        second = RoomClient(west.url, mint(west, "hall", "sam", subscribe=True))
        try:
            await first.connect()
            await watcher.connect()
            seen = await watcher.next_event("participant_joined", within=10)
            assert seen["participant"]["id"] == first.participant_id
            # sam again, through the other node: the first sam is told and removed there,
            # and the watcher sees one sam leave and one join.
            await second.connect()
            replaced = await first.next_event("error", within=10)
            assert (replaced["code"], replaced["fatal"]) == ("replaced", True)
            gone = await watcher.next_event("participant_left", within=10)
            assert gone["participant"] == first.participant_id
            assert not any(p.identity == "sam" for p in east.hub.participants.values())
            sams = [p for p in west.hub.participants.values() if p.identity == "sam"]
            assert [p.id for p in sams] == [second.participant_id]
            assert sams[0].slot > int(first.joined["participant"]["slot"])
            # A replace that crossed with this join (its slot is lower) leaves sam be.
            hall = west.rooms.get("hall")
            assert hall is not None
            west.federation._on_replace(
                {"room": "hall", "identity": "sam", "participant": "p-stale", "slot": 1}
            )
            assert [p.id for p in west.hub.participants.values() if p.identity == "sam"] == [
                second.participant_id
            ]
        finally:
            for client in (first, watcher, second):
                with contextlib.suppress(Exception):
                    await client.leave()


async def test_span_a_whep_viewer_at_another_node_is_sent_to_the_stream_s_node(
    redis_url: str,
) -> None:
    """`span`: WHEP for a stream published on another node (this node has nobody in the room,
    so it does not follow it) is answered with a 307 to that node; an unknown stream is still
    a 404."""
    async with node(redis_url, "north", "span") as north, node(redis_url, "south", "span") as south:
        pc, _ = await publish(north, room="show", tracks=[ColourTrack(), ToneTrack()])
        viewer: Subscription | None = None
        try:
            assert south.rooms.get("show") is None
            async with aiohttp.ClientSession() as http:
                probe = RTCPeerConnection()
                probe.addTransceiver("video", direction="recvonly")
                await probe.setLocalDescription(await probe.createOffer())
                await probe.close()

                async def ask(stream: str) -> aiohttp.ClientResponse:
                    async with http.post(
                        f"{south.url}/whep/show/{stream}",
                        data=probe.localDescription.sdp,
                        headers={
                            "Content-Type": "application/sdp",
                            "Authorization": f"Bearer {mint(south, 'show', 'v', subscribe=True)}",
                        },
                        allow_redirects=False,
                    ) as response:
                        await response.read()
                        return response

                # north publishes its part of the room with its next flush: ask until then.
                for _ in range(50):
                    response = await ask("cam")
                    if response.status == 307:
                        break
                    await asyncio.sleep(0.1)
                assert response.status == 307, response.status
                assert response.headers["Location"] == f"{north.url}/whep/show/cam"
                missing = await ask("nobody")
                assert missing.status == 404
                assert missing.content_type == "application/problem+json"
            viewer, session = await _decoding_viewer(
                f"{south.url}/whep/show/cam", mint(south, "show", "viewer", subscribe=True)
            )
            assert session.startswith(north.url)
            # Once south has a participant in the room it shows north's stream through the
            # relay, and serves a WHEP viewer of it itself.
            member = RoomClient(south.url, mint(south, "show", "member", subscribe=True))
            await member.connect()
            try:
                await _until(
                    lambda: "cam" in getattr(south.rooms.get("show"), "publications", {}),
                    "south showing cam",
                )
                here, session = await _decoding_viewer(
                    f"{south.url}/whep/show/cam", mint(south, "show", "viewer2", subscribe=True)
                )
                await here.close()
                assert session.startswith(south.url)
            finally:
                await member.leave()
        finally:
            if viewer is not None:
                await viewer.close()
            await pc.close()


async def test_a_second_node_with_the_same_id_is_refused(redis_url: str) -> None:
    async with node(redis_url, "twin"):
        server = Server(make_config(**_cluster_env(redis_url, "twin", free_port())))
        with pytest.raises(StartupError, match=r"cluster\.node_id: a live node already"):
            await server.start()


async def test_an_unreachable_redis_stops_the_start_naming_the_key() -> None:
    port = free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    server = Server(make_config(**_cluster_env(url, "lonely", free_port())))
    with pytest.raises(StartupError) as error:
        await server.start()
    assert "cluster.redis_url: cannot reach Redis at redis://:***@127.0.0.1" in str(error.value)
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SFU_CLUSTER__ENABLED": "true"}, "advertised_url is required"),
        (
            {"SFU_CLUSTER__NODE_TTL": "6", "SFU_CLUSTER__HEARTBEAT_INTERVAL": "1"},
            "node_ttl must be above 0 s and at most 5 s",
        ),
        ({"SFU_CLUSTER__HEARTBEAT_INTERVAL": "2"}, "at most half of node_ttl"),
        ({"SFU_CLUSTER__ADVERTISED_URL": "ftp://x"}, "cluster.advertised_url"),
    ],
)
def test_cluster_config_errors_say_what_to_fix(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, env=env)
    text = str(error.value)
    assert "cluster" in text
    assert expected in text


async def _decoding_viewer(url: str, token: str) -> tuple[Subscription, str]:
    """A WHEP viewer of `url` (following a redirect) once it has decoded 10 video frames;
    returns it and the URL of its session."""
    decoded = Counter()
    viewer = await whep_subscribe(url, token, on_track=decoded.on_track)
    try:
        await _until(lambda: decoded.frames["video"] >= 10, f"a viewer of {url} decoding")
    except BaseException:
        await viewer.close()
        raise
    return viewer, str(viewer.resource_url)


async def _until(condition: object, what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_e2ee_slots_stay_unique_when_redis_lost_the_counter(redis_url: str) -> None:
    """Span mode takes key ids (slots) from a Redis counter; a counter Redis lost (a restart
    without persistence) starts again above every slot still held in the room."""
    env = {**_cluster_env(redis_url, "solo", free_port()), "SFU_CLUSTER__ROOMS": "span"}
    server = Server(make_config(**env))
    await server.start()
    first = RoomClient(server.url, mint(server, "keys", "first", subscribe=True))
    second = RoomClient(server.url, mint(server, "keys", "second", subscribe=True))
    try:
        joined = await first.connect()
        assert joined["participant"]["slot"] == 1
        probe = aioredis.from_url(redis_url, decode_responses=True)
        try:
            assert await probe.get("blindfold:slot:keys") == "1"
            await probe.delete("blindfold:slot:keys")
        finally:
            await probe.aclose()
        joined = await second.connect()
        assert joined["participant"]["slot"] == 2
    finally:
        for client in (first, second):
            await client.leave()
        await server.close()
