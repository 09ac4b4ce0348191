"""What a publisher's transport does with the SSRCs it sees: streams bound by MID, a sender
that restarts with a new SSRC, and RTX repairs."""

from __future__ import annotations

from sfu.media.rtcp import Pli
from sfu.media.rtp import build_rtx
from tests.engine.harness import (
    OPUS,
    VIDEO_RTX_SSRC,
    VIDEO_SSRC,
    EngineHarness,
    header_of,
    mid_extension,
    opus_packet,
    payload_of,
    vp8_packet,
)

MID_EXT = 4
NEW_SSRC = 0x44444444


def test_a_restarted_sender_continues_the_subscribers_stream_after_its_keyframe(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer)
    for seq in range(3):
        publisher.send_rtp(vp8_packet(500 + seq, 90000 + 3000 * seq, keyframe=seq == 0))
    before = subscriber.receive().rtp
    last = header_of(before[-1])
    publisher.receive()

    # The encoder restarts: new SSRC, unrelated numbering, half a second later.
    harness.clock.now += 0.5
    publisher.send_rtp(vp8_packet(40000, 777777, ssrc=NEW_SSRC))
    assert subscriber.receive().rtp == []  # mid-GOP: held back, and a keyframe asked for
    assert publisher.receive().rtcp_of(Pli) == [Pli(publisher.transport.rtcp_ssrc, NEW_SSRC)]
    keyframe = vp8_packet(40001, 777777, ssrc=NEW_SSRC, keyframe=True)
    publisher.send_rtp(keyframe)
    publisher.send_rtp(vp8_packet(40002, 780777, ssrc=NEW_SSRC))

    after = subscriber.receive().rtp
    assert payload_of(after[0]) == payload_of(keyframe)
    first = header_of(after[0])
    assert first.ssrc == last.ssrc == downtrack.ssrc
    assert first.seq == (last.seq + 1) & 0xFFFF
    # Timestamps move on by the time that passed (0.5 s at 90 kHz), not by the new sender's.
    assert (first.timestamp - last.timestamp) & 0xFFFFFFFF == 45000
    assert (header_of(after[1]).timestamp - first.timestamp) & 0xFFFFFFFF == 3000
    assert producer.ssrc == NEW_SSRC
    assert producer.ssrc_changes == 1


def test_a_late_packet_of_the_old_ssrc_does_not_switch_the_track_back(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscriber, _ = harness.subscriber(producer)
    publisher.send_rtp(vp8_packet(500, 90000, keyframe=True))
    publisher.send_rtp(vp8_packet(40000, 777777, ssrc=NEW_SSRC, keyframe=True))
    subscriber.receive()

    publisher.send_rtp(vp8_packet(501, 93000))  # reordered in the network, or replayed
    publisher.send_rtp(vp8_packet(40001, 780777, ssrc=NEW_SSRC))

    assert (producer.ssrc, producer.ssrc_changes) == (NEW_SSRC, 1)
    received = subscriber.receive().rtp
    assert len(received) == 1
    assert payload_of(received[0]) == payload_of(vp8_packet(40001, 780777, ssrc=NEW_SSRC))
    assert publisher.transport.retired_ssrcs == {VIDEO_SSRC: None}


def test_undeclared_streams_are_bound_to_their_track_by_mid(harness: EngineHarness) -> None:
    publisher = harness.client("whip")
    audio = harness.add_producer(publisher, codec=OPUS, kind="audio", mid="a", ssrc=None)
    video = harness.add_producer(publisher, kind="video", mid="v", ssrc=None)
    publisher.transport.mid_ext_id = MID_EXT
    subscriber, video_track = harness.subscriber(video)
    audio_track = harness.add_downtrack(subscriber, audio)

    # Browsers send the MID on the first packets only; later ones are routed by SSRC.
    publisher.send_rtp(vp8_packet(0, 0, keyframe=True, extensions=mid_extension(MID_EXT, "v")))
    publisher.send_rtp(opus_packet(0, 0, ssrc=0x5555))  # no MID yet: two tracks to choose from
    publisher.send_rtp(opus_packet(1, 960, ssrc=0x5555, extensions=mid_extension(MID_EXT, "a")))
    publisher.send_rtp(vp8_packet(1, 3000))
    publisher.send_rtp(opus_packet(2, 1920, ssrc=0x5555))

    assert (video.ssrc, audio.ssrc) == (VIDEO_SSRC, 0x5555)
    received = subscriber.receive().rtp
    assert len(received) == 4
    assert [header_of(p).ssrc for p in received] == [
        video_track.ssrc,
        audio_track.ssrc,
        video_track.ssrc,
        audio_track.ssrc,
    ]
    # The audio packet without a MID before its binding was not routable.
    assert harness.engine.stats.rtp_unroutable == 1


def test_a_publishers_rtx_repairs_the_gap_in_every_subscribers_stream(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher(rtx_ssrc=VIDEO_RTX_SSRC)
    subscriber, _ = harness.subscriber(producer)
    packets = [vp8_packet(seq, 3000 * seq, keyframe=seq == 0) for seq in range(4)]
    for seq in (0, 1, 3):  # 2 is lost on the way in
        publisher.send_rtp(packets[seq])
    received = subscriber.receive().rtp
    start = header_of(received[0]).seq
    assert [(header_of(p).seq - start) & 0xFFFF for p in received] == [0, 1, 3]

    lost = header_of(packets[2])
    publisher.send_rtp(build_rtx(packets[2], lost, VIDEO_RTX_SSRC, 7, 97))
    repaired = subscriber.receive().rtp
    assert len(repaired) == 1
    assert header_of(repaired[0]).seq == (start + 2) & 0xFFFF
    assert header_of(repaired[0]).payload_type == 96
    assert payload_of(repaired[0]) == payload_of(packets[2])
    assert producer.rtx_packets_received == 1
