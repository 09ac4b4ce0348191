"""How one outgoing stream's sequence numbers and timestamps map onto the streams it was cut
from.

A subscriber's copy is one RTP stream whose numbers must only ever move forward by one per
packet: its jitter buffer reads a jump as massive loss, a step back as a stale packet. But the
copy is made of segments of other streams: the publisher's stream before and after an encoder
restart (new SSRC, new numbering), or, with simulcast, one layer and then another. Each time
the copy starts on a new source (always at a keyframe), a segment begins whose offsets make
its first packet follow the last one sent: sequence number +1, timestamp advanced by the time
that passed. Within a segment the offsets are fixed, which is what lets the router's loop (and
the native core) rewrite a packet with two additions.

The map keeps the last few segments so that a NACK for a packet sent before a switch still
finds the packet in the stream it came from, and never a different packet that happens to
carry the same number in the new one.
"""

from __future__ import annotations

from typing import Generic, TypeVar

S = TypeVar("S")

# Segments remembered; NACKs older than a few switches are past any receiver's use.
MAX_SEGMENTS = 8


class Segment(Generic[S]):
    __slots__ = ("first_out", "seq_offset", "source", "ssrc", "ts_offset")

    def __init__(self, first_out: int, source: S, ssrc: int, seq_offset: int, ts_offset: int):
        self.first_out = first_out
        self.source = source
        self.ssrc = ssrc
        self.seq_offset = seq_offset
        self.ts_offset = ts_offset


class SeqMap(Generic[S]):
    """The segments of one outgoing stream, newest last."""

    __slots__ = ("_segments",)

    def __init__(self) -> None:
        self._segments: list[Segment[S]] = []

    def begin(
        self,
        source: S,
        ssrc: int,
        in_seq: int,
        in_ts: int,
        last_out_seq: int,
        last_out_ts: int,
        ts_gap: int,
    ) -> tuple[int, int]:
        """Start a segment at the packet (`in_seq`, `in_ts`) of `source` (whose SSRC is
        `ssrc`), continuing after the last packet sent; `ts_gap` is the time since then in
        clock units (at least 1). Returns the (sequence, timestamp) offsets to add."""
        first_out = (last_out_seq + 1) & 0xFFFF
        seq_offset = (first_out - in_seq) & 0xFFFF
        ts_offset = (last_out_ts + max(1, ts_gap) - in_ts) & 0xFFFFFFFF
        segments = self._segments
        if segments and segments[-1].first_out == first_out:
            segments.pop()  # the last segment never sent a packet: it is replaced
        segments.append(Segment(first_out, source, ssrc, seq_offset, ts_offset))
        if len(segments) > MAX_SEGMENTS:
            del segments[0]
        return seq_offset, ts_offset

    def lookup(self, out_seq: int) -> Segment[S] | None:
        """The segment that sent `out_seq`: the newest one starting at or before it (within
        half the sequence space). None before the first segment."""
        for segment in reversed(self._segments):
            if (out_seq - segment.first_out) & 0xFFFF < 0x8000:
                return segment
        return None

    @staticmethod
    def source_seq(segment: Segment[S], out_seq: int) -> int:
        return (out_seq - segment.seq_offset) & 0xFFFF

    @property
    def current(self) -> Segment[S] | None:
        return self._segments[-1] if self._segments else None

    def __len__(self) -> int:
        return len(self._segments)
