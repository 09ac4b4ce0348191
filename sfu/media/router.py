"""The fan-out owner: each producer's list of ready copies, and the loop that sends a packet
to all of them.

A copy's state the loop reads and writes per packet lives in one compact record (`Copy`):
the subscriber's SSRC, payload type, sequence and timestamp offsets, extension-id map, the
transport it goes out on, and its last-sent position and counters. Everything else a
subscriber needs (waiting for a keyframe, NACK service, sender reports, budgets) stays in
`DownTrack`, which owns its record and only moves it in and out of its producer's `Route`.

Work that is not a plain header rewrite never runs inside the loop: a copy whose extension
block cannot be rewritten in place, a copy that raised, and the sampled payload-integrity
checks come back as an "attention" list handled after it. The native core (`_fastpath`)
implements exactly this loop over the same record layout (docs/architecture.md, "Native
fast path"); this module is the reference and the `rtc.fastpath: off` path.

A record holds one outgoing stream; simulcast (a per-subscriber choice among a producer's
layers) moves a record between the routes of the layers without another shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sfu.media.rtp import (
    RtpHeader,
    parse_header,
    remap_extension_ids,
    rewrite_header,
    rewritten_copy,
)
from sfu.media.stats import MediaStats

if TYPE_CHECKING:
    from sfu.media.downtrack import DownTrack


class CopySink(Protocol):
    """Where a copy goes: its subscriber's transport."""

    @property
    def ready(self) -> bool: ...

    def send_rtp(self, packet: bytes | bytearray) -> None: ...


class Copy:
    """One subscriber's outgoing stream of one producer, as the fan-out loop sees it."""

    __slots__ = (
        "ext_map",
        "identity_ext",
        "last_at",
        "last_seq",
        "last_ts",
        "owner",
        "packets",
        "payload_octets",
        "payload_type",
        "seq_offset",
        "sink",
        "ssrc",
        "ts_offset",
    )

    def __init__(
        self,
        sink: CopySink,
        ssrc: int,
        payload_type: int,
        ext_map: list[int],
        identity_ext: bool,
        last_seq: int,
        last_ts: int,
    ) -> None:
        self.sink = sink
        self.ssrc = ssrc
        self.payload_type = payload_type
        # Publisher extension id -> subscriber id (0: drop); 256 entries.
        self.ext_map = ext_map
        # Every id the publisher may send keeps its value: the block needs no rewrite.
        self.identity_ext = identity_ext
        self.seq_offset = 0
        self.ts_offset = 0
        self.last_seq = last_seq
        self.last_ts = last_ts
        self.last_at = 0.0
        self.packets = 0
        self.payload_octets = 0
        # The DownTrack this record belongs to (for the attention path); cut at close.
        self.owner: DownTrack | None = None

    def set_ext_map(self, ext_map: list[int], identity_ext: bool) -> None:
        self.ext_map = ext_map
        self.identity_ext = identity_ext


class Route:
    """One producer's ready copies. `attention` asks that each of its packets goes through
    the producer's Python code before the fan-out (a subscriber is waiting for a keyframe,
    or a copy needs a rebuild the loop does not do); the native core hands such packets
    back instead of forwarding them itself."""

    __slots__ = ("attention", "copies", "kind", "owner")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        # The Producer (the native core hands it back with each packet); cut at close.
        self.owner: object = None
        self.copies: list[Copy] = []
        self.attention = False

    def add(self, copy: Copy) -> None:
        if copy not in self.copies:
            self.copies.append(copy)

    def remove(self, copy: Copy) -> None:
        if copy in self.copies:
            self.copies.remove(copy)

    def clear(self) -> None:
        self.copies.clear()


# What came back from one fan-out: copies whose extension block the loop could not rewrite
# in place, for the caller to rebuild after the loop.
Attention = list[Copy]


class Router:
    """Owns fan-out for one media engine: the reference implementation in Python."""

    def __init__(self, stats: MediaStats, integrity_sample_every: int = 0) -> None:
        self.stats = stats
        self._counts = stats.by_kind
        # One countdown for all copies: every Nth copy sent has its payload compared.
        self._sample_every = integrity_sample_every
        self._countdown = integrity_sample_every
        # Test-only fault injection: flip the last payload byte of this many next copies.
        self._faults = 0

    # -- records -----------------------------------------------------------------------------

    def new_route(self, kind: str) -> Route:
        return Route(kind)

    def new_copy(
        self,
        sink: CopySink,
        *,
        ssrc: int,
        payload_type: int,
        ext_map: list[int],
        identity_ext: bool,
        last_seq: int,
        last_ts: int,
    ) -> Copy:
        return Copy(sink, ssrc, payload_type, ext_map, identity_ext, last_seq, last_ts)

    # -- the loop ----------------------------------------------------------------------------

    def fan_out(self, route: Route, data: bytes, hdr: RtpHeader, now: float) -> Attention | None:
        """Send `data` (a decrypted packet of the route's producer) to every ready copy."""
        attention: Attention | None = None
        sampled: list[tuple[bytes | bytearray]] | None = None
        counts = self._counts[route.kind]
        plain_ext = hdr.ext_profile < 0
        for copy in route.copies:
            # One copy that cannot be built must never cost the others theirs; a `try` that
            # does not raise is free in CPython 3.11+.
            try:
                seq = (hdr.seq + copy.seq_offset) & 0xFFFF
                ts = (hdr.timestamp + copy.ts_offset) & 0xFFFFFFFF
                packet: bytes | bytearray
                if plain_ext or copy.identity_ext:
                    packet = rewritten_copy(data, copy.ssrc, seq, ts, copy.payload_type)
                else:
                    buf = bytearray(data)
                    rewrite_header(buf, copy.ssrc, seq, ts, copy.payload_type)
                    if not remap_extension_ids(buf, hdr, copy.ext_map):
                        if attention is None:
                            attention = []
                        attention.append(copy)
                        continue
                    packet = buf
                if self._faults:
                    self._faults -= 1
                    packet = bytearray(packet)
                    packet[-1] ^= 0x01
                if self._sample_every:
                    self._countdown -= 1
                    if self._countdown <= 0:
                        self._countdown = self._sample_every
                        if sampled is None:
                            sampled = []
                        sampled.append((packet,))
                copy.sink.send_rtp(packet)
                counts[2] += 1
                counts[3] += len(packet)
                self._advance(copy, seq, ts, hdr.payload_len, now)
            except Exception:
                # Counted and logged (once per down-track) inside the `except`, so the log
                # keeps the traceback; rare by construction.
                owner = copy.owner
                if owner is not None:
                    owner.copy_failed()
        if sampled is not None:
            for (packet,) in sampled:
                self.check_integrity(data, hdr, packet)
        return attention

    def send_one(self, copy: Copy, data: bytes, hdr: RtpHeader, now: float, kind: str) -> bool:
        """The same as the loop for a single copy outside its route (the packet that starts
        it). False when its extension block needs a rebuild."""
        route = Route(kind)
        route.copies.append(copy)
        return not self.fan_out(route, data, hdr, now)

    def send_built(
        self, copy: Copy, packet: bytes | bytearray, hdr: RtpHeader, now: float, kind: str
    ) -> None:
        """Send a copy the caller built itself (an extension rebuild) and account for it."""
        copy.sink.send_rtp(packet)
        counts = self._counts[kind]
        counts[2] += 1
        counts[3] += len(packet)
        seq = packet[2] << 8 | packet[3]
        ts = int.from_bytes(packet[4:8])
        self._advance(copy, seq, ts, hdr.payload_len, now)

    @staticmethod
    def _advance(copy: Copy, seq: int, ts: int, payload_len: int, now: float) -> None:
        # Only moving forward updates the reference; a late reordered packet must not.
        if (seq - copy.last_seq) & 0xFFFF < 0x8000:
            copy.last_seq = seq
            copy.last_ts = ts
            copy.last_at = now
        copy.packets += 1
        copy.payload_octets += payload_len

    def check_integrity(self, data: bytes, hdr: RtpHeader, packet: bytes | bytearray) -> None:
        """Sampled proof for operators that forwarding leaves payload bytes as received:
        the bytes handed to SRTP after the rewrite, against the bytes that came in."""
        out = parse_header(packet)
        same = out is not None and packet[out.header_len :] == data[hdr.header_len :]
        self.stats.integrity[0 if same else 1] += 1

    def inject_payload_fault(self, copies: int) -> None:
        """Test-only: corrupt one payload byte in each of the next `copies` copies, before
        the integrity sample looks at them, to prove that the check catches it."""
        self._faults = copies

    # -- what the native core counts itself -------------------------------------------------

    def take_counters(self) -> dict[str, int]:
        """Fold counters kept outside `stats` into it and return them (the native core's;
        the Python loop counts in `stats` directly)."""
        return {}
