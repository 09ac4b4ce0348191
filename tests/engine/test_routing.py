"""Fan-out through the real engine: what reaches which subscriber, and in what form."""

from __future__ import annotations

from sfu.media.rtcp import Pli
from tests.engine.harness import (
    OPUS,
    VIDEO_SSRC,
    EngineHarness,
    header_of,
    opus_packet,
    payload_of,
    vp8_packet,
)


def test_every_ready_subscriber_gets_each_packet_rewritten_with_the_payload_untouched(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscribers = [harness.subscriber(producer, payload_type=pt) for pt in (96, 100, 120)]
    # Publisher numbering that wraps, to see the subscribers' numbering wrap with it.
    sent = [
        vp8_packet((65530 + i) & 0xFFFF, 4_294_960_000 + 3000 * i, keyframe=i == 0)
        for i in range(12)
    ]
    for packet in sent:
        publisher.send_rtp(packet)

    for client, downtrack in subscribers:
        received = client.receive().rtp
        assert len(received) == len(sent)
        first = header_of(received[0])
        for original, out in zip(sent, received, strict=True):
            hdr, src = header_of(out), header_of(original)
            assert (hdr.ssrc, hdr.payload_type) == (downtrack.ssrc, downtrack.payload_type)
            assert hdr.seq == (first.seq + src.seq - 65530) & 0xFFFF
            assert hdr.timestamp == (first.timestamp + src.timestamp - 4_294_960_000) & 0xFFFFFFFF
            assert hdr.marker == src.marker
            assert payload_of(out) == payload_of(original)
    # Each copy went to its own subscriber, and the publisher got none of them back.
    assert publisher.receive().rtp == []
    assert harness.engine.stats.rtp_out == 3 * len(sent)
    assert harness.engine.demux.errors == 0


def test_nothing_reaches_subscribers_that_are_not_ready_paused_or_closed() -> None:
    harness = EngineHarness(keyframe_cache=False)  # resumed copies wait for a keyframe
    publisher, producer = harness.publisher()
    ready, _ = harness.subscriber(producer)
    unchecked, _ = harness.subscriber(producer, connect=False)  # no ICE, no keys
    checked, _ = harness.subscriber(producer, connect=False)
    assert checked.check()  # ICE done, DTLS not: an address but no keys
    paused, paused_track = harness.subscriber(producer)
    paused_track.paused = True
    closed, _ = harness.subscriber(producer)
    harness.engine.close_transport(closed.transport, "left")
    closed_before = len(closed.datagrams())

    for seq in range(5):
        publisher.send_rtp(vp8_packet(seq, 3000 * seq, keyframe=seq == 0))

    assert len(ready.receive().rtp) == 5
    assert unchecked.datagrams() == []
    assert [d[0] < 4 for d in checked.datagrams()] == [True]  # the check's response only
    assert paused.receive().rtp == []
    assert len(closed.datagrams()) == closed_before
    assert len(producer.downtracks) == 4  # the closed one is gone from the fan-out

    # Unpaused, it starts at the next keyframe like a new subscriber.
    paused_track.paused = False
    publisher.send_rtp(vp8_packet(5, 15000))
    keyframe = vp8_packet(6, 18000, keyframe=True)
    publisher.send_rtp(keyframe)
    assert [payload_of(p) for p in paused.receive().rtp] == [payload_of(keyframe)]


def test_srtp_counts_only_from_an_address_that_passed_a_check_and_with_its_keys(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscriber, _ = harness.subscriber(producer)
    assert publisher.srtp is not None
    datagram = publisher.srtp.protect_rtp(vp8_packet(1, 0, keyframe=True))
    assert datagram is not None

    harness.engine.deliver(datagram, ("203.0.113.9", 5000))
    assert harness.engine.demux.dropped_unknown_address == 1
    # From a known address, the packet is judged with that address's transport's keys.
    harness.engine.deliver(datagram, subscriber.addr)
    assert harness.engine.stats.srtp_failures == 1
    assert subscriber.receive().rtp == []
    assert producer.packets_received == 0

    publisher.send(datagram)
    assert len(subscriber.receive().rtp) == 1
    # The same datagram again is a replay: dropped by SRTP, not forwarded twice.
    publisher.send(datagram)
    assert subscriber.receive().rtp == []
    assert producer.packets_received == 1


def test_video_waits_for_a_keyframe_and_asks_the_publisher_once_per_interval() -> None:
    harness = EngineHarness(keyframe_cache=False)
    publisher, producer = harness.publisher()
    early, early_track = harness.subscriber(producer)
    for seq in range(4):
        publisher.send_rtp(vp8_packet(seq, 3000 * seq))
    assert early.receive().rtp == []
    assert early_track.keyframe_waits == 4
    plis = publisher.receive().rtcp_of(Pli)
    assert plis == [Pli(publisher.transport.rtcp_ssrc, VIDEO_SSRC)]
    assert producer.keyframe_requests_throttled == 3

    publisher.send_rtp(vp8_packet(4, 12000, keyframe=True))
    publisher.send_rtp(vp8_packet(5, 15000))
    assert len(early.receive().rtp) == 2

    # A late joiner waits for the next keyframe; the first subscriber is not held up.
    harness.clock.now += producer.keyframe_interval
    late, late_track = harness.subscriber(producer)
    publisher.send_rtp(vp8_packet(6, 18000))
    assert late.receive().rtp == []
    assert len(early.receive().rtp) == 1
    assert len(publisher.receive().rtcp_of(Pli)) == 1
    publisher.send_rtp(vp8_packet(7, 21000, keyframe=True))
    assert [header_of(p).seq for p in late.receive().rtp] == [late_track.last_out_seq]
    assert len(early.receive().rtp) == 1


def test_a_late_subscriber_starts_at_once_from_the_keyframe_cache(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    early, _ = harness.subscriber(producer)
    gop = [vp8_packet(10 + i, 3000 * i, keyframe=i == 0) for i in range(4)]
    for packet in gop[:3]:
        publisher.send_rtp(packet)
    assert len(early.receive().rtp) == 3
    late, late_track = harness.subscriber(producer)
    publisher.send_rtp(gop[3])
    # The late one gets the whole GOP so far, in order and numbered on from its start, and
    # nobody asked the publisher for a keyframe.
    received = late.receive().rtp
    assert [payload_of(p) for p in received] == [payload_of(p) for p in gop]
    seqs = [header_of(p).seq for p in received]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(4)]
    assert late_track.keyframe_waits == 0
    assert publisher.receive().rtcp_of(Pli) == []
    assert harness.engine.stats.keyframe_cache_hits == 1
    # From then on it is an ordinary copy.
    publisher.send_rtp(vp8_packet(14, 12000))
    assert [header_of(p).seq for p in late.receive().rtp] == [(seqs[0] + 4) & 0xFFFF]
    assert len(early.receive().rtp) == 2


def test_audio_is_forwarded_from_its_first_packet(harness: EngineHarness) -> None:
    publisher, producer = harness.publisher(codec=OPUS, kind="audio", ssrc=0x33333333)
    subscriber, downtrack = harness.subscriber(producer, payload_type=109)
    sent = [opus_packet(seq, 960 * seq) for seq in range(100, 105)]
    for packet in sent:
        publisher.send_rtp(packet)
    received = subscriber.receive().rtp
    assert [payload_of(p) for p in received] == [payload_of(p) for p in sent]
    assert {header_of(p).payload_type for p in received} == {109}
    assert downtrack.keyframe_waits == 0
    assert publisher.receive().rtcp == []  # nobody asks an audio sender for keyframes
    assert harness.engine.stats.by_kind["audio"] == [5, sum(map(len, sent)), 5, 5 * len(sent[0])]
