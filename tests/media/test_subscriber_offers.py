"""The SFU-offered subscriber connection: retiring and recycling m-sections, answered by a
real aiortc peer (its SDP engine is the one under test on the other side)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

import tests.media.harness  # noqa: F401  (aiortc peers gather 127.0.0.1 only)
from sfu.control.sdp import LocalTransport, parse_sdp
from sfu.control.subscriber import SubscriberOffers
from sfu.media.api import ProducerInfo, SubscriptionInfo
from sfu.media.bwe import START_BPS
from sfu.media.downtrack import DownTrack
from sfu.media.local import LocalMedia
from sfu.media.producer import TrackCodec
from sfu.media.rtcp import Bye
from tests.engine.harness import EngineHarness

VP8 = TrackCodec("VP8", 90000, payload_type=96, rtx_payload_type=97)
OPUS = TrackCodec("opus", 48000, payload_type=111, channels=2, fmtp="minptime=10;useinbandfec=1")
LOCAL = LocalTransport(
    "ufrag1234", "p" * 24, "sha-256 " + ":".join(["AB"] * 32), [("127.0.0.1", 9)]
)


class Offers:
    """A SubscriberOffers on a real engine, through the media API: one connected subscriber
    transport, and a publisher transport per name."""

    def __init__(self) -> None:
        self.harness = EngineHarness()
        self.media = LocalMedia(self.harness.engine)
        self.subscriber = self.harness.client("rtc-sub")
        self.offers = SubscriberOffers(
            LOCAL, self.media, self.subscriber.transport.id, recycle=True
        )
        self.next_ssrc = 1000

    def publish(self, name: str, kind: str) -> ProducerInfo:
        codec = VP8 if kind == "video" else OPUS
        self.next_ssrc += 1
        publisher = self.harness.client("whip")
        return self.media.add_producer(
            publisher.transport.id,
            kind=kind,
            mid="0",
            codec=codec,
            ext_ids={},
            ssrc=self.next_ssrc,
            rtx_ssrc=None,
            group="room",
            owner=name,
        )

    def subscribe(self, producer: ProducerInfo) -> SubscriptionInfo:
        subscription = self.media.add_subscription(
            self.subscriber.transport.id,
            producer.id,
            payload_type=producer.codec.payload_type,
            rtx_payload_type=producer.codec.rtx_payload_type,
            ext_map=self.offers.ext_map_for(producer),
            paused=True,
        )
        self.offers.add(producer, producer.id.split(":")[0], subscription)
        return subscription

    def copy(self, subscription: SubscriptionInfo) -> DownTrack:
        """The engine's down-track behind a subscription."""
        return self.harness.engine.transports[subscription.transport_id].downtracks_by_ssrc[
            subscription.ssrc
        ]


@pytest.fixture
async def client() -> AsyncIterator[RTCPeerConnection]:
    pc = RTCPeerConnection()
    try:
        yield pc
    finally:
        await pc.close()


async def answer(offers: SubscriberOffers, pc: RTCPeerConnection, offer: str) -> None:
    """The real peer answers `offer` (already taken from `offers`), as the client would."""
    await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    offers.apply_answer(pc.localDescription.sdp.replace("a=setup:passive", "a=setup:active"))


async def exchange(offers: SubscriberOffers, pc: RTCPeerConnection) -> str:
    """One offer/answer round with the real peer; returns the offer the SFU sent."""
    offer = offers.next_offer()
    assert offer is not None
    await answer(offers, pc, offer)
    return offer


def sections(offer: str) -> list[tuple[str | None, int, str]]:
    return [(m.mid, m.port, m.direction) for m in parse_sdp(offer).media]


def bundle(offer: str) -> list[str]:
    for name, value in parse_sdp(offer).attributes:
        if name == "group" and value.startswith("BUNDLE"):
            return value.split()[1:]
    return []


async def test_a_retired_section_stays_in_the_bundle_and_is_never_port_zero(
    client: RTCPeerConnection,
) -> None:
    s = Offers()
    bob_video, bob_audio = s.publish("bob", "video"), s.publish("bob", "audio")
    carol_video = s.publish("carol", "video")
    for producer in (bob_video, bob_audio, carol_video):
        s.subscribe(producer)
    first = await exchange(s.offers, client)
    assert sections(first) == [("0", 9, "sendonly"), ("1", 9, "sendonly"), ("2", 9, "sendonly")]

    # Bob (the first track this subscriber received: the BUNDLE tag) leaves.
    s.offers.end(bob_video.id)
    s.offers.end(bob_audio.id)
    second = await exchange(s.offers, client)
    assert sections(second) == [("0", 9, "inactive"), ("1", 9, "inactive"), ("2", 9, "sendonly")]
    assert bundle(second) == ["0", "1", "2"]
    assert [m.direction for m in parse_sdp(client.localDescription.sdp).media] == [
        "inactive",
        "inactive",
        "recvonly",
    ]
    # Each ended copy said BYE for its SSRC(s) before it went quiet.
    byes = [p for p in s.subscriber.receive().rtcp if isinstance(p, Bye)]
    assert len(byes) == 2


async def test_answered_retired_sections_are_recycled_by_kind(client: RTCPeerConnection) -> None:
    s = Offers()
    bob_video, bob_audio = s.publish("bob", "video"), s.publish("bob", "audio")
    s.subscribe(bob_video)
    s.subscribe(bob_audio)
    await exchange(s.offers, client)
    s.offers.end(bob_video.id)
    s.offers.end(bob_audio.id)
    await exchange(s.offers, client)

    # Bob rejoins with new tracks (new producers): the two retired sections carry them.
    again_video, again_audio = s.publish("bob2", "video"), s.publish("bob2", "audio")
    s.subscribe(again_audio)
    new_video = s.subscribe(again_video)
    third = await exchange(s.offers, client)
    assert sections(third) == [("0", 9, "sendonly"), ("1", 9, "sendonly")]
    media = parse_sdp(third).media
    assert media[0].kind == "video"
    assert f"a=ssrc:{new_video.ssrc} " in third
    assert f" {again_video.id}\r\n" in third
    assert f" {bob_video.id}\r\n" not in third
    assert not s.copy(new_video).paused  # the answer arrived: the recycled copy may send

    # Many leave/rejoin rounds: the section count never grows.
    for round_ in range(5):
        s.offers.end(again_video.id)
        s.offers.end(again_audio.id)
        await exchange(s.offers, client)
        again_video = s.publish(f"r{round_}", "video")
        again_audio = s.publish(f"r{round_}", "audio")
        s.subscribe(again_video)
        s.subscribe(again_audio)
        offer = await exchange(s.offers, client)
        assert len(parse_sdp(offer).media) == 2


async def test_a_section_retired_but_not_yet_answered_is_not_reused(
    client: RTCPeerConnection,
) -> None:
    s = Offers()
    bob = s.publish("bob", "video")
    s.subscribe(bob)
    await exchange(s.offers, client)
    s.offers.end(bob.id)
    retire = s.offers.next_offer()  # outstanding: the client has not seen the retirement
    assert retire is not None
    carol = s.publish("carol", "video")
    carol_copy = s.subscribe(carol)
    assert [t.mid for t in s.offers.sections] == ["0", "1"]
    await answer(s.offers, client, retire)
    assert s.copy(carol_copy).paused  # not in the answered offer: waits for the next one
    offer = await exchange(s.offers, client)
    assert sections(offer) == [("0", 9, "inactive"), ("1", 9, "sendonly")]
    assert not s.copy(carol_copy).paused


async def test_a_track_added_while_an_offer_is_outstanding_waits_for_the_next_answer(
    client: RTCPeerConnection,
) -> None:
    s = Offers()
    bob = s.publish("bob", "video")
    s.subscribe(bob)
    await exchange(s.offers, client)
    s.offers.end(bob.id)
    await exchange(s.offers, client)  # section 0 is free now
    carol = s.publish("carol", "video")
    s.subscribe(carol)
    pending = s.offers.next_offer()
    assert pending is not None
    dave = s.publish("dave", "video")
    dave_copy = s.subscribe(dave)  # no free section: appended, not part of `pending`
    await answer(s.offers, client, pending)
    assert s.copy(dave_copy).paused
    offer = await exchange(s.offers, client)
    assert sections(offer) == [("0", 9, "sendonly"), ("1", 9, "sendonly")]
    assert not s.copy(dave_copy).paused


# -- transport-cc toward room subscribers ----------------------------------------------------

TCC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
MID = "urn:ietf:params:rtp-hdrext:sdes:mid"


def browser_answer(offer: str, keep_transport_cc: bool = True) -> str:
    """What a browser answers to the SFU's offer: every section received, extensions and
    feedback kept (or transport-cc left out, as aiortc does)."""
    lines = []
    for line in offer.split("\r\n"):
        if not keep_transport_cc and ("transport-cc" in line or TCC in line):
            continue
        lines.append(
            line.replace("a=sendonly", "a=recvonly").replace("a=setup:actpass", "a=setup:active")
        )
    return "\r\n".join(lines)


@pytest.mark.parametrize("keep", [True, False])
def test_transport_cc_is_offered_once_per_transport_and_enabled_by_the_answer(keep: bool) -> None:
    h = EngineHarness()
    pub = h.client("whip")
    # Chrome's ids: transport-cc 3, MID 4. A second publisher (Firefox-like) uses 3 for the
    # audio level: that track goes without its audio level rather than clash.
    media = LocalMedia(h.engine)
    video = media.add_producer(
        pub.transport.id,
        kind="video",
        mid="0",
        codec=VP8,
        ext_ids={TCC: 3, MID: 4},
        ssrc=0x333,
        rtx_ssrc=None,
    )
    other = h.client("whip")
    audio = media.add_producer(
        other.transport.id,
        kind="audio",
        mid="0",
        codec=OPUS,
        ssrc=0x444,
        rtx_ssrc=None,
        ext_ids={LEVEL: 3, MID: 1},
    )
    sub = h.client("whep", connect=False)
    offers = SubscriberOffers(LOCAL, media, sub.transport.id)
    copies = []
    for producer, stream in ((video, "alice"), (audio, "bob")):
        subscription = media.add_subscription(
            sub.transport.id,
            producer.id,
            payload_type=producer.codec.payload_type,
            rtx_payload_type=None,
            ext_map=offers.ext_map_for(producer),
            paused=True,
        )
        offers.add(producer, stream, subscription)
        copies.append(sub.transport.downtracks_by_ssrc[subscription.ssrc])
    video_down, audio_down = copies
    offer = offers.next_offer()
    assert offer is not None
    assert offers.transport_cc == 3  # the first publisher's own id
    parsed = parse_sdp(offer)
    for m in parsed.media:
        assert m.extmaps().get(TCC) == 3
        assert "transport-cc" in m.codecs()[0].rtcp_fb
    assert LEVEL not in parsed.media[1].extmaps()
    assert audio_down.copy.ext_map[3] == 0  # its audio level is not sent under the same id
    assert video_down.copy.ext_map[3] == 3  # the slot the SFU's numbers go into
    assert sub.transport.bwe is None  # nothing until the client answers
    offers.apply_answer(browser_answer(offer, keep))
    if keep:
        assert sub.transport.bwe is not None
        assert sub.transport.bwe.estimate_bps == START_BPS
        assert sub.transport.send_log is not None
        assert sub.transport.send_log.twcc_ext_id == 3
        assert video_down.copy.ext_map[3] == 3
    else:
        # Without transport-cc the publisher's numbers must not reach the subscriber either.
        assert sub.transport.bwe is None
        assert video_down.copy.ext_map[3] == 0
