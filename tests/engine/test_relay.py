"""Relays between two media planes (sfu/media/relay.py): two real engines on loopback, one
dialing the other, ICE and DTLS-SRTP between them like a client's; a track published on one
crosses to a subscriber-side mirror on the other with its payload unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sfu.media.api import MediaEvent, TransportClosed, TransportConnected
from sfu.media.dtls import DtlsCertificate
from sfu.media.engine import MediaEngine, MediaSettings
from sfu.media.local import LocalMedia
from sfu.media.producer import TrackCodec
from sfu.media.relay import RelayEnd
from tests.engine import harness as harness_module
from tests.engine.harness import inject_srtp, payload_of, vp8_packet

VP8 = TrackCodec("VP8", 90000, 96, 97)
PUBLISHER = ("127.0.0.1", 40000)


class Plane:
    def __init__(self, certificate: DtlsCertificate) -> None:
        settings = MediaSettings(
            "127.0.0.1", 0, (), fastpath=harness_module.DEFAULT_FASTPATH, handshake_timeout=3.0
        )
        self.engine = MediaEngine(settings, certificate)
        self.media = LocalMedia(self.engine)
        self.events: list[MediaEvent] = []
        self.media.sink = self.events.append

    @property
    def port(self) -> int:
        return self.engine.candidates[0][1]

    def connected(self, transport_id: str) -> bool:
        return any(
            isinstance(e, TransportConnected) and e.transport_id == transport_id
            for e in self.events
        )

    def closed(self, transport_id: str) -> TransportClosed | None:
        return next(
            (
                e
                for e in self.events
                if isinstance(e, TransportClosed) and e.transport_id == transport_id
            ),
            None,
        )


@pytest.fixture
async def planes() -> AsyncIterator[tuple[Plane, Plane]]:
    certificate = DtlsCertificate.generate()
    a, b = Plane(certificate), Plane(certificate)
    await a.engine.start()
    await b.engine.start()
    try:
        yield a, b
    finally:
        await a.engine.close()
        await b.engine.close()


async def _until(condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def _open(a: Plane, b: Plane, *, fingerprint_of: DtlsCertificate | None = None) -> None:
    fingerprints = [(fingerprint_of or a.engine.certificate).fingerprint]
    answer, dial = RelayEnd.pair(fingerprints, ("127.0.0.1", a.port))
    a.media.create_relay(answer, "relay-a")
    b.media.create_relay(dial, "relay-b")


async def test_a_relay_connects_and_carries_a_feed_to_a_mirror_unchanged(
    planes: tuple[Plane, Plane],
) -> None:
    a, b = planes
    _open(a, b)
    await _until(lambda: a.connected("relay-a") and b.connected("relay-b"))
    relay_b = b.engine.transports["relay-b"]
    assert relay_b.dtls.client
    assert relay_b.dtls.srtp_profile is not None
    assert b.engine.transports["relay-b"].dialer is not None

    # A track on A (its publisher faked by handing the producer packets directly), fed into
    # the relay; on B a mirror with the feed's SSRC.
    publisher = a.media.create_transport("whip", "u", "p" * 22, [])
    track = a.media.add_producer(
        publisher.id, kind="video", mid="0", codec=VP8, ext_ids={}, ssrc=1234, rtx_ssrc=None
    )
    feed = a.media.add_subscription(
        "relay-a", track.id, payload_type=96, rtx_payload_type=97, ext_map={}
    )
    mirror = b.media.add_producer(
        "relay-b", kind="video", mid="m1", codec=VP8, ext_ids={}, ssrc=feed.ssrc, rtx_ssrc=None
    )
    seen: list[bytes] = []
    relay_b.packet_tap = seen.append
    transport = a.engine.transports[publisher.id]
    client = inject_srtp(transport, PUBLISHER)
    a.engine._by_addr[PUBLISHER] = transport
    a.engine._map_native(PUBLISHER, transport)
    packets = [vp8_packet(seq, seq * 3000, keyframe=seq == 0, ssrc=1234) for seq in range(30)]
    for packet in packets:
        protected = client.protect_rtp(packet)
        assert protected is not None
        a.engine.deliver(protected, PUBLISHER)
        await asyncio.sleep(0.005)
    await _until(lambda: len(seen) >= 25)
    payloads = [payload_of(p) for p in packets]
    arrived = {payload_of(p) for p in seen}
    assert sum(p in arrived for p in payloads) >= 25
    assert all(int.from_bytes(p[8:12], "big") == feed.ssrc for p in seen)
    assert b.engine.transports["relay-b"].producers[0].id == mirror.id


async def test_a_relay_whose_peer_shows_another_certificate_fails_on_both_ends(
    planes: tuple[Plane, Plane],
) -> None:
    a, b = planes
    _open(a, b, fingerprint_of=DtlsCertificate.generate())
    await _until(lambda: a.closed("relay-a") is not None and b.closed("relay-b") is not None)
    reason = b.closed("relay-b")
    assert reason is not None
    assert "fingerprint mismatch" in reason.reason
    assert not a.connected("relay-a")
    assert not b.connected("relay-b")
