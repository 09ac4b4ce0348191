"""Transport-wide congestion control feedback for publishers
(draft-holmer-rmcat-transport-wide-cc-extensions-01).

A publisher stamps every packet on its transport with a transport-wide sequence number (an
RTP header extension). The SFU records when each number arrived and, every 50 ms, reports the
arrivals back in RTCP RTPFB FMT 15 packets; the publisher's own estimator (GCC in browsers)
turns them into a send rate. Without this feedback Chrome never leaves its start rate
(300 kbit/s). The numbers describe the publisher's hop only and are never forwarded.

`TwccRecorder.record` runs per packet: it writes one float into a preallocated array and
touches no other object. Encoding runs on the 50 ms media timer, where allocation is fine.
`parse_transport_feedback` decodes the packets again, for tests and for the per-subscriber
estimator.

The other direction: toward subscribers the SFU is the sender. `SendLog` stamps the SFU's own
transport-wide numbers into the 2-byte slot a copy carries (the publisher's element, renamed
to the subscriber's id) and remembers when and how big each stamped packet was; the native
core's `Peer` implements the same interface for the packets it sends itself.
`FeedbackMatcher` pairs a subscriber's feedback with that log for the estimator
(sfu/media/bwe.py).
"""

from __future__ import annotations

import struct
from array import array
from typing import Final, NamedTuple, Protocol

# Arrivals kept: one slot per transport-wide sequence number, the newest SLOTS numbers. At a
# 50 ms feedback period that is room for 80k packets/s; beyond it the oldest unreported
# numbers are skipped rather than kept.
SLOTS: Final = 4096
MASK: Final = SLOTS - 1
# Statuses per feedback packet, so that one stays below a 1200-byte MTU whatever the pattern:
# 20 bytes of header, at most 2 bytes of chunk per 7 statuses and 2 bytes of delta each
# (20 + 116 + 800 = 936, plus at most 3 bytes of padding).
MAX_STATUSES: Final = 400
# A packet arriving after feedback has called it lost is reported again (received) when it is
# at most this far behind the next unreported number; later than that no estimator cares.
LATE_LIMIT: Final = MAX_STATUSES
# Two feedback rounds are at least this far apart, whoever calls (the engine's timer ticks
# every 50 ms; this keeps a faster caller from flooding the publisher).
MIN_INTERVAL: Final = 0.025

DELTA_UNIT_US: Final = 250
REFERENCE_UNIT_US: Final = 64_000
_NOT_SEEN: Final = -1.0  # arrival slot of a number not received (or not ours any more)

# Packet status symbols (§3.1.1).
NOT_RECEIVED: Final = 0
SMALL_DELTA: Final = 1
LARGE_DELTA: Final = 2
RECEIVED_NO_DELTA: Final = 3  # never sent by the SFU; decoded for completeness

PT_RTPFB: Final = 205
FMT_TWCC: Final = 15

_HEADER = struct.Struct("!BBHIIHHI")  # V|P|FMT, PT, length, sender, media, base, count, ref|fb
_U16 = struct.Struct("!H")
_I16 = struct.Struct("!h")


class TwccRecorder:
    """Arrival times by transport-wide sequence number, for one publisher transport.

    Sequence numbers are unwrapped to ints around the highest one seen, so 65535 -> 0 just
    counts on. `_base` is the first number the next feedback reports; reported arrivals stay
    in their slots until the ring comes round, so a late packet can be reported again.
    """

    __slots__ = (
        "_arrivals",
        "_base",
        "_first",
        "_highest",
        "_last_built",
        "_packet_count",
        "_reference",
        "packets_recorded",
    )

    def __init__(self) -> None:
        # Seconds on the caller's monotonic clock: storing the float it already has is the
        # cheapest per-packet write (no conversion, no int object).
        self._arrivals = array("d", [_NOT_SEEN]) * SLOTS
        self._first = -1  # first number recorded since the last restart (-1: none yet)
        self._base = 0
        self._highest = -1
        self._packet_count = 0  # the 8-bit "fb pkt. count" of the next feedback
        self._reference = 0  # last reference time sent, for a packet of losses only
        self._last_built = -1e9
        self.packets_recorded = 0

    @property
    def pending(self) -> bool:
        """Something was recorded that no feedback has reported yet."""
        return self._first >= 0 and self._highest >= self._base

    def record(self, seq: int, arrival: float) -> None:
        """Packet `seq` (16 bits) arrived at `arrival` (seconds, monotonic). Duplicates keep
        the first arrival."""
        highest = self._highest
        if self._first < 0:
            self._restart(seq, arrival)
            return
        diff = (seq - highest) & 0xFFFF
        arrivals = self._arrivals
        if diff < 0x8000:
            if diff == 0:
                return  # a duplicate of the newest
            if diff >= SLOTS:
                # Further ahead than the ring reaches: the sender restarted its numbering (or
                # lost thousands of packets); start over from here.
                self._restart(seq, arrival)
                return
            unwrapped = highest + diff
            # Slots passed over now belong to numbers not received (yet). Usually none.
            skipped = highest + 1
            while skipped < unwrapped:
                arrivals[skipped & MASK] = _NOT_SEEN
                skipped += 1
            arrivals[unwrapped & MASK] = arrival
            self._highest = unwrapped
            if unwrapped - self._base >= SLOTS:
                self._base = unwrapped - SLOTS + 1  # the oldest unreported were overwritten
        else:
            back = 0x10000 - diff
            if back >= SLOTS:
                self._restart(seq, arrival)
                return
            unwrapped = highest - back
            if unwrapped < self._first:
                return  # from before recording started: no slot history to report it with
            slot = unwrapped & MASK
            if arrivals[slot] >= 0.0:
                return  # a duplicate
            base = self._base
            if unwrapped < base:
                if base - unwrapped > LATE_LIMIT:
                    return
                # Reported lost already: the next feedback starts here and says received
                # (the numbers after it again, from their kept arrivals), as libwebrtc's own
                # receiver does; a loss-based estimator must not count it.
                self._base = unwrapped
            arrivals[slot] = arrival
        self.packets_recorded += 1

    def _restart(self, seq: int, arrival: float) -> None:
        # Cold path: anything not yet reported is dropped with the old numbering.
        self._arrivals = array("d", [_NOT_SEEN]) * SLOTS
        self._arrivals[seq & MASK] = arrival
        self._first = self._base = self._highest = seq
        self.packets_recorded += 1

    def build_feedback(self, sender_ssrc: int, media_ssrc: int, now: float) -> list[bytes] | None:
        """RTPFB FMT 15 packets for everything recorded since the last call, or None when
        there is nothing new (or the last round was under MIN_INTERVAL ago)."""
        if not self.pending or now - self._last_built < MIN_INTERVAL:
            return None
        self._last_built = now
        packets: list[bytes] = []
        seq, end = self._base, self._highest
        while seq <= end:
            packet, seq = self._encode(sender_ssrc, media_ssrc, seq, end)
            packets.append(packet)
        self._base = end + 1
        return packets

    def _encode(self, sender_ssrc: int, media_ssrc: int, first: int, end: int) -> tuple[bytes, int]:
        """One feedback packet from `first` on: (packet, first number it did not cover)."""
        arrivals = self._arrivals
        symbols: list[int] = []
        deltas = bytearray()
        reference = -1
        previous = 0  # µs: the reported (quantised) time of the last received packet
        seq = first
        last = min(end, first + MAX_STATUSES - 1)
        while seq <= last:
            arrival = arrivals[seq & MASK]
            if arrival < 0.0:
                symbols.append(NOT_RECEIVED)
                seq += 1
                continue
            at = round(arrival * 1_000_000)
            if reference < 0:
                # The reference time is the first arrival rounded down to 64 ms; its own
                # delta (< 64 ms) is then always a small one.
                reference = at // REFERENCE_UNIT_US
                previous = reference * REFERENCE_UNIT_US
            # Rounded down, and chained from the previous *reported* time, so quantisation
            # never accumulates into drift. Reordering gives negative deltas (large form).
            ticks = (at - previous) // DELTA_UNIT_US
            if 0 <= ticks <= 0xFF:
                symbols.append(SMALL_DELTA)
                deltas.append(ticks)
            elif -0x8000 <= ticks <= 0x7FFF:
                symbols.append(LARGE_DELTA)
                deltas += _I16.pack(ticks)
            else:
                break  # over ±8 s: the next packet starts here with its own reference time
            previous += ticks * DELTA_UNIT_US
            seq += 1
        if reference < 0:
            # Only losses in this stretch: no arrival to anchor, so repeat the last reference
            # (a publisher reads reference times as a sequence; it must not jump back).
            reference = self._reference
        self._reference = reference
        body = encode_chunks(symbols) + deltas
        padding = -len(body) % 4
        if padding:
            # RFC 3550 §6.4.1 padding: P bit set, the last byte counts the padding bytes.
            body += bytes(padding - 1) + bytes((padding,))
        header = _HEADER.pack(
            (0xA0 if padding else 0x80) | FMT_TWCC,
            PT_RTPFB,
            (20 + len(body)) // 4 - 1,
            sender_ssrc,
            media_ssrc,
            first & 0xFFFF,
            len(symbols),
            ((reference & 0xFFFFFF) << 8) | self._packet_count,
        )
        self._packet_count = (self._packet_count + 1) & 0xFF
        return header + body, seq


def encode_chunks(symbols: list[int]) -> bytes:
    """Packet status chunks (§3.1.3, §3.1.4): a run-length chunk for a run of 14 or more (or
    one that ends the list), else a status vector — 14 one-bit symbols when none needs a
    large delta, 7 two-bit ones otherwise. A vector past the end is filled with "not
    received"; the receiver stops at the packet status count."""
    out = bytearray()
    i, n = 0, len(symbols)
    while i < n:
        symbol = symbols[i]
        run = 1
        while i + run < n and symbols[i + run] == symbol and run < 0x1FFF:
            run += 1
        if run >= 14 or i + run == n:
            out += _U16.pack((symbol << 13) | run)
            i += run
            continue
        window = symbols[i : i + 14]
        if max(window) <= SMALL_DELTA:
            value = 0x8000
            for k, s in enumerate(window):
                value |= s << (13 - k)
            i += 14
        else:
            value = 0xC000
            for k, s in enumerate(symbols[i : i + 7]):
                value |= s << (12 - 2 * k)
            i += 7
        out += _U16.pack(value)
    return bytes(out)


class TransportFeedback(NamedTuple):
    """A decoded RTPFB FMT 15 packet. `symbols` has one status per number from `base_seq`
    on; `deltas` one receive delta in 250 µs units per symbol 1 or 2, in order."""

    sender_ssrc: int
    media_ssrc: int
    base_seq: int
    reference_time: int  # 64 ms units, 24 bits
    fb_count: int
    symbols: list[int]
    deltas: list[int]

    def arrivals_us(self) -> list[int | None]:
        """Arrival time per number (µs on the reference clock), None if not received or
        received without a delta."""
        out: list[int | None] = []
        now = self.reference_time * REFERENCE_UNIT_US
        it = iter(self.deltas)
        for symbol in self.symbols:
            if symbol in (SMALL_DELTA, LARGE_DELTA):
                now += next(it) * DELTA_UNIT_US
                out.append(now)
            else:
                out.append(None)
        return out


def parse_transport_feedback(packet: bytes, start: int = 0) -> TransportFeedback | None:
    """Decode one RTPFB FMT 15 packet beginning at `start` (it may be followed by more of a
    compound); None when it is not one or is malformed. Never raises."""
    if start < 0 or len(packet) - start < 20:
        return None
    first, pt, words, sender, media, base, count, word = _HEADER.unpack_from(packet, start)
    if first >> 6 != 2 or first & 0x1F != FMT_TWCC or pt != PT_RTPFB:
        return None
    end = start + (words + 1) * 4
    if end > len(packet):
        return None
    if first & 0x20:
        pad = packet[end - 1]
        if pad == 0 or pad > end - start - 20:
            return None
        end -= pad
    if end < start + 20:
        # The length field ends the packet before its own fixed fields, which would then be
        # read from whatever follows it in the compound.
        return None
    pos = start + 20
    symbols: list[int] = []
    while len(symbols) < count:
        if pos + 2 > end:
            return None
        chunk = packet[pos] << 8 | packet[pos + 1]
        pos += 2
        if not chunk & 0x8000:
            run = chunk & 0x1FFF
            if run == 0:
                return None
            symbols += [(chunk >> 13) & 0x3] * run
        elif not chunk & 0x4000:
            symbols += [(chunk >> (13 - k)) & 0x1 for k in range(14)]
        else:
            symbols += [(chunk >> (12 - 2 * k)) & 0x3 for k in range(7)]
    del symbols[count:]
    deltas: list[int] = []
    for symbol in symbols:
        if symbol == SMALL_DELTA:
            if pos + 1 > end:
                return None
            deltas.append(packet[pos])
            pos += 1
        elif symbol == LARGE_DELTA:
            if pos + 2 > end:
                return None
            deltas.append(_I16.unpack_from(packet, pos)[0])
            pos += 2
    return TransportFeedback(sender, media, base, word >> 8, word & 0xFF, symbols, deltas)


# ---------------------------------------------------------------------------------------------
# Toward subscribers: the SFU's own numbers, and what became of them.

# Stamped packets remembered per subscriber transport: the newest LOG_SLOTS. Feedback comes
# within a few hundred ms, and a resend (at most 1 s after its packet arrived, downtrack.py's
# NACK_MAX_AGE) must find its first number here: both hold below 8192 packets/s toward one
# subscriber (about 80 Mbit/s of full-size packets).
LOG_SLOTS: Final = 8192
LOG_MASK: Final = LOG_SLOTS - 1


class TransportSeqLog(Protocol):
    """A subscriber transport's transport-wide counter and send log: `SendLog` on the Python
    path, the native core's `Peer` when it forwards (one counter for both paths)."""

    @property
    def twcc_ext_id(self) -> int: ...

    @property
    def twcc_stamped(self) -> int: ...

    def enable_twcc(self, ext_id: int) -> None: ...

    def stamp(self, packet: bytearray, now: float, newer: bool) -> int: ...

    def sent(self, base_seq: int, count: int) -> list[tuple[float, int] | None]: ...


def transport_seq_slot(packet: bytes | bytearray, ext_id: int) -> int:
    """Where the 2-byte value of the first element with `ext_id` starts, or -1 (no such
    element, another length, or a block that does not parse that far). The native core's
    `twcc_slot` reads a packet exactly the same way; both must agree byte for byte."""
    size = len(packet)
    if size < 12 or not packet[0] & 0x10:
        return -1
    pos = 12 + 4 * (packet[0] & 0x0F)
    if pos + 4 > size:
        return -1
    profile = packet[pos] << 8 | packet[pos + 1]
    end = pos + 4 + 4 * (packet[pos + 2] << 8 | packet[pos + 3])
    if end > size:
        return -1
    pos += 4
    if profile == 0xBEDE:
        while pos < end:
            b = packet[pos]
            if b == 0:
                pos += 1
                continue
            found = b >> 4
            if found == 0 or found == 15:
                return -1
            length = (b & 0x0F) + 1
            if pos + 1 + length > end:
                return -1
            if found == ext_id:
                return pos + 1 if length == 2 else -1
            pos += 1 + length
    elif profile & 0xFFF0 == 0x1000:
        while pos < end:
            found = packet[pos]
            if found == 0:
                pos += 1
                continue
            if pos + 2 > end:
                return -1
            length = packet[pos + 1]
            if pos + 2 + length > end:
                return -1
            if found == ext_id:
                return pos + 2 if length == 2 else -1
            pos += 2 + length
    return -1


class SendLog:
    """The Python path's transport-wide counter for one subscriber transport, and the send
    time and size of each number it handed out (a ring of LOG_SLOTS, allocated when
    transport-cc is enabled).

    A packet that is not newer than what its stream last sent (a resend, or a duplicate of
    one sent already) gets the number it first went out with, when the log still has it:
    the bytes must stay identical, or one SRTP index would be protected over two different
    headers, which AES-GCM must never see (the header is its associated data).
    """

    __slots__ = ("_at", "_key", "_size", "twcc_ext_id", "twcc_stamped")

    def __init__(self) -> None:
        self.twcc_ext_id = 0
        # Numbers handed out so far; the next one is this modulo 2**16.
        self.twcc_stamped = 0
        self._at = array("d")
        self._size = array("H")
        self._key = array("q")  # SSRC << 16 | RTP sequence number; -1 for an unused slot

    def enable_twcc(self, ext_id: int) -> None:
        if not 0 < ext_id < 256:
            raise ValueError(f"extension id {ext_id} is outside 1-255")
        self.twcc_ext_id = ext_id
        if not self._at:
            self._at = array("d", [0.0]) * LOG_SLOTS
            self._size = array("H", [0]) * LOG_SLOTS
            self._key = array("q", [-1]) * LOG_SLOTS

    def stamp(self, packet: bytearray, now: float, newer: bool) -> int:
        """Write the next number (or, for a packet that is not `newer`, the one it went out
        with before) into the packet's transport-cc slot; the number, or -1 without a slot."""
        ext_id = self.twcc_ext_id
        at = transport_seq_slot(packet, ext_id) if ext_id else -1
        if at < 0:
            return -1
        key = (packet[8] << 40 | packet[9] << 32 | packet[10] << 24 | packet[11] << 16) | (
            packet[2] << 8 | packet[3]
        )
        number = -1 if newer else self._find(key)
        if number < 0:
            stamped = self.twcc_stamped
            slot = stamped & LOG_MASK
            self._at[slot] = now
            self._size[slot] = min(len(packet), 0xFFFF)
            self._key[slot] = key
            self.twcc_stamped = stamped + 1
            number = stamped & 0xFFFF
        packet[at] = number >> 8
        packet[at + 1] = number & 0xFF
        return number

    def _find(self, key: int) -> int:
        # A key is logged at most once while it is in the ring (a repeat reuses its entry).
        try:
            slot = self._key.index(key)
        except ValueError:
            return -1
        newest = self.twcc_stamped - 1
        return (newest - ((newest - slot) & LOG_MASK)) & 0xFFFF

    def sent(self, base_seq: int, count: int) -> list[tuple[float, int] | None]:
        """(send time, size) of numbers base_seq, base_seq + 1, ... (modulo 2**16); None for
        a number not handed out, or no longer in the log."""
        return [
            _logged(self._at, self._size, self.twcc_stamped, (base_seq + i) & 0xFFFF)
            for i in range(count)
        ]


def _logged(at: array[float], size: array[int], stamped: int, seq: int) -> tuple[float, int] | None:
    newest = stamped - 1
    back = (newest - seq) & 0xFFFF
    if back > newest or back >= LOG_SLOTS:
        return None
    slot = (newest - back) & LOG_MASK
    return at[slot], size[slot]


# (send time, arrival time on the subscriber's clock or None if reported lost, size), seconds
# and bytes, in transport-wide order.
PacketResult = tuple[float, float | None, int]


class FeedbackMatcher:
    """Pairs one subscriber's feedback packets with its send log. Each number is reported
    to the estimator once: a later feedback about it (libwebrtc reports a packet again when
    it arrives after feedback called it lost) is left out, so the loss it first showed
    stays counted, as a loss-based estimator of a sender would see it too. Statuses
    "received without a time" (never sent by libwebrtc) are counted as neither."""

    __slots__ = ("_highest", "lost", "received")

    def __init__(self) -> None:
        self._highest = -1  # newest number reported so far (16 bits), -1 before any
        self.received = 0
        self.lost = 0

    def match(self, feedback: TransportFeedback, log: TransportSeqLog) -> list[PacketResult]:
        count = len(feedback.symbols)
        sent = log.sent(feedback.base_seq, count)
        arrivals = feedback.arrivals_us()
        out: list[PacketResult] = []
        highest = self._highest
        for i in range(count):
            seq = (feedback.base_seq + i) & 0xFFFF
            if highest >= 0 and not 0 < (seq - highest) & 0xFFFF < 0x8000:
                continue  # reported before
            entry = sent[i]
            if entry is None:
                continue  # not ours (a stale or confused report)
            highest = seq
            symbol = feedback.symbols[i]
            arrival = arrivals[i]
            if symbol == NOT_RECEIVED:
                self.lost += 1
                out.append((entry[0], None, entry[1]))
            elif arrival is not None:
                self.received += 1
                out.append((entry[0], arrival / 1_000_000, entry[1]))
        self._highest = highest
        return out
