"""Transport-wide congestion control feedback for publishers
(draft-holmer-rmcat-transport-wide-cc-extensions-01).

A publisher stamps every packet on its transport with a transport-wide sequence number (an
RTP header extension). The SFU records when each number arrived and, every 50-100 ms, reports
the arrivals back in RTCP RTPFB FMT 15 packets; the publisher's own estimator (GCC in
browsers) turns them into a send rate. Without this feedback Chrome never leaves its start
rate (300 kbit/s). The numbers describe the publisher's hop only and are never forwarded.

`TwccRecorder.record` runs per packet: a preallocated array, no allocation. Building feedback
runs on the 50 ms media timer.
"""

from __future__ import annotations

import struct
from array import array

# Arrivals kept between two feedback rounds; more (over 40k packets/s at a 100 ms period)
# and the oldest are reported as lost rather than kept.
SLOTS = 4096
MASK = SLOTS - 1
# Statuses per feedback packet, so that one stays well under a 1200-byte MTU: at most
# 2 bytes of delta each plus 2 bytes of chunk per 7 statuses, plus 20 bytes of header.
MAX_STATUSES = 400
DELTA_UNIT_US = 250
REFERENCE_UNIT_US = 64_000

NOT_RECEIVED = 0
SMALL_DELTA = 1
LARGE_DELTA = 2


class TwccRecorder:
    """Arrival times by transport-wide sequence number, for one publisher transport."""

    __slots__ = ("_arrivals", "_base", "_highest", "_packet_count", "packets_recorded")

    def __init__(self) -> None:
        self._arrivals = array("q", [-1]) * SLOTS  # microseconds, -1: not received
        self._base = -1  # first unreported sequence number, unwrapped (-1: none seen yet)
        self._highest = -1
        self._packet_count = 0  # the 8-bit "fb pkt. count" of the next feedback
        self.packets_recorded = 0

    def record(self, seq: int, arrival_us: int) -> None:
        highest = self._highest
        if highest < 0:
            self._base = self._highest = seq
            self._arrivals[seq & MASK] = arrival_us
            self.packets_recorded += 1
            return
        # Unwrap the 16-bit number around the highest one seen (RFC 3550 A.1 style).
        diff = (seq - highest) & 0xFFFF
        unwrapped = highest + diff if diff < 0x8000 else highest - (0x10000 - diff)
        if unwrapped < self._base:
            return  # already reported as lost; the sender has moved on
        if unwrapped - self._base >= SLOTS:
            # A jump larger than the window: report from here on, the rest counts as lost.
            self._clear(self._base, min(highest, self._base + SLOTS - 1))
            self._base = unwrapped - SLOTS // 2
            self._clear(self._base, unwrapped)
        if unwrapped > highest:
            self._highest = unwrapped
        self._arrivals[unwrapped & MASK] = arrival_us
        self.packets_recorded += 1

    def _clear(self, first: int, last: int) -> None:
        arrivals = self._arrivals
        for seq in range(first, last + 1):
            arrivals[seq & MASK] = -1

    @property
    def pending(self) -> bool:
        return self._highest >= self._base >= 0

    def build_feedback(self, sender_ssrc: int, media_ssrc: int) -> list[bytes]:
        """Feedback packets covering everything recorded since the last call (may be none)."""
        out: list[bytes] = []
        arrivals = self._arrivals
        while self._highest >= self._base >= 0:
            first = self._base
            last = min(self._highest, first + MAX_STATUSES - 1)
            times = [arrivals[seq & MASK] for seq in range(first, last + 1)]
            self._clear(first, last)
            self._base = last + 1
            if all(t < 0 for t in times):
                continue  # nothing arrived in this stretch: nothing to say yet
            out.append(
                encode_feedback(sender_ssrc, media_ssrc, first & 0xFFFF, times, self._packet_count)
            )
            self._packet_count = (self._packet_count + 1) & 0xFF
        return out


def encode_feedback(
    sender_ssrc: int, media_ssrc: int, base_seq: int, times: list[int], fb_count: int
) -> bytes:
    """One RTPFB FMT 15 packet: statuses of `times` (µs, -1 = lost) from `base_seq` on."""
    first_time = next(t for t in times if t >= 0)
    reference = first_time // REFERENCE_UNIT_US
    previous = reference * REFERENCE_UNIT_US
    symbols: list[int] = []
    deltas = bytearray()
    for arrival in times:
        if arrival < 0:
            symbols.append(NOT_RECEIVED)
            continue
        ticks = (arrival - previous) // DELTA_UNIT_US
        if 0 <= ticks <= 0xFF:
            symbols.append(SMALL_DELTA)
            deltas.append(ticks)
        else:
            ticks = max(-0x8000, min(0x7FFF, ticks))
            symbols.append(LARGE_DELTA)
            deltas += struct.pack("!h", ticks)
        # Deltas chain from the previous packet's reported (quantised) time, so rounding
        # never accumulates into drift.
        previous += ticks * DELTA_UNIT_US
    chunks = encode_chunks(symbols)
    body = (
        struct.pack(
            "!IIHHI",
            sender_ssrc,
            media_ssrc,
            base_seq,
            len(times),
            ((reference & 0xFFFFFF) << 8) | (fb_count & 0xFF),
        )
        + chunks
        + deltas
    )
    padding = -len(body) % 4
    if padding:
        body += bytes(padding)
    # The P bit would claim the last byte counts the padding; the draft's zero padding is
    # inside the length instead, as receivers expect.
    header = struct.pack("!BBH", 0x80 | 15, 205, (len(body) + 4) // 4 - 1)
    return header + body


def encode_chunks(symbols: list[int]) -> bytes:
    """Packet status chunks: run-length where a run is long, status vectors elsewhere."""
    out = bytearray()
    i, n = 0, len(symbols)
    while i < n:
        symbol = symbols[i]
        run = 1
        while i + run < n and symbols[i + run] == symbol and run < 0x1FFF:
            run += 1
        if run >= 14 or i + run == n:
            out += struct.pack("!H", (symbol << 13) | run)
            i += run
            continue
        window = symbols[i : i + 14]
        if max(window) <= SMALL_DELTA:
            value = 0x8000
            for k, s in enumerate(window):
                value |= s << (13 - k)
            out += struct.pack("!H", value)
            i += 14
        else:
            value = 0xC000
            for k, s in enumerate(symbols[i : i + 7]):
                value |= s << (12 - 2 * k)
            out += struct.pack("!H", value)
            i += 7
    return bytes(out)


def parse_feedback(packet: bytes) -> tuple[int, list[int | None], int, int]:
    """Decode an RTPFB FMT 15 packet: (base seq, arrival µs or None per status relative to
    reference time, reference time in 64 ms units, fb pkt count). Raises ValueError."""
    if len(packet) < 20 or packet[0] & 0x1F != 15 or packet[1] != 205:
        raise ValueError("not a transport-wide feedback packet")
    length = (struct.unpack_from("!H", packet, 2)[0] + 1) * 4
    if length > len(packet):
        raise ValueError("length field beyond the packet")
    base, count, word = struct.unpack_from("!HHI", packet, 12)
    reference, fb_count = word >> 8, word & 0xFF
    pos = 20
    symbols: list[int] = []
    while len(symbols) < count:
        if pos + 2 > length:
            raise ValueError("truncated status chunks")
        (chunk,) = struct.unpack_from("!H", packet, pos)
        pos += 2
        if not chunk & 0x8000:
            symbols += [(chunk >> 13) & 0x3] * (chunk & 0x1FFF)
        elif not chunk & 0x4000:
            symbols += [(chunk >> (13 - k)) & 0x1 for k in range(14)]
        else:
            symbols += [(chunk >> (12 - 2 * k)) & 0x3 for k in range(7)]
    symbols = symbols[:count]
    times: list[int | None] = []
    now = reference * REFERENCE_UNIT_US
    for symbol in symbols:
        if symbol == NOT_RECEIVED:
            times.append(None)
            continue
        if symbol == SMALL_DELTA:
            if pos + 1 > length:
                raise ValueError("truncated deltas")
            ticks = packet[pos]
            pos += 1
        else:
            if pos + 2 > length:
                raise ValueError("truncated deltas")
            (ticks,) = struct.unpack_from("!h", packet, pos)
            pos += 2
        now += ticks * DELTA_UNIT_US
        times.append(now)
    return base, times, reference, fb_count
