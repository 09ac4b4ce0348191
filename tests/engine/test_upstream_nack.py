"""Loss on the publisher's hop: the SFU NACKs the publisher itself, for video and for audio,
and a subscriber's NACK for the same packet does not make the publisher resend it twice.

The generator's rules are unit-tested in tests/media/test_nackgen.py; these check the wire.
"""

from __future__ import annotations

from sfu.media.nackgen import INITIAL_RTT
from sfu.media.rtcp import Nack, build_nack
from sfu.media.rtp import build_rtx
from tests.engine.harness import (
    AUDIO_SSRC,
    OPUS,
    VIDEO_RTX_SSRC,
    VIDEO_SSRC,
    EngineHarness,
    header_of,
    opus_packet,
    payload_of,
    vp8_packet,
)


def test_a_video_gap_is_asked_of_the_publisher_before_any_subscriber_asks(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher(rtx_ssrc=VIDEO_RTX_SSRC)
    subscriber, downtrack = harness.subscriber(producer, rtx_payload_type=101)
    for seq in (0, 1, 2, 5, 6):
        publisher.send_rtp(vp8_packet(seq, 3000 * seq, keyframe=seq == 0))
    rtcp_ssrc = publisher.transport.rtcp_ssrc
    assert publisher.receive().rtcp_of(Nack) == [Nack(rtcp_ssrc, VIDEO_SSRC, (3, 4))]
    out = [header_of(p).seq for p in subscriber.receive().rtp]

    # The subscriber noticed the same gap; the SFU is already asking, so nothing more goes up.
    gap = [(out[2] + 1) & 0xFFFF, (out[2] + 2) & 0xFFFF]
    subscriber.send_rtcp(build_nack(subscriber.rtcp_ssrc, downtrack.ssrc, gap))
    assert publisher.receive().rtcp_of(Nack) == []
    assert harness.engine.stats.nacks_missed == 2

    # The repair comes on the RTX stream and reaches the subscriber as the original.
    lost = vp8_packet(3, 9000)
    publisher.send_rtp(build_rtx(lost, header_of(lost), VIDEO_RTX_SSRC, 7, 97))
    assert [payload_of(p) for p in subscriber.receive().rtp] == [payload_of(lost)]
    # Only 4 is still missing, and asked for again only a round trip after the first time.
    publisher.send_rtp(vp8_packet(7, 21000))
    assert publisher.receive().rtcp_of(Nack) == []
    harness.clock.now += 2 * INITIAL_RTT
    publisher.send_rtp(vp8_packet(8, 24000))
    assert publisher.receive().rtcp_of(Nack) == [Nack(rtcp_ssrc, VIDEO_SSRC, (4,))]


def test_lost_audio_is_asked_for_although_no_subscriber_nacks_audio(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher(codec=OPUS, kind="audio", ssrc=AUDIO_SSRC)
    subscriber, _ = harness.subscriber(producer, payload_type=109)
    for seq in (100, 101, 103, 104):
        publisher.send_rtp(opus_packet(seq, 960 * seq))
    nacks = publisher.receive().rtcp_of(Nack)
    assert nacks == [Nack(publisher.transport.rtcp_ssrc, AUDIO_SSRC, (102,))]
    # Opus has no RTX here: the publisher resends the packet itself, late, and it is forwarded.
    publisher.send_rtp(opus_packet(102, 960 * 102))
    received = subscriber.receive().rtp
    assert payload_of(received[-1]) == payload_of(opus_packet(102, 960 * 102))
    harness.clock.now += 1.0
    publisher.send_rtp(opus_packet(105, 960 * 105))
    assert publisher.receive().rtcp_of(Nack) == []
