"""RTCP parsing and building for the SFU (RFC 3550, RFC 4585, RFC 5104, RFC 5506).

RTCP is a cold branch of the media plane, but NACK feedback arrives often enough that the
parser reads fields with precompiled `struct.Struct` objects straight from the datagram,
without slicing it into sub-packets first.

`parse_rtcp` never raises: it returns the packets it understood up to the first malformed
one, and a flag saying whether the whole datagram was well formed. Types the SFU does not act
on (SDES, APP, XR, unknown feedback formats) are skipped after their length is validated.
Transport-wide congestion control feedback (RTPFB FMT 15) is recognised as such: reading it
as a generic NACK, as some stacks do, would make the SFU retransmit random packets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final, Literal, NamedTuple, TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

# RFC 3550 section 12.1 and RFC 4585 section 6.1.
PT_SR: Final = 200
PT_RR: Final = 201
PT_SDES: Final = 202
PT_BYE: Final = 203
PT_APP: Final = 204
PT_RTPFB: Final = 205
PT_PSFB: Final = 206

FMT_NACK: Final = 1  # RFC 4585 section 6.2.1
FMT_TWCC: Final = 15  # draft-holmer-rmcat-transport-wide-cc-extensions-01 section 3.1
FMT_PLI: Final = 1  # RFC 4585 section 6.3.1
FMT_FIR: Final = 4  # RFC 5104 section 4.3.1
FMT_AFB: Final = 15  # RFC 4585 section 6.4; REMB lives here

_REMB_ID: Final = 0x52454D42  # "REMB", draft-alvestrand-rmcat-remb-03 section 2.2
_REMB_MANTISSA_MAX: Final = (1 << 18) - 1
_REMB_EXP_MAX: Final = (1 << 6) - 1

_HEADER = struct.Struct("!BBH")  # V|P|count, PT, length in words minus one
_FB = struct.Struct("!BBHII")  # common header + sender SSRC + media SSRC (RFC 4585 6.1)
_SR = struct.Struct("!BBHIQIII")  # header, SSRC, NTP, RTP timestamp, packets, octets
_RR = struct.Struct("!BBHI")
_REPORT = struct.Struct("!IIIIII")  # SSRC, fraction|lost, highest, jitter, LSR, DLSR
_U32 = struct.Struct("!I")
_PAIR16 = struct.Struct("!HH")
_FIR_ENTRY = struct.Struct("!II")  # SSRC, seq nr << 24 (the low 24 bits are reserved)
_TWCC = struct.Struct("!HHI")  # base seq, status count, reference time << 8 | fb count
_REMB = struct.Struct("!IBBH")  # "REMB", SSRC count, exp << 2 | mantissa high, mantissa low


class ReportBlock(NamedTuple):
    """A reception report block (RFC 3550 section 6.4.1). `packets_lost` is signed."""

    ssrc: int
    fraction_lost: int
    packets_lost: int
    highest_seq: int
    jitter: int
    lsr: int
    dlsr: int


class SenderReport(NamedTuple):
    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...]


class ReceiverReport(NamedTuple):
    ssrc: int
    reports: tuple[ReportBlock, ...]


class Bye(NamedTuple):
    ssrcs: tuple[int, ...]
    reason: bytes


class Nack(NamedTuple):
    """Generic NACK with its PID/BLP pairs expanded, modulo 2**16, in packet order."""

    sender_ssrc: int
    media_ssrc: int
    seqs: tuple[int, ...]


class TransportCC(NamedTuple):
    """Transport-wide CC feedback: the fixed FCI fields, and where the FCI is in the
    datagram (`offset`, `length`) for a full parser later."""

    sender_ssrc: int
    media_ssrc: int
    base_seq: int
    status_count: int
    reference_time: int
    fb_pkt_count: int
    offset: int
    length: int


class Pli(NamedTuple):
    sender_ssrc: int
    media_ssrc: int


class FirEntry(NamedTuple):
    ssrc: int
    seq_nr: int


class Fir(NamedTuple):
    """Full Intra Request; the media SSRCs are in the entries (RFC 5104 section 4.3.1.2)."""

    sender_ssrc: int
    entries: tuple[FirEntry, ...]


class Remb(NamedTuple):
    sender_ssrc: int
    bitrate: int
    ssrcs: tuple[int, ...]


RtcpPacket: TypeAlias = SenderReport | ReceiverReport | Bye | Nack | TransportCC | Pli | Fir | Remb


def _reports(data: Buffer, pos: int, count: int) -> tuple[ReportBlock, ...]:
    blocks = []
    for _ in range(count):
        ssrc, lost_word, highest, jitter, lsr, dlsr = _REPORT.unpack_from(data, pos)
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:  # 24-bit two's complement (RFC 3550 section 6.4.1)
            lost -= 0x1000000
        blocks.append(ReportBlock(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr))
        pos += 24
    return tuple(blocks)


def _parse_nack(data: Buffer, pos: int, end: int) -> tuple[int, ...]:
    seqs: list[int] = []
    append = seqs.append
    for p in range(pos, end, 4):
        pid, blp = _PAIR16.unpack_from(data, p)
        append(pid)
        # Bit i of BLP reports pid + i + 1 lost (RFC 4585 section 6.2.1); walk set bits only.
        while blp:
            low = blp & -blp
            append((pid + low.bit_length()) & 0xFFFF)
            blp ^= low
    return tuple(seqs)


def _parse_one(
    data: Buffer, pt: int, count: int, pos: int, end: int
) -> RtcpPacket | Literal[False] | None:
    """One packet's body data[pos:end]: the packet, None to skip it, or False if malformed."""
    size = end - pos
    if PT_RTPFB <= pt <= PT_PSFB:  # the two feedback types, RFC 4585 section 6.1
        if size < 8:
            return False
        _, _, _, sender, media = _FB.unpack_from(data, pos - 4)
        fci = pos + 8
        if pt == PT_RTPFB:
            if count == FMT_NACK:
                if (end - fci) % 4:
                    return False
                return Nack(sender, media, _parse_nack(data, fci, end))
            if count == FMT_TWCC:
                if end - fci < 8:
                    return False
                base, status_count, ref = _TWCC.unpack_from(data, fci)
                return TransportCC(
                    sender, media, base, status_count, ref >> 8, ref & 0xFF, fci, end - fci
                )
            return None
        if count == FMT_PLI:
            return Pli(sender, media)
        if count == FMT_FIR:
            if (end - fci) % 8:
                return False
            entries = []
            for p in range(fci, end, 8):
                ssrc, word = _FIR_ENTRY.unpack_from(data, p)
                entries.append(FirEntry(ssrc, word >> 24))
            return Fir(sender, tuple(entries))
        if count == FMT_AFB and end - fci >= 8:
            ident, n, b1, low = _REMB.unpack_from(data, fci)
            if ident != _REMB_ID:
                return None  # some other application-layer feedback
            if fci + 8 + 4 * n > end:
                return False
            mantissa = ((b1 & 0x03) << 16) | low
            ssrcs = struct.unpack_from(f"!{n}I", data, fci + 8)
            return Remb(sender, mantissa << (b1 >> 2), ssrcs)
        return None
    if pt == PT_SR:
        # RFC 3550 section 6.4.1: profile-specific extensions may follow the report blocks,
        # so the length is a minimum, not an exact value.
        if size < 24 + 24 * count:
            return False
        _, _, _, ssrc, ntp, rtp_ts, packets, octets = _SR.unpack_from(data, pos - 4)
        return SenderReport(ssrc, ntp, rtp_ts, packets, octets, _reports(data, pos + 24, count))
    if pt == PT_RR:
        if size < 4 + 24 * count:
            return False
        ssrc = _U32.unpack_from(data, pos)[0]
        return ReceiverReport(ssrc, _reports(data, pos + 4, count))
    if pt == PT_BYE:
        if size < 4 * count:
            return False
        ssrcs = struct.unpack_from(f"!{count}I", data, pos)
        p = pos + 4 * count
        reason = b""
        if p < end:  # optional length-prefixed reason (RFC 3550 section 6.6)
            n = data[p]
            if p + 1 + n > end:
                return False
            reason = bytes(data[p + 1 : p + 1 + n])
        return Bye(ssrcs, reason)
    return None  # SDES, APP, XR and anything newer: validated framing, nothing to act on


def parse_rtcp(data: Buffer) -> tuple[list[RtcpPacket], bool]:
    """Parse a compound (or RFC 5506 reduced-size) RTCP datagram, already SRTCP-unprotected.

    Returns (packets, ok). `ok` is False if parsing stopped at a malformed packet; packets
    before it are still returned. No particular first packet is required, since RFC 5506
    section 3.1 lets reduced-size RTCP start with any type.
    """
    packets: list[RtcpPacket] = []
    pos = 0
    size = len(data)
    while pos < size:
        if size - pos < 4:
            return packets, False
        b0, pt, words = _HEADER.unpack_from(data, pos)
        if b0 >> 6 != 2:
            return packets, False
        body = pos + 4
        end = body + 4 * words
        if end > size:
            return packets, False
        body_end = end
        if b0 & 0x20:
            # RFC 3550 section 6.4.1: the last octet counts the padding, itself included.
            pad = data[end - 1] if end > body else 0
            if pad == 0 or pad > end - body:
                return packets, False
            body_end -= pad
        result = _parse_one(data, pt, b0 & 0x1F, body, body_end)
        if result is False:
            return packets, False
        if result is not None:
            packets.append(result)
        pos = end
    return packets, True


# --- Builders -------------------------------------------------------------------------------


def _pack_report(buf: bytearray, pos: int, r: ReportBlock) -> None:
    # RFC 3550 section 6.4.1: the cumulative loss is a signed 24-bit field; clamp, never wrap.
    lost = max(-0x800000, min(0x7FFFFF, r.packets_lost)) & 0xFFFFFF
    _REPORT.pack_into(
        buf,
        pos,
        r.ssrc,
        ((r.fraction_lost & 0xFF) << 24) | lost,
        r.highest_seq & 0xFFFFFFFF,
        r.jitter & 0xFFFFFFFF,
        r.lsr & 0xFFFFFFFF,
        r.dlsr & 0xFFFFFFFF,
    )


def build_sr(
    ssrc: int,
    ntp_timestamp: int,
    rtp_timestamp: int,
    packet_count: int,
    octet_count: int,
    reports: Sequence[ReportBlock] = (),
) -> bytes:
    """Sender report (RFC 3550 section 6.4.1); `ntp_timestamp` is the 64-bit NTP format.
    The counters wrap modulo 2**32 as the RFC specifies."""
    if len(reports) > 31:
        raise ValueError("an SR carries at most 31 report blocks")
    buf = bytearray(28 + 24 * len(reports))
    _SR.pack_into(
        buf,
        0,
        0x80 | len(reports),
        PT_SR,
        len(buf) // 4 - 1,
        ssrc,
        ntp_timestamp & 0xFFFFFFFFFFFFFFFF,
        rtp_timestamp & 0xFFFFFFFF,
        packet_count & 0xFFFFFFFF,
        octet_count & 0xFFFFFFFF,
    )
    for i, report in enumerate(reports):
        _pack_report(buf, 28 + 24 * i, report)
    return bytes(buf)


def build_rr(ssrc: int, reports: Sequence[ReportBlock] = ()) -> bytes:
    """Receiver report (RFC 3550 section 6.4.2); with no blocks it is the minimal packet a
    compound RTCP datagram may start with."""
    if len(reports) > 31:
        raise ValueError("an RR carries at most 31 report blocks")
    buf = bytearray(8 + 24 * len(reports))
    _RR.pack_into(buf, 0, 0x80 | len(reports), PT_RR, len(buf) // 4 - 1, ssrc)
    for i, report in enumerate(reports):
        _pack_report(buf, 8 + 24 * i, report)
    return bytes(buf)


def nack_pairs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Compress lost sequence numbers into (PID, BLP) pairs (RFC 4585 section 6.2.1).

    Duplicates and order do not matter. The numbers are ordered starting after the largest
    circular gap between them, which is wrap-aware ascending order for any loss window
    shorter than half the sequence space (65534, 65535, 0, 1 stays one pair). From there a
    greedy cover (each PID is the oldest number not yet covered) uses the fewest pairs.
    """
    uniq = sorted({s & 0xFFFF for s in seqs})
    if not uniq:
        return []
    start = 0
    best_gap = (uniq[0] - uniq[-1]) & 0xFFFF  # the gap that crosses 65535 -> 0
    for i in range(1, len(uniq)):
        gap = uniq[i] - uniq[i - 1]
        if gap > best_gap:
            best_gap = gap
            start = i
    ordered = uniq[start:] + uniq[:start]
    pairs: list[tuple[int, int]] = []
    pid = ordered[0]
    blp = 0
    for seq in ordered[1:]:
        d = (seq - pid) & 0xFFFF
        if d <= 16:
            blp |= 1 << (d - 1)
        else:
            pairs.append((pid, blp))
            pid = seq
            blp = 0
    pairs.append((pid, blp))
    return pairs


def build_nack(sender_ssrc: int, media_ssrc: int, seqs: Iterable[int]) -> bytes:
    """Generic NACK (RTPFB FMT 1) for the given lost sequence numbers."""
    pairs = nack_pairs(seqs)
    if not pairs:
        raise ValueError("a NACK needs at least one sequence number")
    # At most 3856 pairs (every 17th number lost), so the length field cannot overflow.
    words = 2 + len(pairs)
    buf = bytearray(4 + 4 * words)
    _FB.pack_into(buf, 0, 0x80 | FMT_NACK, PT_RTPFB, words, sender_ssrc, media_ssrc)
    for i, (pid, blp) in enumerate(pairs):
        _PAIR16.pack_into(buf, 12 + 4 * i, pid, blp)
    return bytes(buf)


def build_pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    """Picture Loss Indication (PSFB FMT 1, RFC 4585 section 6.3.1): no FCI."""
    return _FB.pack(0x80 | FMT_PLI, PT_PSFB, 2, sender_ssrc, media_ssrc)


def build_fir(sender_ssrc: int, media_ssrc: int, seq_nr: int) -> bytes:
    """Full Intra Request (PSFB FMT 4, RFC 5104 section 4.3.1) for one media source.

    The header's media SSRC is 0 (section 4.3.1.2); the target is in the FCI entry. The
    caller increments `seq_nr` (mod 256) per new request, not per repetition (4.3.1.1).
    """
    return _FB.pack(0x80 | FMT_FIR, PT_PSFB, 4, sender_ssrc, 0) + _FIR_ENTRY.pack(
        media_ssrc, (seq_nr & 0xFF) << 24
    )


def build_remb(sender_ssrc: int, bitrate: int, ssrcs: Sequence[int]) -> bytes:
    """REMB (PSFB FMT 15, draft-alvestrand-rmcat-remb-03). The bitrate is rounded down to
    an 18-bit mantissa and 6-bit exponent."""
    if bitrate < 0 or len(ssrcs) > 255:
        raise ValueError("REMB bitrate must be >= 0 and carry at most 255 SSRCs")
    exp = max(0, bitrate.bit_length() - 18)
    if exp > _REMB_EXP_MAX:
        exp = _REMB_EXP_MAX
        mantissa = _REMB_MANTISSA_MAX
    else:
        mantissa = bitrate >> exp
    words = 4 + len(ssrcs)
    return (
        _FB.pack(0x80 | FMT_AFB, PT_PSFB, words, sender_ssrc, 0)
        + _REMB.pack(_REMB_ID, len(ssrcs), (exp << 2) | (mantissa >> 16), mantissa & 0xFFFF)
        + struct.pack(f"!{len(ssrcs)}I", *ssrcs)
    )


def build_bye(ssrcs: Sequence[int], reason: bytes = b"") -> bytes:
    """BYE (RFC 3550 section 6.6), with the optional reason padded to a word boundary."""
    if len(ssrcs) > 31 or len(reason) > 255:
        raise ValueError("a BYE carries at most 31 SSRCs and a 255-byte reason")
    body = struct.pack(f"!{len(ssrcs)}I", *ssrcs)
    if reason:
        body += bytes((len(reason),)) + reason
        body += bytes(-len(body) % 4)
    return _HEADER.pack(0x80 | len(ssrcs), PT_BYE, len(body) // 4) + body
