"""Loss on the publisher's hop, found by the SFU itself and NACKed to the publisher.

Without this, a packet lost between publisher and SFU was asked for only after a subscriber
NACKed it and the producer's ring missed it: a round trip later, once per subscriber that
asked, and never for a track whose subscribers do not NACK (aiortc never NACKs audio; see
docs/performance.md, "Loss"). The SFU is the publisher's receiver, so it asks itself, at the
first packet after a gap, and again while the repair does not come.

Every track gets this, whether or not the publisher negotiated nack for the codec: a sender
that keeps no history for it ignores the request (libwebrtc keeps none for Opus unless nack
was negotiated), while aiortc, which never offers nack for Opus, resends audio from its send
history all the same. The cost of a request that is ignored is one small RTCP packet per gap
and retry.

Runs per packet: the common case (next in order, nothing missing) is two comparisons, and
while packets are missing the list is walked only when a request is due, never per packet.
"""

from __future__ import annotations

from itertools import islice
from typing import Final

# More packets missing at once than this is a sender restart or an outage, not loss a resend
# could repair in time: forget them rather than ask for hundreds.
MAX_GAP: Final = 128
# At most this many numbers are tracked at once, the oldest dropped first: a publisher sending
# nothing but jumps cannot grow the table, nor one NACK past about 1 KB.
MAX_MISSING: Final = 256
# How often one packet is asked for, and for how long: past NACK_MAX_AGE (the down-tracks'
# limit too) no jitter buffer would still use it.
MAX_TRIES: Final = 3
NACK_MAX_AGE: Final = 1.0
# Until a round trip to the publisher has been measured, and never less: resend requests no
# sooner than this after the last one.
INITIAL_RTT: Final = 0.1
MIN_RETRY: Final = 0.02


class NackGenerator:
    """The publisher's sequence numbers as they arrive: which are missing, and when to ask."""

    __slots__ = ("highest", "missing", "next_due", "rtt")

    def __init__(self) -> None:
        self.highest = -1
        # seq -> [first noticed, last asked, times asked]
        self.missing: dict[int, list[float]] = {}
        # The earliest time an entry needs a request or expires; nothing to do before it.
        self.next_due = 0.0
        # Smoothed from repairs that answered a single request (Karn's rule: after a retry,
        # which request a repair answers is unknown).
        self.rtt = INITIAL_RTT

    def reset(self) -> None:
        """The publisher's stream restarted (new SSRC): its old numbers mean nothing."""
        self.highest = -1
        self.missing.clear()

    def on_packet(self, seq: int, now: float) -> list[int] | None:
        """Note an arriving packet (original or repair); return what to NACK now, if any."""
        highest = self.highest
        diff = (seq - highest) & 0xFFFF
        missing = self.missing
        if diff == 1 and not missing:
            self.highest = seq
            return None
        if highest < 0:
            self.highest = seq
            return None
        if 0 < diff < 0x8000:
            self.highest = seq
            if diff > MAX_GAP:
                missing.clear()
                return None
            if diff > 1:
                for step in range(1, diff):
                    missing[(highest + step) & 0xFFFF] = [now, 0.0, 0.0]
                excess = len(missing) - MAX_MISSING
                if excess > 0:
                    for old in list(islice(missing, excess)):
                        del missing[old]
                self.next_due = now
        elif diff:
            entry = missing.pop(seq, None)
            if entry is not None and entry[2] == 1.0:
                sample = now - entry[1]
                self.rtt = 0.875 * self.rtt + 0.125 * sample
        if not missing or now < self.next_due:
            return None
        return self._due(now)

    def _due(self, now: float) -> list[int] | None:
        retry = max(MIN_RETRY, 1.5 * self.rtt)
        due: list[int] = []
        expired: list[int] = []
        next_due = now + NACK_MAX_AGE
        for seq, entry in self.missing.items():
            tries = entry[2]
            if now - entry[0] > NACK_MAX_AGE:
                expired.append(seq)
                continue
            if not tries or now - entry[1] >= retry:
                if tries >= MAX_TRIES:
                    expired.append(seq)  # the last request had its round trip
                    continue
                entry[1] = now
                entry[2] = tries + 1
                due.append(seq)
            next_due = min(next_due, entry[1] + retry, entry[0] + NACK_MAX_AGE)
        for seq in expired:
            del self.missing[seq]
        self.next_due = next_due
        return due or None

    def tracking(self, seq: int) -> bool:
        """Whether `seq` is missing and still being asked for (so others need not ask)."""
        return seq in self.missing
