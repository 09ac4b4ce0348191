"""RTCP: builders read back by aiortc, aiortc's packets read by us, compound and reduced-size
datagrams, NACK compression across the wrap, transport-cc kept apart from NACK, and 20k
fuzzed inputs that stop with a flag instead of raising."""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from aiortc import rtp as artp

from sfu.media import rtcp
from sfu.media.rtcp import (
    Bye,
    Fir,
    FirEntry,
    Nack,
    Pli,
    ReceiverReport,
    Remb,
    ReportBlock,
    SenderReport,
    TransportCC,
)

BLOCK = ReportBlock(0xAABBCCDD, 25, -3, 0x0001FFFF, 1234, 0x11112222, 0x00010000)


def parse_ok(data: bytes) -> list[rtcp.RtcpPacket]:
    packets, ok = rtcp.parse_rtcp(data)
    assert ok
    return packets


def twcc(padded: bool = False) -> bytes:
    """A transport-cc feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01 3.1):
    base seq 100, 5 packets, one run-length chunk "5 x small delta", 5 one-byte deltas."""
    fci = struct.pack("!HHI", 100, 5, (0x123456 << 8) | 7) + struct.pack("!H", 0x2005)
    fci += bytes([4, 8, 4, 0, 12])
    if padded:  # as libwebrtc does: RTCP padding with the P bit
        pad = -len(fci) % 4
        body = struct.pack("!II", 0x01020304, 0x05060708) + fci + bytes(pad - 1) + bytes([pad])
        return struct.pack("!BBH", 0xA0 | 15, 205, len(body) // 4) + body
    fci += bytes(-len(fci) % 4)
    body = struct.pack("!II", 0x01020304, 0x05060708) + fci
    return struct.pack("!BBH", 0x80 | 15, 205, len(body) // 4) + body


# --- reports ----------------------------------------------------------------------------------


def test_sender_report_round_trip_and_aiortc() -> None:
    ntp = 0xE5F3A1B2_80000000
    data = rtcp.build_sr(0x1234, ntp, (1 << 32) + 5, 100, 120000, [BLOCK])
    assert parse_ok(data) == [SenderReport(0x1234, ntp, 5, 100, 120000, (BLOCK,))]
    (theirs,) = artp.RtcpPacket.parse(data)
    assert isinstance(theirs, artp.RtcpSrPacket)
    assert theirs.sender_info.ntp_timestamp == ntp
    assert theirs.sender_info.octet_count == 120000
    assert theirs.reports[0].packets_lost == -3
    assert theirs.reports[0].jitter == 1234
    # aiortc's serialization reads identically with ours.
    info = artp.RtcpSenderInfo(ntp_timestamp=ntp, rtp_timestamp=9, packet_count=1, octet_count=2)
    report = artp.RtcpReceiverInfo(
        ssrc=7, fraction_lost=1, packets_lost=-8388608, highest_sequence=3, jitter=4, lsr=5, dlsr=6
    )
    ours = parse_ok(bytes(artp.RtcpSrPacket(ssrc=9, sender_info=info, reports=[report])))
    assert ours == [SenderReport(9, ntp, 9, 1, 2, (ReportBlock(7, 1, -8388608, 3, 4, 5, 6),))]


def test_receiver_report_and_loss_clamping() -> None:
    assert parse_ok(rtcp.build_rr(42)) == [ReceiverReport(42, ())]
    huge = BLOCK._replace(packets_lost=10**9)
    tiny = BLOCK._replace(packets_lost=-(10**9))
    (rr,) = parse_ok(rtcp.build_rr(42, [BLOCK, huge, tiny]))
    assert isinstance(rr, ReceiverReport)
    assert [b.packets_lost for b in rr.reports] == [-3, 0x7FFFFF, -0x800000]
    (theirs,) = artp.RtcpPacket.parse(rtcp.build_rr(42, [BLOCK]))
    assert isinstance(theirs, artp.RtcpRrPacket)
    assert theirs.reports[0].highest_sequence == BLOCK.highest_seq


def test_sr_with_profile_extension_is_accepted() -> None:
    # RFC 3550 section 6.4.1: profile-specific extensions may follow the report blocks.
    data = bytearray(rtcp.build_sr(1, 2, 3, 4, 5) + b"EXTN")
    data[3] += 1
    assert parse_ok(bytes(data)) == [SenderReport(1, 2, 3, 4, 5, ())]


def test_bye_with_reason() -> None:
    data = rtcp.build_bye([1, 2], b"shutting down")
    assert len(data) % 4 == 0
    assert parse_ok(data) == [Bye((1, 2), b"shutting down")]
    (theirs,) = artp.RtcpPacket.parse(data)
    assert isinstance(theirs, artp.RtcpByePacket)
    assert theirs.sources == [1, 2]
    assert parse_ok(rtcp.build_bye([])) == [Bye((), b"")]
    assert parse_ok(bytes(artp.RtcpByePacket(sources=[5]))) == [Bye((5,), b"")]


# --- NACK -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seqs", "pairs"),
    [
        ([5], [(5, 0)]),
        ([5, 6, 7], [(5, 0b11)]),
        ([7, 5, 6, 5, 7], [(5, 0b11)]),  # order and duplicates do not matter
        ([10, 26], [(10, 1 << 15)]),  # exactly 16 apart still fits one pair
        ([10, 27], [(10, 0), (27, 0)]),  # 17 apart needs a second pair
        ([65535, 0, 1], [(65535, 0b11)]),  # across the wrap
        ([0, 1, 65534, 65535], [(65534, 0b111)]),  # given in numeric order, still one pair
        (
            [65530 + i for i in range(6)] + list(range(12)),
            [(65530, 0xFFFF), (65530 + 17 & 0xFFFF, 0)],
        ),
        ([65536 + 3, -1], [(65535, 0b1000)]),  # values are taken modulo 2**16
        # Spread over more than half the space there is no wrap-aware order; any start is fine.
        ([100, 30000, 60000], [(60000, 0), (100, 0), (30000, 0)]),
    ],
)
def test_nack_pairs(seqs: list[int], pairs: list[tuple[int, int]]) -> None:
    assert rtcp.nack_pairs(seqs) == pairs
    (nack,) = parse_ok(rtcp.build_nack(1, 2, seqs))
    assert isinstance(nack, Nack)
    assert (nack.sender_ssrc, nack.media_ssrc) == (1, 2)
    assert sorted(nack.seqs) == sorted({s & 0xFFFF for s in seqs})


def test_nack_random_sets_round_trip_through_aiortc() -> None:
    rnd = random.Random(4585)
    for _ in range(300):
        base = rnd.randrange(65536)
        seqs = [(base + rnd.randrange(300)) & 0xFFFF for _ in range(rnd.randrange(1, 60))]
        data = rtcp.build_nack(0x10, 0x20, seqs)
        (ours,) = parse_ok(data)
        assert isinstance(ours, Nack)
        assert set(ours.seqs) == set(seqs)
        assert len(ours.seqs) == len(set(seqs))
        (theirs,) = artp.RtcpPacket.parse(data)
        assert isinstance(theirs, artp.RtcpRtpfbPacket)
        assert theirs.fmt == 1
        # aiortc does not reduce pid + offset modulo 2**16 after a wrap.
        assert {s & 0xFFFF for s in theirs.lost} == set(seqs)
        # Greedy covering is minimal: every pair starts at a number the previous one missed.
        pairs = rtcp.nack_pairs(seqs)
        for (a, _), (b, _) in itertools.pairwise(pairs):
            assert (b - a) & 0xFFFF > 16
        # And aiortc's own NACK serialization reads the same with ours.
        lost = sorted(set(seqs))
        their_bytes = bytes(artp.RtcpRtpfbPacket(fmt=1, ssrc=3, media_ssrc=4, lost=lost))
        (again,) = parse_ok(their_bytes)
        assert isinstance(again, Nack)
        assert set(again.seqs) == set(lost)


def test_nack_builder_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        rtcp.build_nack(1, 2, [])
    assert rtcp.nack_pairs([]) == []


def test_nack_blp_expansion_example() -> None:
    # PID 65534 with BLP bits 0, 1 and 15: 65535, 0 and 65534 + 16 = 14 (wrapped) too.
    body = struct.pack("!IIHH", 1, 2, 65534, 0b1000_0000_0000_0011)
    data = struct.pack("!BBH", 0x81, 205, 3) + body
    assert parse_ok(data) == [Nack(1, 2, (65534, 65535, 0, 14))]


# --- transport-cc is not a NACK ---------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_transport_cc_is_recognised_not_nack(padded: bool) -> None:
    data = twcc(padded)
    (fb,) = parse_ok(data)
    assert isinstance(fb, TransportCC)
    assert fb == TransportCC(0x01020304, 0x05060708, 100, 5, 0x123456, 7, 12, fb.length)
    assert data[fb.offset : fb.offset + 2] == b"\x00\x64"
    # Why this matters: aiortc turns the same bytes into "lost" packets, or rejects them.
    if padded:
        with pytest.raises(ValueError, match="length"):
            artp.RtcpPacket.parse(data)
    else:
        (theirs,) = artp.RtcpPacket.parse(data)
        assert isinstance(theirs, artp.RtcpRtpfbPacket)
        assert 4660 in theirs.lost


def test_truncated_transport_cc_is_malformed() -> None:
    body = struct.pack("!IIHH", 1, 2, 100, 5)
    packets, ok = rtcp.parse_rtcp(struct.pack("!BBH", 0x8F, 205, 3) + body)
    assert packets == []
    assert not ok


# --- payload-specific feedback ----------------------------------------------------------------


def test_pli() -> None:
    data = rtcp.build_pli(0xA, 0xB)
    assert data == bytes.fromhex("81ce0002") + struct.pack("!II", 0xA, 0xB)
    assert parse_ok(data) == [Pli(0xA, 0xB)]
    (theirs,) = artp.RtcpPacket.parse(data)
    assert isinstance(theirs, artp.RtcpPsfbPacket)
    assert theirs.fmt == 1
    assert theirs.media_ssrc == 0xB
    assert theirs.fci == b""
    assert parse_ok(bytes(artp.RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=2))) == [Pli(1, 2)]


def test_fir() -> None:
    data = rtcp.build_fir(0xA, 0xB, 257)
    assert parse_ok(data) == [Fir(0xA, (FirEntry(0xB, 1),))]
    (theirs,) = artp.RtcpPacket.parse(data)
    assert isinstance(theirs, artp.RtcpPsfbPacket)
    assert theirs.fmt == 4
    assert theirs.media_ssrc == 0  # RFC 5104 section 4.3.1.2
    assert theirs.fci == struct.pack("!IBxxx", 0xB, 1)
    fci = struct.pack("!IBxxxIBxxx", 5, 9, 6, 10)
    two = bytes(artp.RtcpPsfbPacket(fmt=4, ssrc=1, media_ssrc=0, fci=fci))
    assert parse_ok(two) == [Fir(1, (FirEntry(5, 9), FirEntry(6, 10)))]
    bad = bytes(artp.RtcpPsfbPacket(fmt=4, ssrc=1, media_ssrc=0, fci=fci[:12]))
    assert rtcp.parse_rtcp(bad) == ([], False)


@pytest.mark.parametrize("bitrate", [0, 1, 300_000, 2_500_000, (1 << 18) - 1, 1 << 40])
def test_remb(bitrate: int) -> None:
    data = rtcp.build_remb(0x77, bitrate, [1, 2, 3])
    (remb,) = parse_ok(data)
    assert isinstance(remb, Remb)
    assert remb.ssrcs == (1, 2, 3)
    assert remb.sender_ssrc == 0x77
    assert remb.bitrate <= bitrate
    assert bitrate - remb.bitrate < max(1, bitrate >> 17)
    (theirs,) = artp.RtcpPacket.parse(data)
    assert isinstance(theirs, artp.RtcpPsfbPacket)
    assert theirs.fmt == 15
    assert artp.unpack_remb_fci(theirs.fci) == (remb.bitrate, [1, 2, 3])
    fci = artp.pack_remb_fci(bitrate, [9])
    mine = parse_ok(bytes(artp.RtcpPsfbPacket(fmt=15, ssrc=4, media_ssrc=0, fci=fci)))
    assert mine == [Remb(4, artp.unpack_remb_fci(fci)[0], (9,))]


def test_remb_edge_cases() -> None:
    (remb,) = parse_ok(rtcp.build_remb(1, 1 << 90, []))
    assert isinstance(remb, Remb)
    assert remb.bitrate == ((1 << 18) - 1) << 63
    with pytest.raises(ValueError, match="REMB"):
        rtcp.build_remb(1, -1, [])
    # Another application-layer feedback is skipped; a REMB whose SSRC list overruns is not.
    other = bytes(artp.RtcpPsfbPacket(fmt=15, ssrc=1, media_ssrc=0, fci=b"ABCD\x00\x00\x00\x00"))
    assert parse_ok(other) == []
    overrun = bytes(artp.RtcpPsfbPacket(fmt=15, ssrc=1, media_ssrc=0, fci=b"REMB\x02\x00\x00\x01"))
    assert rtcp.parse_rtcp(overrun) == ([], False)


# --- compound, reduced-size, padding ----------------------------------------------------------


def sdes() -> bytes:
    chunk = artp.RtcpSourceInfo(ssrc=0x1234, items=[(1, b"user@host")])
    return bytes(artp.RtcpSdesPacket(chunks=[chunk]))


def test_compound_datagram() -> None:
    app = struct.pack("!BBHI4s", 0x80, 204, 2, 0x1234, b"TEST")
    xr = struct.pack("!BBHI", 0x80, 207, 1, 0x1234)
    data = (
        rtcp.build_sr(0x1234, 1, 2, 3, 4)
        + sdes()
        + rtcp.build_nack(0x1234, 0x99, [1, 2, 40])
        + rtcp.build_pli(0x1234, 0x99)
        + app
        + xr
        + twcc()
        + rtcp.build_fir(0x1234, 0x99, 3)
        + rtcp.build_remb(0x1234, 1_000_000, [0x99])
        + rtcp.build_bye([0x1234])
    )
    packets = parse_ok(data)
    assert [type(p).__name__ for p in packets] == [
        "SenderReport",
        "Nack",
        "Pli",
        "TransportCC",
        "Fir",
        "Remb",
        "Bye",
    ]
    assert packets[1] == Nack(0x1234, 0x99, (1, 2, 40))


def test_reduced_size_rtcp() -> None:
    # RFC 5506: a lone feedback packet, without the SR/RR and SDES a compound one starts with.
    assert parse_ok(rtcp.build_nack(1, 2, [7])) == [Nack(1, 2, (7,))]
    assert parse_ok(rtcp.build_pli(1, 2) + rtcp.build_pli(1, 3)) == [Pli(1, 2), Pli(1, 3)]
    assert parse_ok(b"") == []


def test_padding_on_last_packet() -> None:
    pli = bytearray(rtcp.build_pli(1, 2) + bytes([0, 0, 0, 4]))
    pli[0] |= 0x20
    pli[3] += 1
    assert parse_ok(rtcp.build_rr(1) + bytes(pli)) == [ReceiverReport(1, ()), Pli(1, 2)]


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"\x81", 1),  # fewer than 4 bytes left
        (b"\x40\xc9\x00\x00", 1),  # version 1
        (struct.pack("!BBH", 0x80, 201, 5) + bytes(4), 1),  # length beyond the datagram
        (struct.pack("!BBHI", 0xA0, 201, 1, 0), 1),  # padding count 0
        (struct.pack("!BBHI", 0xA0, 201, 1, 9), 1),  # padding count larger than the body
        (struct.pack("!BBH", 0xA0, 201, 0), 1),  # padding bit on an empty body
        (struct.pack("!BBHI", 0x81, 201, 1, 0), 1),  # RR announcing a block it lacks
        (struct.pack("!BBHI", 0x80, 200, 1, 0), 1),  # SR without sender info
        (struct.pack("!BBHI", 0x82, 203, 1, 0), 1),  # BYE with too few SSRCs
        (struct.pack("!BBHI", 0x81, 203, 2, 0x5) + b"\x09ab\x00", 1),  # reason overruns
        (struct.pack("!BBHI", 0x81, 205, 1, 0), 1),  # feedback shorter than two SSRCs
        (struct.pack("!BBHIIH", 0xA1, 205, 3, 0, 0, 0) + b"\x00\x02", 1),  # NACK FCI half
    ],
)
def test_malformed_stops_with_flag(tail: bytes, expected: int) -> None:
    packets, ok = rtcp.parse_rtcp(rtcp.build_pli(1, 2) + tail)
    assert not ok
    assert len(packets) == expected


def test_builders_validate() -> None:
    with pytest.raises(ValueError, match="31"):
        rtcp.build_sr(1, 2, 3, 4, 5, [BLOCK] * 32)
    with pytest.raises(ValueError, match="31"):
        rtcp.build_rr(1, [BLOCK] * 32)
    with pytest.raises(ValueError, match="BYE"):
        rtcp.build_bye(list(range(32)))
    # The worst case (every 17th number lost) still fits one RTCP packet.
    (nack,) = parse_ok(rtcp.build_nack(1, 2, range(0, 65536, 17)))
    assert isinstance(nack, Nack)
    assert len(nack.seqs) == 3856


# --- fuzzing ----------------------------------------------------------------------------------


def test_fuzz_never_raises() -> None:
    rnd = random.Random(3550)
    seeds = [
        rtcp.build_sr(1, 2, 3, 4, 5, [BLOCK, BLOCK]),
        rtcp.build_rr(1, [BLOCK]),
        rtcp.build_nack(1, 2, [1, 5, 9, 300, 65535]),
        rtcp.build_pli(1, 2) + rtcp.build_fir(1, 2, 3),
        rtcp.build_remb(1, 123456, [1, 2]),
        rtcp.build_bye([1], b"bye"),
        twcc(),
        twcc(padded=True),
        sdes() + rtcp.build_rr(5),
    ]
    flagged = 0
    for i in range(20_000):
        if i % 4 == 0:
            data = bytes([0x80 | rnd.randrange(64), rnd.choice([200, 201, 203, 205, 206])])
            data += rnd.randbytes(rnd.randrange(60))
        else:
            mutated = bytearray(b"".join(rnd.sample(seeds, rnd.randrange(1, 4))))
            for _ in range(rnd.randrange(1, 4)):
                mutated[rnd.randrange(len(mutated))] = rnd.randrange(256)
            if i % 4 == 2:
                del mutated[rnd.randrange(len(mutated) + 1) :]
            data = bytes(mutated)
        packets, ok = rtcp.parse_rtcp(data)
        assert isinstance(packets, list)
        flagged += not ok
        for p in packets:
            if isinstance(p, Nack):
                assert all(0 <= s < 65536 for s in p.seqs)
    assert 2_000 < flagged < 19_000
