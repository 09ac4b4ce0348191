"""Producer → down-track forwarding, with a recording sink instead of a socket."""

from __future__ import annotations

import struct

from sfu.media.downtrack import DownTrack, ntp_now
from sfu.media.producer import Producer, TrackCodec
from sfu.media.rtcp import Bye, SenderReport, parse_rtcp
from sfu.media.rtp import find_extension, parse_header, unwrap_rtx


class Sink:
    ready = True

    def __init__(self) -> None:
        self.rtp: list[bytes] = []
        self.rtcp: list[bytes] = []
        self.forgotten: list[DownTrack] = []

    def send_rtp(self, packet: bytes | bytearray) -> None:
        self.rtp.append(bytes(packet))

    def send_rtcp(self, packet: bytes) -> None:
        self.rtcp.append(packet)

    def forget_downtrack(self, downtrack: DownTrack) -> None:
        self.forgotten.append(downtrack)


class Upstream:
    def __init__(self) -> None:
        self.keyframe_requests = 0
        self.nacks: list[list[int]] = []

    def send_keyframe_request(self, producer: Producer) -> None:
        self.keyframe_requests += 1

    def send_nack(self, producer: Producer, seqs: list[int]) -> None:
        self.nacks.append(seqs)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


VP8 = TrackCodec("VP8", 90000, payload_type=96, rtx_payload_type=97)


def vp8_packet(seq: int, ts: int, ssrc: int = 0x1111, key: bool = False, ext: bytes = b"") -> bytes:
    """RTP + VP8 descriptor (S=1, PID 0) + first frame byte (P=0 keyframe) + opaque bytes."""
    first = 0x90 if ext else 0x80
    header = struct.pack("!BBHII", first, 96, seq, ts, ssrc)
    if ext:
        header += struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
    frame_start = 0x00 if key else 0x01
    return header + bytes([0x10, frame_start]) + bytes(range(seq % 50, seq % 50 + 60))


def setup(
    ext_map: list[int] | None = None, rtx: bool = True, ext_ids: dict[str, int] | None = None
) -> tuple[Producer, DownTrack, Sink, Upstream, Clock]:
    clock, upstream, sink = Clock(), Upstream(), Sink()
    producer = Producer(
        "p", "video", "1", VP8, ext_ids or {}, upstream, buffer_size=64, clock=clock
    )
    downtrack = DownTrack(
        producer,
        sink,
        ssrc=0xAAAA,
        payload_type=100,
        ext_map=ext_map or [0] * 256,
        rtx_ssrc=0xBBBB if rtx else None,
        rtx_payload_type=101 if rtx else None,
        clock=clock,
        wallclock=lambda: 1_700_000_000.0,
    )
    producer.attach(downtrack)
    return producer, downtrack, sink, upstream, clock


def feed(producer: Producer, packet: bytes) -> None:
    hdr = parse_header(packet)
    assert hdr is not None
    producer.on_rtp(packet, hdr)


def test_waits_for_a_keyframe_then_rewrites_only_the_header() -> None:
    producer, downtrack, sink, upstream, _ = setup()
    feed(producer, vp8_packet(10, 9000))
    assert sink.rtp == []
    assert upstream.keyframe_requests == 1
    original = vp8_packet(11, 9000, key=True)
    feed(producer, original)
    assert len(sink.rtp) == 1
    out = parse_header(sink.rtp[0])
    assert out is not None
    assert (out.ssrc, out.payload_type) == (0xAAAA, 100)
    assert out.seq == downtrack.last_out_seq
    assert out.timestamp == downtrack.last_out_ts
    # Payload bytes are exactly the publisher's.
    assert sink.rtp[0][out.header_len :] == original[12:]


def test_sequence_gaps_are_kept_and_reordering_survives() -> None:
    producer, _, sink, _, _ = setup()
    for seq, key in ((100, True), (101, False), (103, False), (102, False)):
        feed(producer, vp8_packet(seq, 9000, key=key))
    seqs = [parse_header(p).seq for p in sink.rtp]  # type: ignore[union-attr]
    base = seqs[0]
    assert [(s - base) & 0xFFFF for s in seqs] == [0, 1, 3, 2]


def test_numbering_continues_across_a_publisher_restart() -> None:
    producer, _, sink, _, clock = setup()
    feed(producer, vp8_packet(500, 1000, key=True))
    feed(producer, vp8_packet(501, 4000))
    last = parse_header(sink.rtp[-1])
    assert last is not None
    clock.now += 0.5
    # New SSRC, unrelated numbering: delta frames are held back until a keyframe.
    feed(producer, vp8_packet(40000, 777777, ssrc=0x2222))
    assert len(sink.rtp) == 2
    feed(producer, vp8_packet(40001, 777777, ssrc=0x2222, key=True))
    nxt = parse_header(sink.rtp[-1])
    assert nxt is not None
    assert nxt.seq == (last.seq + 1) & 0xFFFF
    advanced = (nxt.timestamp - last.timestamp) & 0xFFFFFFFF
    assert 0.45 * 90000 < advanced < 0.55 * 90000  # timestamps move on by the wall time gap
    assert nxt.ssrc == last.ssrc == 0xAAAA
    assert producer.ssrc_changes == 1


def test_nack_is_served_from_the_ring_as_rtx_and_misses_go_upstream() -> None:
    producer, downtrack, sink, upstream, _ = setup()
    for seq in range(200, 280):
        feed(producer, vp8_packet(seq, 9000, key=seq == 200))
    sent = {parse_header(p).seq: p for p in sink.rtp}  # type: ignore[union-attr]
    wanted = sorted(sent)[-3]
    missing_out = sorted(sent)[0]  # sent, and since pushed out of the 64-packet ring
    sink.rtp.clear()
    misses = downtrack.on_nack((wanted, missing_out))
    assert len(sink.rtp) == 1
    rtx = sink.rtp[0]
    hdr = parse_header(rtx)
    assert hdr is not None
    assert (hdr.ssrc, hdr.payload_type) == (0xBBBB, 101)
    osn, payload_at = unwrap_rtx(rtx, hdr)  # type: ignore[misc]
    assert osn == wanted
    original = parse_header(sent[wanted])
    assert original is not None
    assert rtx[payload_at:] == sent[wanted][original.header_len :]
    assert misses == [(missing_out - downtrack._seq_offset) & 0xFFFF]
    producer.request_retransmission(misses)
    assert upstream.nacks == [misses]
    assert (downtrack.nacks_served, downtrack.nack_misses) == (1, 1)


def test_without_rtx_the_same_packet_is_resent() -> None:
    producer, downtrack, sink, _, _ = setup(rtx=False)
    feed(producer, vp8_packet(1, 0, key=True))
    first = sink.rtp[0]
    downtrack.on_nack((parse_header(first).seq,))  # type: ignore[union-attr]
    assert sink.rtp[1] == first


def test_extension_ids_are_remapped_and_unnegotiated_ones_removed() -> None:
    ext_map = [0] * 256
    ext_map[1] = 5  # audio level-like: publisher id 1 is the subscriber's 5; id 2 is dropped
    negotiated = {"urn:example:one": 1, "urn:example:two": 2}
    producer, _, sink, _, _ = setup(ext_map=ext_map, ext_ids=negotiated)
    # One-byte elements: id 1 (1 byte, 0x7f) and id 2 (2 bytes), padded to 8 bytes.
    ext = bytes([0x10, 0x7F, 0x21, 0xAA, 0xBB, 0, 0, 0])
    original = vp8_packet(7, 0, key=True, ext=ext)
    feed(producer, original)
    out = sink.rtp[0]
    hdr = parse_header(out)
    assert hdr is not None
    assert find_extension(out, hdr, 5) == (hdr.ext_start + 1, 1)
    assert out[hdr.ext_start + 1] == 0x7F
    assert find_extension(out, hdr, 2) is None
    assert out[hdr.header_len :] == original[hdr.header_len :]


def test_sender_report_describes_the_downtrack_timeline() -> None:
    producer, downtrack, sink, _, clock = setup()
    for seq in range(5):
        feed(producer, vp8_packet(seq, 3000 * seq, key=seq == 0))
    clock.now += 1.0
    packets, ok = parse_rtcp(downtrack.sender_report() or b"")
    assert ok
    report = packets[0]
    assert isinstance(report, SenderReport)
    assert report.ssrc == 0xAAAA
    assert report.packet_count == 5
    assert report.octet_count == sum(len(p) - 12 for p in sink.rtp)
    assert (report.rtp_timestamp - downtrack.last_out_ts) & 0xFFFFFFFF == 90000


def test_publisher_leaving_sends_bye_for_both_ssrcs() -> None:
    producer, _, sink, _, _ = setup()
    feed(producer, vp8_packet(1, 0, key=True))
    producer.close()
    packets, ok = parse_rtcp(sink.rtcp[-1])
    assert ok
    assert packets == [Bye((0xAAAA, 0xBBBB), b"")]


def test_keyframe_requests_are_throttled_per_track() -> None:
    producer, _, _, upstream, clock = setup()
    assert producer.request_keyframe()
    assert not producer.request_keyframe()
    clock.now += 0.49
    assert not producer.request_keyframe()
    clock.now += 0.02
    assert producer.request_keyframe()
    assert (upstream.keyframe_requests, producer.keyframe_requests_throttled) == (2, 2)


def test_a_subscriber_that_keeps_asking_for_keyframes_is_budgeted() -> None:
    producer, downtrack, _, upstream, clock = setup()
    feed(producer, vp8_packet(1, 0, key=True))
    upstream.keyframe_requests = 0
    downtrack.on_keyframe_request()  # its first request goes through
    assert upstream.keyframe_requests == 1
    for _ in range(5):  # a receiver without the E2EE key asks ~3 times a second
        clock.now += 0.3
        downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 1
    assert downtrack.keyframe_requests_suppressed == 5
    assert downtrack.stats.keyframe_requests[2] == 5

    # Past the interval, but the keyframe it asked for has not reached it yet: still none.
    clock.now = 102.5
    downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 1
    # The keyframe arrives; the next request after the interval goes through...
    feed(producer, vp8_packet(2, 3000, key=True))
    clock.now = 103.0
    downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 2
    # ...and since it asked again right after a keyframe reached it, the interval doubled.
    feed(producer, vp8_packet(3, 6000, key=True))
    clock.now = 105.5
    downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 2
    clock.now = 107.1
    downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 3
    # The doubling stops at 4x the base interval, and a long quiet spell forgives it.
    feed(producer, vp8_packet(4, 9000, key=True))
    clock.now = 107.1 + 8.1
    downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 4
    assert downtrack._keyframe_interval == 8.0
    clock.now += 40.0
    downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 5
    assert downtrack._keyframe_interval == 2.0


def test_nacks_are_served_once_per_rtt_within_a_budget_and_not_when_stale() -> None:
    producer, downtrack, sink, _, clock = setup()
    for seq in range(300, 340):
        feed(producer, vp8_packet(seq, 9000, key=seq == 300))
    out = [parse_header(p).seq for p in sink.rtp]  # type: ignore[union-attr]
    sink.rtp.clear()
    duplicate, too_old, over_budget = 0, 1, 2

    downtrack.on_nack((out[5],))
    downtrack.on_nack((out[5],))  # the receiver asks again before the resend could arrive
    assert len(sink.rtp) == 1
    assert downtrack.stats.nacks_suppressed[duplicate] == 1
    clock.now += 0.15  # a round trip later it may really be lost again
    downtrack.on_nack((out[5],))
    assert len(sink.rtp) == 2

    # Resends may add at most half the bytes the subscriber was sent: 40 packets earn 20
    # (once the credit every new copy starts with is spent).
    sink.rtp.clear()
    downtrack._rtx_credit = 0.0
    downtrack._rtx_mark = 0
    downtrack.on_nack(tuple(out[6:40]))
    assert 15 <= len(sink.rtp) <= 20
    assert downtrack.stats.nacks_suppressed[over_budget] == 34 - len(sink.rtp)

    # A packet that arrived more than a second ago is past any jitter buffer's use.
    clock.now += 1.1
    feed(producer, vp8_packet(340, 12000))
    feed(producer, vp8_packet(341, 12000))
    sink.rtp.clear()
    downtrack.on_nack((out[39],))
    assert sink.rtp == []
    assert downtrack.stats.nacks_suppressed[too_old] == 1


def test_receiver_reports_give_the_round_trip_time() -> None:
    producer, downtrack, _, _, _ = setup()
    feed(producer, vp8_packet(1, 0, key=True))
    compact = (ntp_now(1_700_000_000.0) >> 16) & 0xFFFFFFFF
    # Our SR left 0.25 s ago (in 1/65536 s) and the receiver held it 0.05 s.
    downtrack.on_report(0, (compact - int(0.25 * 65536)) & 0xFFFFFFFF, int(0.05 * 65536))
    assert abs(downtrack.rtt - 0.2) < 0.001
    # Later samples are smoothed: one short round trip cannot collapse the estimate.
    downtrack.on_report(0, (compact - int(0.01 * 65536)) & 0xFFFFFFFF, 0)
    assert 0.17 < downtrack.rtt < 0.19


def test_a_subscriber_losing_much_gets_no_resends_and_keeps_its_keyframe_interval() -> None:
    producer, downtrack, sink, upstream, clock = setup()
    for seq in range(400, 420):
        feed(producer, vp8_packet(seq, 9000, key=seq == 400))
    out = [parse_header(p).seq for p in sink.rtp]  # type: ignore[union-attr]
    downtrack.on_report(128, 0, 0)  # half its packets lost: congested, not unlucky
    downtrack._rtx_credit = 0.0
    downtrack._rtx_mark = 0
    sink.rtp.clear()
    downtrack.on_nack(tuple(out[1:10]))
    assert sink.rtp == []
    assert downtrack.stats.nacks_suppressed[2] == 9
    # It asks for keyframes after they were sent: it may have lost them, so no back-off.
    upstream.keyframe_requests = 0
    for step in range(4):
        clock.now += 2.1
        feed(producer, vp8_packet(420 + step, 12000 + step, key=True))
        downtrack.on_keyframe_request()
    assert upstream.keyframe_requests == 4
    assert downtrack._keyframe_interval == 2.0
