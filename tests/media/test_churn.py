"""Churn: sessions that start and end leave nothing behind in the server.

The bounded, in-process counterpart of bench/churn.py: WHIP sessions that never start ICE
(DELETEd, or ended by the ICE consent timer) and room participants who join, publish and
leave, then every registry keyed by session, transport, ufrag, address, participant, room or
identity is checked to be empty, every count gauge to read 0 and the process's fds to be
back where they were. RSS is the bench's business, not the tests'.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from OpenSSL import SSL

from bench.churn import STATE_GAUGES, generous_limits, room_cycle_once, whip_churn_once
from bench.loadgen_peer import Ssrcs, build_offer, random_ice
from sfu.app import Server
from sfu.control.admission import MAX_BUCKETS, RateTable
from sfu.media.dtls import Fingerprint
from sfu.media.local import LocalMedia
from sfu.metrics import Metrics
from tests.engine.harness import EngineHarness, vp8_packet
from tests.media.harness import running_server, token, wait_for


@pytest.fixture
async def churn_sfu() -> AsyncIterator[Server]:
    """The test server with the bench's generous limits: admission must not refuse churn."""
    env = {f"SFU_LIMITS__{name.upper()}": str(value) for name, value in generous_limits().items()}
    async with running_server(**env) as server:
        yield server


def _ours(thing: object) -> bool:
    return type(thing).__module__.startswith("sfu.") or isinstance(thing, SSL.Connection)


@contextlib.contextmanager
def cycle_collector_off() -> Iterator[list[object]]:
    """Run the block with the cycle collector off, then list what only the cycle collector
    could free: it stays in memory until a full collection, which gets rarer as the heap
    grows."""
    gc.collect()
    gc.disable()
    found: list[object] = []
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def forget_closed(server: Server, later: float = 0.0) -> None:
    """One media timer tick `later` seconds from now: it ends what timed out by then and
    forgets closed transports, as the engine's timer task would."""
    server.engine.tick(time.monotonic() + later, send_reports=False)


async def handled(server: Server) -> None:
    """Wait until every request handler (the room sockets' included) has returned."""
    await wait_for(
        lambda: "http_request" not in server.lifecycle.active(), what="handlers to return"
    )


@pytest.mark.parametrize("end", ["delete", "consent_timeout", "room_leave"])
async def test_an_ended_session_is_freed_without_the_cycle_collector(
    churn_sfu: Server, end: str
) -> None:
    sfu = churn_sfu
    async with aiohttp.ClientSession() as http:
        with cycle_collector_off() as leftovers:
            for i in range(3):
                if end == "room_leave":
                    tokens = [
                        token(sfu, f"r{i}", f"p{k}", publish=True, subscribe=True) for k in (1, 2)
                    ]
                    await room_cycle_once(http, sfu.url, tokens)
                else:
                    await whip_churn_once(
                        http,
                        sfu.url,
                        token(sfu, "w", f"pub{i}", publish=True),
                        room="w",
                        stream=f"s{i}",
                        delete=end == "delete",
                    )
            await handled(sfu)
            forget_closed(sfu, later=sfu.config.rtc.consent_timeout + 1)
            assert not sfu.engine.transports
            assert not sfu.rooms.sessions
            assert not sfu.hub.participants
    ours = [thing for thing in leftovers if _ours(thing)]
    kinds = Counter(type(thing).__qualname__ for thing in ours)
    assert not ours, f"freed only by the cycle collector: {dict(kinds)}"


async def test_an_ended_whep_session_is_freed_without_the_cycle_collector(
    churn_sfu: Server,
) -> None:
    sfu = churn_sfu
    async with aiohttp.ClientSession() as http:
        await whip_churn_once(
            http, sfu.url, token(sfu, "w", "pub", publish=True), room="w", stream="cam"
        )
        with cycle_collector_off() as leftovers:
            for i in range(3):
                offer = build_offer(
                    send=False,
                    ufrag=random_ice(8),
                    pwd=random_ice(24),
                    fingerprint=Fingerprint("sha-256", bytes(32).hex(":")),
                    ssrcs=None,
                )
                auth = {"Authorization": f"Bearer {token(sfu, 'w', f'viewer{i}', subscribe=True)}"}
                async with http.post(
                    f"{sfu.url}/whep/w/cam",
                    data=offer,
                    headers={"Content-Type": "application/sdp", **auth},
                ) as response:
                    assert response.status == 201, await response.text()
                    location = response.headers["Location"]
                async with http.delete(f"{sfu.url}{location}", headers=auth) as response:
                    assert response.status == 200
            await handled(sfu)
            forget_closed(sfu)
            assert sfu.rooms.count("whep") == 0
            (publication,) = sfu.rooms.sessions.values()
            producers = sfu.engine.transports[publication.transport.id].producers
            assert producers
            assert all(p.downtracks == [] for p in producers)
    ours = [thing for thing in leftovers if _ours(thing)]
    kinds = Counter(type(thing).__qualname__ for thing in ours)
    assert not ours, f"freed only by the cycle collector: {dict(kinds)}"


async def test_an_offer_whose_client_never_connects_holds_no_openssl_connection(
    churn_sfu: Server,
) -> None:
    """An OpenSSL connection costs about 33 kB: abandoned offers (the churn this file is
    about, or a flood of them) must not pay it before a ClientHello arrives."""
    sfu = churn_sfu
    gc.collect()
    before = sum(isinstance(thing, SSL.Connection) for thing in gc.get_objects())
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            await whip_churn_once(
                http, sfu.url, token(sfu, "w", f"pub{i}", publish=True), room="w", stream=f"s{i}"
            )
        assert len(sfu.engine.transports) == 5
        alive = sum(isinstance(thing, SSL.Connection) for thing in gc.get_objects())
    assert alive == before


async def test_a_closed_room_socket_is_freed_at_once(churn_sfu: Server) -> None:
    sfu = churn_sfu
    async with aiohttp.ClientSession() as http:
        with cycle_collector_off() as leftovers:
            for j in range(3):
                tokens = [
                    token(sfu, f"r{j}", f"p{k}", publish=True, subscribe=True) for k in (1, 2)
                ]
                await room_cycle_once(http, sfu.url, tokens)
            await handled(sfu)
    in_cycles = sum(isinstance(thing, web.WebSocketResponse) for thing in leftovers)
    leftovers.clear()
    gc.collect()
    # Every handler has returned and no cycle is left: only a timer could still hold one.
    alive = sum(isinstance(thing, web.WebSocketResponse) for thing in gc.get_objects())
    assert (in_cycles, alive) == (0, 0)


def _label_sets(metrics: Metrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in metrics.registry.collect()
        for sample in family.samples
    }


# Codec libraries loaded into *this* process: the test harness's aiortc, not the server's.
_PROCESS_GAUGES = frozenset({"sfu_media_codecs_loaded"})


def _busy_gauges(metrics: Metrics) -> dict[str, float]:
    return {
        family.name: sum(sample.value for sample in family.samples)
        for family in metrics.registry.collect()
        if family.type == "gauge"
        and family.name.startswith("sfu_")
        and family.name not in STATE_GAUGES | _PROCESS_GAUGES
        and sum(sample.value for sample in family.samples)
    }


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _churn(sfu: Server, whip: range, rooms: range) -> None:
    gate = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def publish(i: int) -> None:
            room = f"w{i // 10}"
            async with gate:
                await whip_churn_once(
                    http,
                    sfu.url,
                    token(sfu, room, f"pub{i}", publish=True),
                    room=room,
                    stream=f"s{i}",
                    delete=i % 10 == 0,
                )

        async def cycle(j: int) -> None:
            tokens = [
                token(sfu, f"r{j}", f"p{j}-{k}", publish=True, subscribe=True) for k in (1, 2)
            ]
            async with gate:
                await room_cycle_once(http, sfu.url, tokens)

        await asyncio.gather(*(publish(i) for i in whip), *(cycle(j) for j in rooms))
    await handled(sfu)
    # Whatever was not DELETEd or left ends by consent expiry, as an abandoned offer does.
    forget_closed(sfu, later=sfu.config.rtc.consent_timeout + 1)
    # The room timer drops a gone room's speaker detector.
    await wait_for(lambda: not sfu.hub.speakers, what="speaker detectors of gone rooms")


async def test_churn_leaves_registries_empty_gauges_zero_and_fds_as_they_were(
    churn_sfu: Server,
) -> None:
    sfu = churn_sfu
    baseline_fds = _fds()
    # Warm-up: the first requests create the label sets of the routes and statuses used.
    await _churn(sfu, range(20), range(4))
    label_sets = _label_sets(sfu.metrics)

    await _churn(sfu, range(20, 620), range(4, 64))

    engine, rooms, hub = sfu.engine, sfu.rooms, sfu.hub
    assert engine is not None
    assert engine.transports == {}
    # The media API's id tables and the control plane's event watchers forget ended sessions.
    media = sfu.media
    assert isinstance(media, LocalMedia)
    assert (media._tracks, media._subscriptions, media._owned, media._joins) == ({}, {}, {}, {})
    assert (sfu.events._watches, sfu.events._owner) == ({}, {})
    assert engine._by_ufrag == {}
    assert engine._by_addr == {}
    assert len(engine.agent) == 0
    assert len(rooms) == 0
    assert rooms.sessions == {}
    assert rooms.count("whip") == rooms.count("whep") == rooms.count("rtc") == 0
    assert hub.participants == {}
    assert hub.by_resume == {}
    assert sfu.admission.counts.by_identity == {}
    assert sfu.admission.pending == {}
    assert sfu.lifecycle.active() == {}
    assert _busy_gauges(sfu.metrics) == {}
    # No label set per session, stream, room or identity: the exported series are the
    # warm-up's.
    assert _label_sets(sfu.metrics) == label_sets
    await wait_for(lambda: _fds() <= baseline_fds, what="fds back to the baseline")
    assert _fds() == baseline_fds


def test_the_rate_table_forgets_identities_whose_bucket_refilled() -> None:
    # Defaults-like: 2 sessions/s, burst 10, so a bucket is full again 5 s after its use.
    table = RateTable(rate=2.0, burst=10, max_keys=MAX_BUCKETS)
    per_refill = 100  # distinct identities starting a session within one refill time
    largest = 0
    for i in range(5000):
        table.take(f"identity-{i}", now=i * (10 / 2.0) / per_refill)
        largest = max(largest, len(table))
    # A refilled bucket is the same as none: what is kept follows the identities active in
    # the last refill time, not every identity since the start.
    assert largest <= 2 * per_refill


async def _receive(ws: aiohttp.ClientWebSocketResponse, wanted: str) -> dict[str, object]:
    while True:
        message = await ws.receive_json(timeout=10)
        assert message["type"] != "error", message
        if message["type"] == wanted:
            return dict(message)


async def test_tracks_stopped_by_re_offers_leave_the_publisher_transport(
    churn_sfu: Server,
) -> None:
    """A participant who keeps stopping and restarting its video (a re-offer with the
    section inactive, then sending again on new SSRCs) keeps one transport for the whole
    call: the ended tracks and their packet rings must not pile up in it."""
    sfu = churn_sfu
    ufrag, pwd = random_ice(8), random_ice(24)
    fingerprint = Fingerprint("sha-256", bytes(32).hex(":"))
    audio_ssrc = Ssrcs.random().audio

    def offer(video: bool) -> str:
        fresh = Ssrcs.random()  # a restarted camera sends on new SSRCs; audio goes on
        ssrcs = Ssrcs(fresh.video, fresh.rtx, audio_ssrc)
        sdp = build_offer(send=True, ufrag=ufrag, pwd=pwd, fingerprint=fingerprint, ssrcs=ssrcs)
        if video:
            return sdp
        head, audio = sdp.split("m=audio", 1)
        return head.replace("a=sendonly", "a=inactive") + "m=audio" + audio

    async with aiohttp.ClientSession() as http, http.ws_connect(f"{sfu.url}/rtc") as ws:
        await ws.send_json(
            {"type": "join", "version": 1, "token": token(sfu, "call", "alice", publish=True)}
        )
        await _receive(ws, "joined")
        for video in (True, False) * 5 + (True,):
            await ws.send_json({"type": "publish_offer", "sdp": offer(video)})
            await _receive(ws, "publish_answer")
        (participant,) = sfu.hub.participants.values()
        session = participant.publication
        assert session is not None
        transport = sfu.engine.transports[session.transport.id]
        live = transport.producers
        assert sorted(p.kind for p in session.producers) == ["audio", "video"]
        assert [p.id for p in live] == [p.id for p in session.producers]
        assert not any(p.closed for p in live)
        assert set(transport.producers_by_ssrc.values()) == set(live)
        assert set(transport.rtx_by_ssrc.values()) <= set(live)
        assert set(transport.producers_by_mid.values()) == set(live)
        await ws.send_json({"type": "leave"})


def test_a_closed_track_lets_go_of_its_packets() -> None:
    """A subscriber's retired m-section keeps its ended track (for the codec it renders)
    for as long as the subscriber stays in the call; the track's packet ring must not come
    with it, or every publisher who ever left stays in memory for each one who did not."""
    harness = EngineHarness()
    publisher, producer = harness.publisher()
    subscriber, _ = harness.subscriber(producer)
    packets, size = 300, 1000
    tracemalloc.start()
    try:
        for seq in range(packets):
            publisher.send_rtp(vp8_packet(seq, 3000 * seq, keyframe=seq == 0, size=size))
        assert subscriber.receive().rtp  # forwarded, and stored for NACKs
        harness.socket.sent.clear()  # the copies sent out are not the ring's
        held = tracemalloc.get_traced_memory()[0]
        producer.close()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert freed >= packets * size
