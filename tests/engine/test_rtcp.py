"""RTCP the engine sends and consumes on its own: BYE when streams end, sender reports, and
what it does with clients' reports and compound feedback."""

from __future__ import annotations

from sfu.media.rtcp import (
    Bye,
    Pli,
    ReportBlock,
    SenderReport,
    build_bye,
    build_nack,
    build_pli,
    build_rr,
    build_sr,
)
from sfu.media.transport import TransportState
from tests.engine.harness import (
    AUDIO_SSRC,
    OPUS,
    VIDEO_SSRC,
    EngineHarness,
    opus_packet,
    payload_of,
    vp8_packet,
)


def test_closing_a_subscriber_says_bye_for_each_of_its_streams_once(
    harness: EngineHarness,
) -> None:
    publisher, video = harness.publisher()
    audio = harness.add_producer(publisher, codec=OPUS, kind="audio", mid="1", ssrc=AUDIO_SSRC)
    subscriber, video_track = harness.subscriber(video, rtx_payload_type=101)
    audio_track = harness.add_downtrack(subscriber, audio)
    unkeyed, _ = harness.subscriber(video, connect=False)

    harness.engine.close_transport(subscriber.transport, "DELETE")
    harness.engine.close_transport(subscriber.transport, "DELETE again")
    harness.engine.close_transport(unkeyed.transport, "DELETE")

    inbox = subscriber.receive()
    assert video_track.rtx_ssrc is not None
    assert sorted(inbox.rtcp) == sorted(
        [Bye((video_track.ssrc, video_track.rtx_ssrc), b""), Bye((audio_track.ssrc,), b"")]
    )
    assert inbox.rtp == []
    assert unkeyed.datagrams() == []  # nothing can be sent without keys
    assert video.downtracks == []
    assert audio.downtracks == []
    assert publisher.transport.state is TransportState.CONNECTED


def test_a_publisher_leaving_ends_its_subscribers_streams_but_not_their_sessions(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscribers = [harness.subscriber(producer) for _ in range(2)]
    publisher.send_rtp(vp8_packet(0, 0, keyframe=True))

    harness.engine.close_transport(publisher.transport, "publisher left")

    assert publisher.receive().rtcp == [Bye((publisher.transport.rtcp_ssrc,), b"")]
    for client, downtrack in subscribers:
        inbox = client.receive()
        assert len(inbox.rtp) == 1
        assert inbox.rtcp == [Bye((downtrack.ssrc,), b"")]
        assert downtrack.closed
        assert client.transport.state is TransportState.CONNECTED
    harness.tick()
    assert publisher.transport.id not in harness.engine.transports
    assert {c.transport.id for c, _ in subscribers} <= harness.engine.transports.keys()


def test_an_ended_subscription_says_bye_once(harness: EngineHarness) -> None:
    _, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer)
    downtrack.stop()
    downtrack.stop()
    harness.engine.close_transport(subscriber.transport, "left")
    assert subscriber.receive().rtcp == [Bye((downtrack.ssrc,), b"")]


def test_sender_reports_describe_each_copy_and_its_report_gives_the_round_trip(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer, rtx_payload_type=101)
    sent = [vp8_packet(seq, 3000 * seq, keyframe=seq == 0) for seq in range(10)]
    for packet in sent:
        publisher.send_rtp(packet)
    subscriber.receive()

    harness.advance(1.0)  # the engine's once-a-second reports
    reports = [p for p in subscriber.receive().rtcp if isinstance(p, SenderReport)]
    assert len(reports) == 1  # none for the RTX stream, which has sent nothing
    report = reports[0]
    assert report.ssrc == downtrack.ssrc
    assert report.packet_count == 10
    assert report.octet_count == sum(len(payload_of(p)) for p in sent)
    assert publisher.receive().rtcp == []  # it receives no copies, so no reports

    # The subscriber answers 0.25 s after the report, having held it for 0.05 s.
    harness.wallclock.now += 0.25
    lsr = (report.ntp_timestamp >> 16) & 0xFFFFFFFF
    block = ReportBlock(downtrack.ssrc, 0, 0, 0, 0, lsr, int(0.05 * 65536))
    subscriber.send_rtcp(build_rr(subscriber.rtcp_ssrc, [block]))
    assert abs(downtrack.rtt - 0.2) < 0.001


def test_a_publishers_reports_are_consumed_not_relayed(harness: EngineHarness) -> None:
    publisher, producer = harness.publisher(codec=OPUS, kind="audio", ssrc=AUDIO_SSRC)
    subscriber, _ = harness.subscriber(producer)
    publisher.send_rtp(opus_packet(0, 0))
    subscriber.receive()

    publisher.send_rtcp(
        build_sr(AUDIO_SSRC, 1 << 32, 0, 1, 61), build_rr(AUDIO_SSRC), build_bye([AUDIO_SSRC])
    )
    assert subscriber.receive().datagrams == []
    assert harness.engine.stats.rtcp_in == 1
    assert harness.engine.stats.rtcp_malformed == 0


def test_each_part_of_a_compound_feedback_packet_is_acted_on(harness: EngineHarness) -> None:
    publisher, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer, rtx_payload_type=101)
    for seq in range(5):
        publisher.send_rtp(vp8_packet(seq, 3000 * seq, keyframe=seq == 0))
    last = downtrack.last_out_seq
    subscriber.receive()
    publisher.receive()

    ssrc = subscriber.rtcp_ssrc
    subscriber.send_rtcp(
        build_rr(ssrc, [ReportBlock(downtrack.ssrc, 26, 1, last, 0, 0, 0)]),
        build_nack(ssrc, downtrack.ssrc, [last]),
        build_pli(ssrc, downtrack.ssrc),
        # A stream of the subscriber's own ending (a stopped transceiver) is no reason to
        # end the session: that is left to DTLS close_notify, signalling and consent.
        build_bye([ssrc]),
    )
    assert downtrack.loss == 26 / 256
    assert len(subscriber.receive().rtp) == 1
    assert publisher.receive().rtcp_of(Pli) == [Pli(publisher.transport.rtcp_ssrc, VIDEO_SSRC)]
    assert subscriber.transport.state is TransportState.CONNECTED
