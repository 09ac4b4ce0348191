"""NACKs from subscribers, end to end through SRTCP: resends, refusals, and what goes upstream.

The budget rules themselves are unit-tested in tests/media/test_downtrack.py; these tests
check that the engine wires them to the wire: which datagrams go out, to whom, and how the
stats count them.
"""

from __future__ import annotations

from sfu.media.downtrack import DEFAULT_RTT, NACK_MAX_AGE, RTX_INITIAL_CREDIT, DownTrack
from sfu.media.rtcp import Nack, ReportBlock, build_nack, build_rr
from sfu.media.rtp import unwrap_rtx
from tests.engine.harness import (
    VIDEO_SSRC,
    Client,
    EngineHarness,
    header_of,
    payload_of,
    vp8_packet,
)

SIZE = 1000  # payload bytes per packet: 1012 with the header


def stream(
    harness: EngineHarness, *, rtx: bool, count: int = 20
) -> tuple[Client, Client, DownTrack, list[int]]:
    """A publisher that sent `count` packets (a keyframe first) to one subscriber; returns
    both clients, the subscriber's down-track and the sequence numbers it received."""
    publisher, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer, rtx_payload_type=101 if rtx else None)
    for seq in range(count):
        publisher.send_rtp(vp8_packet(seq, 3000 * seq, keyframe=seq == 0, size=SIZE))
    received = subscriber.receive().rtp
    assert len(received) == count
    return publisher, subscriber, downtrack, [header_of(p).seq for p in received]


def nack(subscriber: Client, downtrack: DownTrack, *seqs: int) -> None:
    subscriber.send_rtcp(build_nack(subscriber.rtcp_ssrc, downtrack.ssrc, seqs))


def test_a_nack_is_answered_on_the_rtx_stream_with_the_original_payload(
    harness: EngineHarness,
) -> None:
    publisher, subscriber, downtrack, seqs = stream(harness, rtx=True)

    nack(subscriber, downtrack, seqs[3], seqs[7])
    resent = subscriber.receive().rtp
    assert len(resent) == 2
    for packet, wanted in zip(resent, (3, 7), strict=True):
        hdr = header_of(packet)
        assert (hdr.ssrc, hdr.payload_type) == (downtrack.rtx_ssrc, 101)
        unwrapped = unwrap_rtx(packet, hdr)
        assert unwrapped is not None
        osn, payload_at = unwrapped
        assert osn == seqs[wanted]
        assert packet[payload_at:] == payload_of(vp8_packet(wanted, 0, size=SIZE))
    # The RTX stream numbers its own packets consecutively.
    assert (header_of(resent[1]).seq - header_of(resent[0]).seq) & 0xFFFF == 1
    stats = harness.engine.stats
    assert (stats.nacks_received, stats.nacks_served, stats.rtx_sent[0]) == (2, 2, 2)
    assert publisher.receive().rtcp == []  # served from the ring: nothing asked upstream


def test_without_rtx_the_very_same_datagram_is_sent_again(harness: EngineHarness) -> None:
    _, subscriber, downtrack, seqs = stream(harness, rtx=False)
    first = subscriber.datagrams()[-20:][5]

    nack(subscriber, downtrack, seqs[5])
    inbox = subscriber.receive()
    # Byte-identical ciphertext: same packet, same SRTP index, so no keystream is reused
    # for different plaintext. The client's SRTP sees it as a replay of what it has.
    assert inbox.datagrams == [first]
    assert inbox.undecryptable == [first]


def test_a_repeated_nack_waits_a_round_trip_and_a_stale_one_is_refused(
    harness: EngineHarness,
) -> None:
    _, subscriber, downtrack, seqs = stream(harness, rtx=True)
    suppressed = harness.engine.stats.nacks_suppressed

    nack(subscriber, downtrack, seqs[4])
    nack(subscriber, downtrack, seqs[4])  # asked again before the resend could have arrived
    assert len(subscriber.receive().rtp) == 1
    assert suppressed[0] == 1

    harness.clock.now += DEFAULT_RTT
    nack(subscriber, downtrack, seqs[4])  # a round trip later it may really be lost again
    assert len(subscriber.receive().rtp) == 1

    harness.clock.now += NACK_MAX_AGE
    nack(subscriber, downtrack, seqs[5])  # arrived more than NACK_MAX_AGE ago: past any use
    assert subscriber.receive().rtp == []
    assert suppressed[1] == 1
    assert harness.engine.stats.nacks_served == 2


def test_resends_stop_at_the_budget_of_a_subscriber_that_loses_much(
    harness: EngineHarness,
) -> None:
    _, subscriber, downtrack, seqs = stream(harness, rtx=True, count=60)
    # Its receiver report says it lost half of what it was sent: congested, so resends
    # earn no credit and only what every copy starts with can be spent.
    block = ReportBlock(downtrack.ssrc, 128, 30, seqs[-1], 0, 0, 0)
    subscriber.send_rtcp(build_rr(subscriber.rtcp_ssrc, [block]))
    assert downtrack.loss == 0.5

    nack(subscriber, downtrack, *seqs)
    served = len(subscriber.receive().rtp)
    assert served == RTX_INITIAL_CREDIT // (12 + SIZE)
    assert harness.engine.stats.nacks_suppressed[2] == 60 - served


def test_what_the_ring_no_longer_holds_is_asked_of_the_publisher() -> None:
    harness = EngineHarness(video_buffer=16)
    publisher, subscriber, downtrack, seqs = stream(harness, rtx=True, count=40)

    nack(subscriber, downtrack, seqs[0], seqs[1], seqs[39])
    assert len(subscriber.receive().rtp) == 1  # only the recent one is still stored
    upstream = publisher.receive().rtcp_of(Nack)
    assert upstream == [Nack(publisher.transport.rtcp_ssrc, VIDEO_SSRC, (0, 1))]
    assert harness.engine.stats.nacks_missed == 2


def test_nacks_for_streams_the_subscriber_does_not_have_resend_nothing(
    harness: EngineHarness,
) -> None:
    publisher, subscriber, _, seqs = stream(harness, rtx=True)
    subscriber.send_rtcp(build_nack(subscriber.rtcp_ssrc, 0xDEADBEEF, [seqs[3]]))
    # A publisher NACKing media it sends (nonsense) reaches no down-track either.
    publisher.send_rtcp(build_nack(publisher.rtcp_ssrc, VIDEO_SSRC, [3]))
    assert subscriber.receive().rtp == []
    assert publisher.receive().rtp == []
    stats = harness.engine.stats
    assert (stats.nacks_received, stats.nacks_served, stats.nacks_missed) == (2, 0, 0)
