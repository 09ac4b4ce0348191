"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-
extensions-01): chunk encodings against the draft's examples, the recorder (wrap-around,
reordering, duplicates, late packets, loss, gaps), packet round trips, and a real aiortc
publisher that negotiates it and receives it, with a subscriber that gets the SFU's own
numbers and whose feedback moves its estimate."""

from __future__ import annotations

import random
import struct
import time
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCRtpHeaderExtensionParameters, RTCSessionDescription
from aiortc import codecs as aiortc_codecs
from aiortc import rtp as aiortc_rtp
from aiortc.rtcdtlstransport import RTCDtlsTransport

from sfu.app import Server
from sfu.control.sdp import EXT_TRANSPORT_CC, parse_sdp
from sfu.media import rtcp
from sfu.media.rtp import parse_header, read_transport_seq
from sfu.media.twcc import (
    LARGE_DELTA,
    MAX_STATUSES,
    NOT_RECEIVED,
    RECEIVED_NO_DELTA,
    SLOTS,
    SMALL_DELTA,
    TransportFeedback,
    TwccRecorder,
    encode_chunks,
    parse_transport_feedback,
)
from tests.media.harness import SDP, ColourTrack, bearer, post_offer, token, wait_for

# -- the draft's examples -----------------------------------------------------------------


def test_run_length_chunk_examples_of_section_3_1_3() -> None:
    # Example 1: |0|0 0|0 0 0 0 0 1 1 0 1 1 1 0 1| is a run of 221 "packet not received".
    example_1 = 0b0_00_0000011011101
    assert encode_chunks([NOT_RECEIVED] * 221) == struct.pack("!H", example_1)
    # Example 2: |0|1 1|0 0 0 0 0 0 0 0 1 1 0 0 0| is a run of 24 "received, w/o delta".
    example_2 = 0b0_11_0000000011000
    assert encode_chunks([RECEIVED_NO_DELTA] * 24) == struct.pack("!H", example_2)
    packet = _packet_with_chunks([example_2], 24, b"")
    parsed = parse_transport_feedback(packet)
    assert parsed is not None
    assert parsed.symbols == [RECEIVED_NO_DELTA] * 24
    assert parsed.deltas == []


def test_status_vector_examples_of_section_3_1_4() -> None:
    # Example 1: |1|0|0 1 1 1 1 1 0 0 0 1 1 1 0 0|: 1 lost, 5 received, 3 lost, 3 received,
    # 2 lost (one-bit symbols: 1 is "received, small delta", as libwebrtc reads it).
    example_1 = 0b1_0_01111100011100
    symbols_1 = [0] + [1] * 5 + [0] * 3 + [1] * 3 + [0] * 2
    assert encode_chunks(symbols_1) == struct.pack("!H", example_1)
    parsed = parse_transport_feedback(_packet_with_chunks([example_1], 14, bytes(8)))
    assert parsed is not None
    assert parsed.symbols == symbols_1
    assert parsed.deltas == [0] * 8
    # Example 2: |1|1|0 0 1 1 0 1 0 1 0 1 0 0 0 0|: 1 lost, 1 received w/o timestamp,
    # 3 received, 2 lost.
    example_2 = 0b1_1_00110101010000
    symbols_2 = [0, RECEIVED_NO_DELTA, 1, 1, 1, 0, 0]
    assert encode_chunks(symbols_2 + [LARGE_DELTA] * 14)[:2] == struct.pack("!H", example_2)
    parsed = parse_transport_feedback(_packet_with_chunks([example_2], 7, bytes(3)))
    assert parsed is not None
    assert parsed.symbols == symbols_2
    assert len(parsed.deltas) == 3


def _packet_with_chunks(chunks: list[int], count: int, deltas: bytes) -> bytes:
    body = struct.pack("!IIHHI", 1, 2, 7, count, 0)
    body += b"".join(struct.pack("!H", c) for c in chunks) + deltas
    body += bytes(-len(body) % 4)
    return struct.pack("!BBH", 0x8F, 205, (len(body) + 4) // 4 - 1) + body


def test_two_bit_vector_when_a_large_delta_is_among_few_statuses() -> None:
    symbols = [NOT_RECEIVED, LARGE_DELTA, SMALL_DELTA, SMALL_DELTA, SMALL_DELTA, 0, 0, 1]
    chunks = encode_chunks(symbols)
    assert struct.unpack_from("!H", chunks)[0] == 0b1_1_00100101010000
    # The eighth status ends the list: a run of one.
    assert struct.unpack_from("!H", chunks, 2)[0] == (SMALL_DELTA << 13) | 1


# -- recorder and packets -----------------------------------------------------------------

US = 1e-6


def _feedback(recorder: TwccRecorder, now: float = 1e6) -> list[TransportFeedback]:
    packets = recorder.build_feedback(0x1111, 0x2222, now)
    assert packets is not None
    out = []
    for packet in packets:
        _assert_valid_rtcp(packet)
        parsed = parse_transport_feedback(packet)
        assert parsed is not None
        out.append(parsed)
    return out


def _assert_valid_rtcp(packet: bytes) -> None:
    """A compound member: 32-bit aligned, length field right, padding counted, and the SFU's
    own RTCP parser walks it as transport-wide feedback."""
    assert len(packet) % 4 == 0
    assert (struct.unpack_from("!H", packet, 2)[0] + 1) * 4 == len(packet)
    assert packet[0] >> 6 == 2
    assert packet[0] & 0x1F == 15
    assert packet[1] == 205
    if packet[0] & 0x20:
        assert 0 < packet[-1] <= 3
    parsed, ok = rtcp.parse_rtcp(packet)
    assert ok
    assert isinstance(parsed[0], rtcp.TransportCC)


def _reported(feedbacks: list[TransportFeedback]) -> dict[int, int | None]:
    """Arrival (µs) or None by 16-bit sequence number, later packets overriding earlier."""
    out: dict[int, int | None] = {}
    for fb in feedbacks:
        for k, at in enumerate(fb.arrivals_us()):
            out[(fb.base_seq + k) & 0xFFFF] = at
    return out


def test_round_trip_with_random_arrivals_loss_and_wrap_around() -> None:
    rng = random.Random(7)
    recorder = TwccRecorder()
    arrivals: dict[int, int] = {}
    t = 5_000_000_123
    seqs = [(65400 + k) & 0xFFFF for k in range(350)]  # wraps around 65535 -> 0
    for seq in seqs:
        t += rng.choice((0, 1, 250, 999, 5_000, 70_000, 300_000))
        if rng.random() < 0.1 and seq != seqs[0]:
            continue  # lost
        arrivals[seq] = t
        recorder.record(seq, t * US)
    fbs = _feedback(recorder)
    assert len(fbs) == 1
    (fb,) = fbs
    assert fb.base_seq == 65400
    assert fb.fb_count == 0
    assert (fb.sender_ssrc, fb.media_ssrc) == (0x1111, 0x2222)
    assert len(fb.symbols) == 350
    assert fb.reference_time == (arrivals[65400] // 64_000) & 0xFFFFFF
    assert LARGE_DELTA in fb.symbols  # 70 ms and 300 ms steps need the 2-byte form
    reported = _reported(fbs)
    for seq in seqs:
        if seq not in arrivals:
            assert reported[seq] is None
        else:
            at = reported[seq]
            assert at is not None
            # Rounded down to 250 µs and chained from the previous report: never drifts.
            assert 0 <= arrivals[seq] - at < 250
    # Everything was reported: nothing to say until something arrives.
    assert recorder.build_feedback(1, 2, 2e6) is None
    recorder.record(seqs[-1] + 1, (t + 1000) * US)
    (again,) = _feedback(recorder, 3e6)
    assert again.base_seq == seqs[-1] + 1
    assert again.fb_count == 1  # the feedback packet count moves on


def test_reordered_packets_get_negative_deltas_and_keep_their_times() -> None:
    recorder = TwccRecorder()
    # Arrival order 10, 11, 13, 12, 14 (13 and 12 swapped on the way).
    order = [(10, 1_000_000), (11, 1_002_000), (13, 1_003_000), (12, 1_090_000), (14, 1_090_500)]
    for seq, at in order:
        recorder.record(seq, at * US)
    (fb,) = _feedback(recorder)
    assert fb.base_seq == 10
    assert fb.symbols == [SMALL_DELTA, SMALL_DELTA, LARGE_DELTA, LARGE_DELTA, LARGE_DELTA]
    assert _reported([fb]) == dict(order)
    assert fb.deltas[2] == (1_090_000 - 1_002_000) // 250  # 88 ms: over the small range
    assert fb.deltas[3] == (1_003_000 - 1_090_000) // 250  # time going backwards
    assert fb.deltas[4] == (1_090_500 - 1_003_000) // 250


def test_duplicates_keep_the_first_arrival() -> None:
    recorder = TwccRecorder()
    recorder.record(1, 1.0)
    recorder.record(2, 1.001)
    recorder.record(2, 1.5)
    recorder.record(1, 1.6)
    assert recorder.packets_recorded == 2
    (fb,) = _feedback(recorder)
    assert _reported([fb]) == {1: 1_000_000, 2: 1_001_000}


def test_missing_packets_are_reported_not_received() -> None:
    recorder = TwccRecorder()
    for seq in (100, 101, 105, 130):
        recorder.record(seq, 2.0 + seq * 0.001)
    (fb,) = _feedback(recorder)
    assert fb.base_seq == 100
    assert len(fb.symbols) == 31
    received = {k for k, s in enumerate(fb.symbols) if s != NOT_RECEIVED}
    assert received == {0, 1, 5, 30}
    assert len(fb.deltas) == 4


def test_a_late_packet_reported_lost_is_reported_again_as_received() -> None:
    recorder = TwccRecorder()
    for seq in (1, 2, 4, 5):
        recorder.record(seq, 3.0 + seq * 0.002)
    (first,) = _feedback(recorder, 10.0)
    assert first.symbols[2] == NOT_RECEIVED
    recorder.record(3, 3.05)  # arrives after the feedback called it lost
    recorder.record(6, 3.06)
    (second,) = _feedback(recorder, 11.0)
    # From the late one on, with the arrivals already reported kept as they were.
    assert second.base_seq == 3
    assert _reported([second]) == {3: 3_050_000, 4: 3_008_000, 5: 3_010_000, 6: 3_060_000}
    # Much later than that, and before recording started, are ignored.
    for seq in range(7, 7 + 1000):
        recorder.record(seq, 4.0)
    _feedback(recorder, 12.0)
    recorder.record(0, 5.0)  # before the first number recorded
    recorder.record(8, 5.0)  # a duplicate
    assert not recorder.pending


def test_a_long_stretch_is_split_below_the_mtu() -> None:
    recorder = TwccRecorder()
    rng = random.Random(3)
    t = 1_000_000
    for seq in range(1000):
        t += rng.choice((100, 80_000))  # a mix of small and large deltas: 2-bit vectors
        if seq % 3 != 2:
            recorder.record(seq, t * US)
    packets = recorder.build_feedback(1, 2, 1e6)
    assert packets is not None
    assert len(packets) == 3
    assert all(len(p) < 1200 for p in packets)
    fbs = [parse_transport_feedback(p) for p in packets]
    assert [fb.base_seq for fb in fbs if fb] == [0, MAX_STATUSES, 2 * MAX_STATUSES]
    assert [fb.fb_count for fb in fbs if fb] == [0, 1, 2]
    # One datagram of all three still walks as RTCP.
    parsed, ok = rtcp.parse_rtcp(b"".join(packets))
    assert ok
    assert len(parsed) == 3


def test_a_delta_beyond_16_bits_starts_a_new_packet() -> None:
    recorder = TwccRecorder()
    recorder.record(1, 10.0)
    recorder.record(2, 19.0)  # 9 s later: more than ±8.19 s of 250 µs ticks
    fbs = _feedback(recorder)
    assert [fb.base_seq for fb in fbs] == [1, 2]
    assert _reported(fbs) == {1: 10_000_000, 2: 19_000_000}


def test_a_gap_larger_than_the_ring_restarts_in_either_direction() -> None:
    recorder = TwccRecorder()
    recorder.record(10, 1.0)
    recorder.record(10 + SLOTS + 5, 1.1)  # far ahead
    (fb,) = _feedback(recorder)
    assert (fb.base_seq, fb.symbols) == (10 + SLOTS + 5, [SMALL_DELTA])
    recorder.record(20_000, 1.2)
    recorder.record(20_000 - SLOTS, 1.3)  # far behind: the sender renumbered
    (fb,) = _feedback(recorder, 2e6)
    assert (fb.base_seq, fb.symbols) == (20_000 - SLOTS, [SMALL_DELTA])


def test_feedback_is_not_built_twice_within_the_minimum_interval() -> None:
    recorder = TwccRecorder()
    recorder.record(1, 1.0)
    assert recorder.build_feedback(1, 2, 100.0) is not None
    recorder.record(2, 1.01)
    assert recorder.build_feedback(1, 2, 100.01) is None
    assert recorder.build_feedback(1, 2, 100.05) is not None


def test_the_parser_rejects_malformed_packets() -> None:
    recorder = TwccRecorder()
    for seq in range(30):
        recorder.record(seq, 1.0 + seq * 0.003)
    (packet,) = recorder.build_feedback(1, 2, 0.0) or []
    assert parse_transport_feedback(packet) is not None
    assert parse_transport_feedback(packet[:-4]) is None  # length beyond the data
    assert parse_transport_feedback(packet[:20]) is None
    nack = struct.pack("!BBHIIHH", 0x81, 205, 3, 1, 2, 5, 0)
    assert parse_transport_feedback(nack) is None
    truncated = bytearray(packet)
    struct.pack_into("!H", truncated, 14, 5000)  # more statuses than chunks
    assert parse_transport_feedback(bytes(truncated)) is None


def test_reading_the_sequence_number_from_both_extension_forms() -> None:
    def packet(profile: int, block: bytes) -> bytes:
        block += bytes(-len(block) % 4)
        fixed = struct.pack("!BBHII", 0x90, 96, 1, 2, 3)
        return fixed + struct.pack("!HH", profile, len(block) // 4) + block + b"payload"

    one_byte = packet(0xBEDE, bytes([0x10, 7, 0, 0x31, 0xAB, 0xCD]))
    hdr = parse_header(one_byte)
    assert hdr is not None
    assert read_transport_seq(one_byte, hdr, 3) == 0xABCD
    assert read_transport_seq(one_byte, hdr, 4) == -1
    assert read_transport_seq(one_byte, hdr, 1) == -1  # one byte long: not a sequence number
    two_byte = packet(0x1000, bytes([5, 2, 0x12, 0x34]))
    hdr = parse_header(two_byte)
    assert hdr is not None
    assert read_transport_seq(two_byte, hdr, 5) == 0x1234
    plain = struct.pack("!BBHII", 0x80, 96, 1, 2, 3) + b"x"
    hdr = parse_header(plain)
    assert hdr is not None
    assert read_transport_seq(plain, hdr, 5) == -1


# -- a real publisher ---------------------------------------------------------------------

TCC_ID = 5


@pytest.fixture
def aiortc_with_transport_cc(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[bytes]]:
    """aiortc can write the transport-wide sequence number but neither offers it nor counts
    it: offer it for video, stamp every RTP packet it sends, and keep the RTCP and RTP each
    DTLS transport receives (by id of the transport)."""
    video = [*aiortc_codecs.HEADER_EXTENSIONS["video"]]
    video.append(RTCRtpHeaderExtensionParameters(id=TCC_ID, uri=EXT_TRANSPORT_CC))
    monkeypatch.setitem(aiortc_codecs.HEADER_EXTENSIONS, "video", video)
    serialize = aiortc_rtp.RtpPacket.serialize
    counter = [65500]  # wraps to 0 during the test

    def stamped(self: aiortc_rtp.RtpPacket, *args: Any, **kwargs: Any) -> bytes:
        self.extensions.transport_sequence_number = counter[0] & 0xFFFF
        counter[0] += 1
        return serialize(self, *args, **kwargs)

    monkeypatch.setattr(aiortc_rtp.RtpPacket, "serialize", stamped)
    received: dict[int, list[bytes]] = {}
    handle_rtcp = RTCDtlsTransport._handle_rtcp_data
    handle_rtp = RTCDtlsTransport._handle_rtp_data

    async def rtcp_seen(self: RTCDtlsTransport, data: bytes) -> None:
        received.setdefault(id(self), []).append(data)
        await handle_rtcp(self, data)

    async def rtp_seen(self: RTCDtlsTransport, data: bytes, arrival_time_ms: int) -> None:
        received.setdefault(-id(self), []).append(data)
        await handle_rtp(self, data, arrival_time_ms=arrival_time_ms)

    monkeypatch.setattr(RTCDtlsTransport, "_handle_rtcp_data", rtcp_seen)
    monkeypatch.setattr(RTCDtlsTransport, "_handle_rtp_data", rtp_seen)
    return received


def _with_tcc_feedback(sdp: str) -> str:
    """aiortc lists no rtcp-fb transport-cc either: add it to every video codec's nack."""
    lines = []
    for line in sdp.split("\r\n"):
        lines.append(line)
        if line.startswith("a=rtcp-fb:") and line.endswith(" nack"):
            lines.append(line.replace(" nack", " transport-cc"))
    return "\r\n".join(lines)


async def test_a_real_publisher_negotiates_transport_cc_and_gets_feedback(
    sfu: Server, aiortc_with_transport_cc: dict[int, list[bytes]]
) -> None:
    received = aiortc_with_transport_cc
    pub = RTCPeerConnection()
    sub = RTCPeerConnection()
    try:
        pub.addTransceiver(ColourTrack(), direction="sendonly")
        await pub.setLocalDescription(await pub.createOffer())
        offer = _with_tcc_feedback(pub.localDescription.sdp)
        assert f"a=extmap:{TCC_ID} {EXT_TRANSPORT_CC}" in offer
        assert "goog-remb" in offer
        assert "abs-send-time" in offer
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whip/room1/cam",
            offer,
            {**SDP, **bearer(token(sfu, "room1", "pub-cam", publish=True))},
        )
        assert status == 201, body
        video = parse_sdp(body).media[0]
        pt = video.codecs()[0].payload_type
        assert f"{TCC_ID} {EXT_TRANSPORT_CC}" in video.values("extmap")
        assert f"{pt} transport-cc" in video.values("rtcp-fb")
        assert not any("abs-send-time" in v for v in video.values("extmap"))
        assert not any("goog-remb" in v for v in video.values("rtcp-fb"))
        await pub.setRemoteDescription(RTCSessionDescription(body, "answer"))

        session = next(s for s in sfu.rooms.sessions.values() if s.kind == "whip")
        publisher = sfu.engine.transports[session.transport.id]
        assert publisher.twcc_ext_id == TCC_ID
        twcc = publisher.twcc
        assert twcc is not None

        # A subscriber offering transport-cc is answered with it: the SFU stamps its own
        # numbers there (the publisher's describe the publisher's hop only).
        sub.addTransceiver("video", direction="recvonly")
        await sub.setLocalDescription(await sub.createOffer())
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whep/room1/cam",
            _with_tcc_feedback(sub.localDescription.sdp),
            {**SDP, **bearer(token(sfu, "room1", "sub", subscribe=True))},
        )
        assert status == 201, body
        sub_video = parse_sdp(body).media[0]
        assert f"{TCC_ID} {EXT_TRANSPORT_CC}" in sub_video.values("extmap")
        assert f"{pt} transport-cc" in sub_video.values("rtcp-fb")
        await sub.setRemoteDescription(RTCSessionDescription(body, "answer"))
        sub_session = next(s for s in sfu.rooms.sessions.values() if s.kind == "whep")
        bwe = sfu.engine.transports[sub_session.transport.id].bwe
        assert bwe is not None

        stats = sfu.engine.stats
        await wait_for(
            lambda: twcc.packets_recorded > 150 and stats.twcc_feedback_sent > 5,
            what="arrivals recorded and feedback sent",
        )
        pub_dtls = pub.getTransceivers()[0].sender.transport
        sub_dtls = sub.getTransceivers()[0].receiver.transport

        def feedback_at_publisher() -> list[TransportFeedback]:
            out = []
            for datagram in received.get(id(pub_dtls), []):
                fb = parse_transport_feedback(datagram)
                if fb is not None:
                    out.append(fb)
            return out

        await wait_for(lambda: len(feedback_at_publisher()) > 5, what="feedback at aiortc")
        fbs = feedback_at_publisher()
        assert all(fb.sender_ssrc == publisher.rtcp_ssrc for fb in fbs)
        # Consecutive, numbered feedback covering the publisher's numbers across the wrap.
        assert [fb.fb_count for fb in fbs] == [k & 0xFF for k in range(len(fbs))]
        assert fbs[0].base_seq == 65500
        covered = set(_reported(fbs))
        assert {65535, 0, 1}.issubset(covered)
        assert sum(s != NOT_RECEIVED for fb in fbs for s in fb.symbols) > 100

        # What the subscriber receives carries the SFU's own numbers, from 0, one per packet
        # sent to it: never the publisher's (which started at 65500).
        await wait_for(lambda: len(received.get(-id(sub_dtls), [])) > 20, what="media at sub")
        numbers = []
        for data in received[-id(sub_dtls)]:
            hdr = parse_header(data)
            assert hdr is not None
            numbers.append(read_transport_seq(data, hdr, TCC_ID))
        assert numbers == list(range(len(numbers)))
        # aiortc sends no transport-wide feedback of its own: report what arrived as a
        # browser would, on its SRTCP session, and the SFU's estimate for it moves.
        recorder = TwccRecorder()
        for number in numbers:
            recorder.record(number, time.monotonic())
        for packet in recorder.build_feedback(1234, 0, time.monotonic()) or ():
            await sub_dtls._send_rtp(packet)
        await wait_for(lambda: bwe.updates > 0, what="the subscriber's estimate updated")
        assert stats.twcc_reported[0] >= len(numbers)

        # As an operator scrapes it.
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(f"{sfu.url}/metrics") as r:
            text = await r.text()
        (line,) = [
            t for t in text.splitlines() if t.startswith("sfu_transport_feedback_sent_total")
        ]
        assert float(line.split()[-1]) > 5
    finally:
        await pub.close()
        await sub.close()
