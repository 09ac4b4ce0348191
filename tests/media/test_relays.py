"""Rooms that span media workers (`rtc.room_transports_per_worker`): a publisher on one
worker, subscribers on the other, joined by a relay between the two workers over
DTLS-SRTP on loopback. Real worker processes, real aiortc peers, E2EE frames end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import pytest

from sfu.app import Server
from sfu.client.e2ee import E2eeConfig, EncryptedFrame
from sfu.client.sframe import compose_kid
from sfu.client.whip import Publication, Subscription, publish, subscribe
from sfu.control.sdp import parse_sdp
from tests.media.harness import (
    ColourTrack,
    Counter,
    ToneTrack,
    metric_value,
    metrics_text,
    running_server,
    token,
    wait_for,
)

KID = compose_kid(7, 0)
KEY = bytes(range(64, 80))


@pytest.fixture
async def sfu() -> AsyncIterator[Server]:
    async with running_server(
        SFU_RTC__WORKERS="2", SFU_RTC__ROOM_TRANSPORTS_PER_WORKER="1"
    ) as server:
        yield server


class Viewer:
    def __init__(self) -> None:
        self.received: list[EncryptedFrame] = []
        self.decoded = Counter()
        self.subscription: Subscription | None = None

    async def start(self, sfu: Server, room: str, name: str, keyed: bool = True) -> None:
        self.subscription = await subscribe(
            f"{sfu.url}/whep/{room}/cam",
            token(sfu, room, name, subscribe=True),
            E2eeConfig(receive_keys={KID: KEY} if keyed else {}, on_frame=self.received.append),
            on_track=self.decoded.on_track,
        )

    def port(self) -> int:
        assert self.subscription is not None
        return _port(self.subscription.pc.remoteDescription.sdp)

    def decoding(self, video: int = 20, audio: int = 30) -> bool:
        return self.decoded.frames["video"] >= video and self.decoded.frames["audio"] >= audio


def _port(sdp: str) -> int:
    ports = {int(value.split()[5]) for m in parse_sdp(sdp).media for value in m.values("candidate")}
    assert len(ports) == 1, ports
    return ports.pop()


async def test_subscribers_on_another_worker_get_the_frames_unchanged_through_one_relay(
    sfu: Server,
) -> None:
    assert sfu.pool is not None
    sent: list[EncryptedFrame] = []
    publication: Publication | None = None
    viewers = [Viewer() for _ in range(3)]
    try:
        publication = await publish(
            f"{sfu.url}/whip/big/cam",
            token(sfu, "big", "presenter", publish=True),
            [ColourTrack((30, 160, 220)), ToneTrack()],
            E2eeConfig(send_kid=KID, send_key=KEY, on_frame=sent.append),
        )
        for i, viewer in enumerate(viewers):
            await viewer.start(sfu, "big", f"viewer-{i}")
        await wait_for(
            lambda: all(v.decoding() for v in viewers), timeout=30, what="every viewer decoding"
        )
        # The room spans both workers: the publisher on one, viewers on both.
        publisher_port = _port(publication.pc.remoteDescription.sdp)
        ports = [v.port() for v in viewers]
        remote = [v for v, p in zip(viewers, ports, strict=True) if p != publisher_port]
        local = [v for v, p in zip(viewers, ports, strict=True) if p == publisher_port]
        assert len(remote) == 2, (publisher_port, ports)
        assert len(local) == 1, (publisher_port, ports)

        # Frames arrive through the relay exactly as the publisher protected them.
        sent_bytes = {bytes(f.data) for f in sent}
        for viewer in viewers:
            got = [bytes(f.data) for f in viewer.received]
            assert len(got) >= 50
            assert sum(frame in sent_bytes for frame in got) >= len(got) - 2

        # One relay between the two workers, one copy of each track (audio, video) crossing
        # it however many viewers it has there.
        assert sfu.pool.mesh.relays() == 1
        assert sfu.pool.mesh.mirrors() == 2
        await asyncio.sleep(1.2)  # a fresh snapshot from each worker
        text = await metrics_text(sfu)
        assert metric_value(text, "sfu_relays") == 1
        assert metric_value(text, "sfu_relayed_tracks") == 2
        assert metric_value(text, "sfu_relay_transports") == 2
        assert metric_value(text, "sfu_relay_packets_sent_total") > 100
        # Relay ends and mirrored tracks are not clients' transports and tracks.
        assert metric_value(text, 'sfu_published_tracks{kind="video"}') == 1
        assert metric_value(text, "sfu_subscriptions") == 6
        assert metric_value(text, "sfu_media_worker_transports") == 4

        # The far viewers leave: the copies stop crossing and the idle relay closes.
        for viewer in remote:
            assert viewer.subscription is not None
            await viewer.subscription.close()
            viewer.subscription = None
        await wait_for(lambda: sfu.pool.mesh.mirrors() == 0, timeout=5, what="mirrors closed")
        assert sfu.pool.mesh.relays() == 0
        await wait_for(
            lambda: all(not r.relays for r in sfu.pool.workers), timeout=5, what="relay ends gone"
        )
        # The viewer on the publisher's worker never depended on the relay.
        still = local[0].decoded.frames["video"]
        await wait_for(
            lambda: local[0].decoded.frames["video"] > still + 10,
            timeout=5,
            what="the near viewer still decoding",
        )
        # A viewer arriving later on the far worker gets a fresh copy.
        late = Viewer()
        viewers.append(late)
        await late.start(sfu, "big", "late")
        assert late.port() != publisher_port
        await wait_for(late.decoding, timeout=20, what="the late viewer decoding")
        assert sfu.pool.mesh.relays() == 1
        assert sfu.pool.mesh.relays_opened == 2
        assert sfu.pool.mesh.relays_failed == 0
    finally:
        for viewer in viewers:
            if viewer.subscription is not None:
                with contextlib.suppress(Exception):
                    await viewer.subscription.close()
        if publication is not None:
            await publication.close()


async def test_a_relay_worker_killed_closes_only_the_viewers_it_served(sfu: Server) -> None:
    """SIGKILL the worker that holds the far viewers: they are closed (and would reconnect),
    the viewer on the publisher's worker never stops, and a new far viewer works through a
    new relay once the worker is back."""
    assert sfu.pool is not None
    publication: Publication | None = None
    viewers = [Viewer(), Viewer()]
    try:
        publication = await publish(
            f"{sfu.url}/whip/split/cam",
            token(sfu, "split", "presenter", publish=True),
            [ColourTrack((220, 160, 30)), ToneTrack()],
            E2eeConfig(send_kid=KID, send_key=KEY),
        )
        for i, viewer in enumerate(viewers):
            await viewer.start(sfu, "split", f"viewer-{i}")
        await wait_for(lambda: all(v.decoding() for v in viewers), timeout=30, what="viewers")
        publisher_port = _port(publication.pc.remoteDescription.sdp)
        far = next(v for v in viewers if v.port() != publisher_port)
        near = next(v for v in viewers if v.port() == publisher_port)
        victim = next(
            r for r in sfu.pool.workers if any(port == far.port() for _, port in r.candidates)
        )
        before = near.decoded.frames["video"]
        os.kill(victim.pid, signal.SIGKILL)
        await wait_for(lambda: sfu.pool.mesh.relays() == 0, timeout=5, what="the relay forgotten")
        await wait_for(
            lambda: victim.running and victim.snapshot() is not None,
            timeout=10,
            what="the worker restarted",
        )
        await asyncio.sleep(1.0)
        assert near.decoded.frames["video"] > before + 10
        again = Viewer()
        viewers.append(again)
        await again.start(sfu, "split", "again")
        await wait_for(again.decoding, timeout=25, what="a viewer after the restart")
    finally:
        for viewer in viewers:
            if viewer.subscription is not None:
                with contextlib.suppress(Exception):
                    await viewer.subscription.close()
        if publication is not None:
            with contextlib.suppress(Exception):
                await publication.close()
