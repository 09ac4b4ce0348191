"""The media API (sfu/media/api.py) as the engine implements it in-process (`LocalMedia`):
the control plane's commands by id, and the events it gets back, on a real engine (both
forwarding paths) with simulated clients."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from sfu.media.api import (
    ActiveSpeakers,
    MediaEvent,
    PolicyViolation,
    ProducerInfo,
    TransportClosed,
    UnknownMediaId,
)
from sfu.media.ice import random_ice_string
from sfu.media.local import SPEAKER_INTERVAL, LocalMedia
from sfu.media.producer import Producer
from sfu.media.rtcp import Bye
from tests.engine.harness import (
    AUDIO_SSRC,
    OPUS,
    VIDEO_SSRC,
    VP8,
    Client,
    EngineHarness,
    opus_packet,
    payload_of,
    rtp_packet,
    vp8_packet,
    vp8_payload,
)

LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
LEVEL_ID = 1


class Api:
    """LocalMedia over a harness engine, recording every event it emits."""

    def __init__(self, harness: EngineHarness) -> None:
        self.harness = harness
        self.media = LocalMedia(harness.engine)
        self.events: list[MediaEvent] = []
        self.media.sink = self.events.append

    def client(self, role: str, *, connect: bool = True) -> tuple[str, Client]:
        info = self.media.create_transport(role, random_ice_string(8), random_ice_string(24), [])
        transport = self.harness.engine.transports[info.id]
        client = Client(self.harness, transport, next(self.harness._hosts))
        if connect:
            client.connect()
        return info.id, client

    def producer(self, info: ProducerInfo) -> Producer:
        """The engine's producer behind `info`, on the harness clock."""
        transport = self.harness.engine.transports[info.transport_id]
        producer = transport.producers_by_mid[info.mid]
        assert isinstance(producer, Producer)
        producer.clock = self.harness.clock
        producer.created_at = producer.last_packet_at = self.harness.clock()
        return producer


@pytest.fixture
def api(harness: EngineHarness) -> Api:
    return Api(harness)


def test_a_closed_transport_is_reported_once_and_is_then_unknown(api: Api) -> None:
    # (TransportConnected needs a real DTLS handshake, which this harness skips: the room
    # and WHEP tests with real aiortc peers depend on it.)
    transport_id, _ = api.client("whip")
    api.media.close_transport(transport_id, "client ended the session (DELETE)")
    assert api.events == [
        TransportClosed(transport_id, "client ended the session (DELETE)", by_client=False)
    ]
    api.media.close_transport(transport_id, "again")  # closing twice: nothing more
    assert len(api.events) == 1
    with pytest.raises(UnknownMediaId, match=transport_id):
        api.media.add_producer(
            transport_id, kind="video", mid="0", codec=VP8, ext_ids={}, ssrc=1, rtx_ssrc=None
        )


def test_commands_by_id_forward_the_payload_untouched_and_end_with_a_bye(api: Api) -> None:
    publisher_id, publisher = api.client("whip")
    subscriber_id, subscriber = api.client("whep")
    track = api.media.add_producer(
        publisher_id, kind="video", mid="0", codec=VP8, ext_ids={}, ssrc=VIDEO_SSRC, rtx_ssrc=None
    )
    api.producer(track)
    assert track.id == f"{publisher_id}:0"
    subscription = api.media.add_subscription(
        subscriber_id,
        track.id,
        payload_type=VP8.payload_type,
        rtx_payload_type=None,
        ext_map={},
        paused=True,
    )
    # Everything crossing the boundary is plain data a worker process could send.
    for value in (track, subscription):
        copied = pickle.loads(pickle.dumps(value))
        assert dataclasses.asdict(copied) == dataclasses.asdict(value)

    sent = vp8_packet(0, 0, keyframe=True)
    publisher.send_rtp(sent)
    assert subscriber.receive().rtp == []  # paused until the subscriber's answer
    api.media.set_paused(subscription.id, False)
    api.media.request_keyframe(track.id)
    sent = vp8_packet(1, 3000, keyframe=True)
    publisher.send_rtp(sent)
    received = subscriber.receive().rtp
    assert [payload_of(p) for p in received] == [payload_of(sent)]
    assert received[0][8:12] == subscription.ssrc.to_bytes(4, "big")

    api.media.end_subscription(subscription.id, bye=True)
    byes = [p for p in subscriber.receive().rtcp if isinstance(p, Bye)]
    assert [tuple(b.ssrcs) for b in byes] == [(subscription.ssrc,)]
    publisher.send_rtp(vp8_packet(2, 6000))
    assert subscriber.receive().rtp == []
    with pytest.raises(UnknownMediaId):
        api.media.set_paused(subscription.id, True)
    api.media.end_subscription(subscription.id, bye=True)  # already ended: a no-op


def _loud(seq: int, level: int) -> bytes:
    """An Opus packet whose RFC 6464 element says `level` (-dBov; 0 is loudest)."""
    element = bytes([(LEVEL_ID << 4) | 0, 0x80 | level])
    return opus_packet(seq, 960 * seq, extensions=element)


def test_the_media_plane_announces_each_groups_dominant_speaker(api: Api) -> None:
    alice_id, alice = api.client("rtc-pub")
    bob_id, bob = api.client("rtc-pub")
    tracks = []
    for transport_id, owner in ((alice_id, "alice"), (bob_id, "bob")):
        info = api.media.add_producer(
            transport_id,
            kind="audio",
            mid="0",
            codec=OPUS,
            ext_ids={LEVEL: LEVEL_ID},
            ssrc=AUDIO_SSRC,
            rtx_ssrc=None,
            group="room-1",
            owner=owner,
        )
        tracks.append(api.producer(info))
    seq = 0
    for _ in range(int(3 / SPEAKER_INTERVAL)):
        for _ in range(15):
            alice.send_rtp(_loud(seq, 20))  # speaking
            bob.send_rtp(_loud(seq, 110))  # near silence
            seq += 1
        api.harness.advance(SPEAKER_INTERVAL)
    speakers = [e for e in api.events if isinstance(e, ActiveSpeakers)]
    assert speakers == [ActiveSpeakers("room-1", ("alice",))]

    # Alice falls silent, Bob speaks up: Bob takes over (after the detector's hysteresis).
    for _ in range(int(3 / SPEAKER_INTERVAL)):
        for _ in range(15):
            alice.send_rtp(_loud(seq, 115))
            bob.send_rtp(_loud(seq, 15))
            seq += 1
        api.harness.advance(SPEAKER_INTERVAL)
    speakers = [e for e in api.events if isinstance(e, ActiveSpeakers)]
    assert speakers[-1] == ActiveSpeakers("room-1", ("bob",))


def test_a_plaintext_track_in_a_required_room_is_a_policy_violation_event() -> None:
    harness = EngineHarness(e2ee_grace_period=5.0)
    api = Api(harness)
    publisher_id, publisher = api.client("whip")
    plain = api.media.add_producer(
        publisher_id,
        kind="video",
        mid="0",
        codec=VP8,
        ext_ids={},
        ssrc=VIDEO_SSRC,
        rtx_ssrc=None,
        e2ee_required=True,
    )
    api.producer(plain)
    for seq in range(40):
        payload = vp8_payload(seq, keyframe=seq % 10 == 0)
        descriptor, frame = payload[:1], payload[1:]
        publisher.send_rtp(rtp_packet(seq, 3000 * seq, VIDEO_SSRC, descriptor + frame))
    harness.advance(6.0)
    violations = [e for e in api.events if isinstance(e, PolicyViolation)]
    assert [v.producer_id for v in violations] == [plain.id]
    assert "without an SFrame envelope" in violations[0].reason


def test_ids_chosen_by_the_control_plane_are_used_and_clashes_refused(api: Api) -> None:
    """A media worker's commands carry the ids the control plane chose (so they need no
    reply): the transport id, its ICE credentials and a subscription's SSRCs."""
    local = ("wkufrag1", "p" * 24)
    info = api.media.create_transport(
        "whep", "cliufrag", "c" * 24, [], transport_id="w0.abc", local=local
    )
    assert (info.id, info.ice_ufrag, info.ice_pwd) == ("w0.abc", *local)
    with pytest.raises(ValueError, match="already in use"):
        api.media.create_transport("whep", None, None, [], transport_id="w0.abc")
    with pytest.raises(ValueError, match="already in use"):
        api.media.create_transport("whep", None, None, [], local=local)
    publisher_id, _ = api.client("whip")
    track = api.media.add_producer(
        publisher_id, kind="video", mid="0", codec=VP8, ext_ids={}, ssrc=VIDEO_SSRC, rtx_ssrc=None
    )
    subscription = api.media.add_subscription(
        info.id,
        track.id,
        payload_type=VP8.payload_type,
        rtx_payload_type=VP8.rtx_payload_type,
        ext_map={},
        ssrcs=(1111, 2222),
    )
    assert (subscription.ssrc, subscription.rtx_ssrc) == (1111, 2222)
    with pytest.raises(ValueError, match="taken"):
        api.media.add_subscription(
            info.id,
            track.id,
            payload_type=96,
            rtx_payload_type=None,
            ext_map={},
            ssrcs=(2222, None),
        )
