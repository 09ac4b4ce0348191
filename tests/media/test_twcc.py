"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-
extensions-01): chunk encodings against the draft's examples, packet round trips, and a
real aiortc publisher that negotiates it and receives it."""

from __future__ import annotations

import random
import struct

from aiortc import RTCPeerConnection, RTCSessionDescription

from sfu.app import Server
from sfu.control.sdp import parse_sdp
from sfu.media.rtcp import parse_rtcp
from sfu.media.twcc import (
    LARGE_DELTA,
    NOT_RECEIVED,
    SMALL_DELTA,
    TwccRecorder,
    encode_chunks,
    encode_feedback,
    parse_feedback,
)
from tests.media.harness import (
    SDP,
    ColourTrack,
    bearer,
    post_offer,
    token,
    wait_for,
)


def test_run_length_chunk_matches_the_drafts_example() -> None:
    # §3.1.3 example: a run of 221 "packet not received" is 0|00|0000011011101.
    assert encode_chunks([NOT_RECEIVED] * 221) == struct.pack("!H", 0b0000000011011101)
    # The same shape with "received, small delta" in the symbol bits.
    assert encode_chunks([SMALL_DELTA] * 221) == struct.pack("!H", 0b0010000011011101)


def test_one_bit_status_vector_matches_the_drafts_example() -> None:
    # §3.1.4 example: 1|0|0 11111 000 111 00 — 1 lost, 5 received, 3 lost, 3 received,
    # 2 lost; the one status after it becomes a run of 1.
    symbols = [0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1]
    expected = struct.pack("!HH", 0b1001111100011100, (SMALL_DELTA << 13) | 1)
    assert encode_chunks(symbols) == expected


def test_two_bit_status_vector_when_a_large_delta_is_among_them() -> None:
    symbols = [NOT_RECEIVED, LARGE_DELTA, SMALL_DELTA, SMALL_DELTA, SMALL_DELTA, 0, 0, 1]
    chunks = encode_chunks(symbols)
    assert struct.unpack_from("!H", chunks)[0] == 0b1100100101010000


def test_feedback_round_trips_with_loss_reordering_and_large_deltas() -> None:
    rng = random.Random(7)
    recorder = TwccRecorder()
    arrivals: dict[int, int] = {}
    t = 5_000_000
    seqs = list(range(65500, 65536)) + list(range(0, 150))  # wraps around 65535 -> 0
    for index, seq in enumerate(seqs):
        t += rng.choice((0, 250, 1_000, 5_000, 80_000 if index == 40 else 500))
        if rng.random() < 0.1:
            continue  # lost
        arrivals[seq] = t
    order = list(arrivals.items())
    order[10], order[11] = order[11], order[10]  # reordered on the way
    for seq, at in order:
        recorder.record(seq, at)
    packets = recorder.build_feedback(0x1111, 0x2222)
    assert len(packets) == 1
    packet = packets[0]
    assert len(packet) % 4 == 0
    assert (struct.unpack_from("!H", packet, 2)[0] + 1) * 4 == len(packet)
    base, times, _, fb_count = parse_feedback(packet)
    assert base == 65500
    assert fb_count == 0
    assert len(times) == len(seqs)
    first = min(arrivals.values())
    for seq, reported in zip(seqs, times, strict=True):
        if seq not in arrivals:
            assert reported is None
        else:
            assert reported is not None
            # Quantised to 250 µs, chained from the previous report: never drifts.
            assert abs(reported - arrivals[seq]) < 250 + (first % 64_000 == 0)
    # Everything was reported: the next round has nothing to say.
    assert recorder.build_feedback(0x1111, 0x2222) == []
    recorder.record(150, t + 1_000)
    (again,) = recorder.build_feedback(0x1111, 0x2222)
    assert parse_feedback(again)[0] == 150
    assert parse_feedback(again)[3] == 1  # feedback packet count moves on


def test_a_long_stretch_is_split_below_the_mtu_and_parses_as_rtcp() -> None:
    recorder = TwccRecorder()
    for seq in range(1000):
        recorder.record(seq, 1_000_000 + seq * 300)
    packets = recorder.build_feedback(1, 2)
    assert len(packets) == 3
    assert all(len(p) < 1200 for p in packets)
    assert [parse_feedback(p)[0] for p in packets] == [0, 400, 800]
    compound = b"".join(packets)
    parsed, ok = parse_rtcp(compound)
    assert ok
    assert len(parsed) == 3


def test_late_packets_already_reported_are_ignored_and_a_huge_jump_resets() -> None:
    recorder = TwccRecorder()
    recorder.record(10, 1_000)
    recorder.build_feedback(1, 2)
    recorder.record(9, 2_000)  # reported as lost already
    assert not recorder.pending
    recorder.record(30_000, 3_000)  # a jump far beyond the window
    (packet,) = recorder.build_feedback(1, 2)
    base, times, _, _ = parse_feedback(packet)
    assert times[-1] is not None
    assert (base + len(times) - 1) & 0xFFFF == 30_000


def test_encode_feedback_uses_a_large_delta_for_time_going_backwards() -> None:
    packet = encode_feedback(1, 2, 100, [64_000 * 10 + 10_000, 64_000 * 10 + 5_000], 3)
    _, times, reference, count = parse_feedback(packet)
    assert (reference, count) == (10, 3)
    assert times == [64_000 * 10 + 10_000, 64_000 * 10 + 5_000]


TCC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"


async def test_a_real_publisher_negotiates_transport_cc_and_gets_feedback(sfu: Server) -> None:
    """aiortc does not offer transport-cc (browsers do): the test adds it to a real offer.
    aiortc does not stamp the numbers either, so feedback itself is covered by the unit
    tests above and, with Chromium, by bench/call_quality.py."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver(ColourTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp.replace(
            "a=rtcp-fb:97 nack\r\n",
            f"a=rtcp-fb:97 nack\r\na=rtcp-fb:97 transport-cc\r\na=extmap:5 {TCC_URI}\r\n",
        )
        assert TCC_URI in offer
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whip/room1/cam",
            offer,
            {**SDP, **bearer(token(sfu, "room1", "pub-cam", publish=True))},
        )
        assert status == 201, body
        video = parse_sdp(body).media[0]
        assert f"5 {TCC_URI}" in video.values("extmap")
        assert "97 transport-cc" in video.values("rtcp-fb")
        assert not any("abs-send-time" in v for v in video.values("extmap"))
        assert not any("goog-remb" in v for v in video.values("rtcp-fb"))
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))

        session = next(s for s in sfu.rooms.sessions.values() if s.kind == "whip")
        # The publisher's transport records the numbers under the negotiated id; the
        # producer keeps the id so every subscriber's copy strips the element.
        assert session.transport.twcc_ext_id == 5
        assert session.transport.twcc is not None
        assert session.producers[0].ext_ids.get(TCC_URI) == 5
        await wait_for(lambda: pc.connectionState == "connected", what="publisher connected")
    finally:
        await pc.close()
