"""One subscriber's copy of one producer: header rewrite, send, NACK service, sender reports.

Only the RTP header changes: SSRC, sequence number, timestamp, payload type and extension ids
become what this subscriber negotiated. The payload — the client-encrypted frame — is copied
byte for byte. Sequence numbers stay continuous across a publisher restart (`resync`), so a
subscriber's jitter buffer never sees a jump it would treat as massive loss.
"""

from __future__ import annotations

import logging
import secrets
import struct
import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sfu.media.router import Copy
from sfu.media.rtcp import build_bye, build_sr
from sfu.media.rtp import (
    RtpHeader,
    build_rtx,
    parse_header,
    rebuild_extensions,
    remap_extension_ids,
    rewrite_header,
)
from sfu.media.seqmap import SeqMap
from sfu.media.stats import MediaStats

if TYPE_CHECKING:
    from sfu.media.producer import Producer

log = logging.getLogger(__name__)

_PADDING_HEADER = struct.Struct("!BBHII")

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)

# Keyframe requests (PLI/FIR) are budgeted per subscriber, on top of the per-track throttle
# in the producer: a receiver that cannot decrypt asks about 3 times a second forever, and
# every keyframe it gets costs everyone's bitrate. A subscriber that keeps asking right after
# keyframes reached it has its interval doubled, up to this many times the base interval.
DEFAULT_SUBSCRIBER_KEYFRAME_INTERVAL = 2.0
KEYFRAME_BACKOFF_MAX = 4
# Only a subscriber that receives well (reported loss under this) and still asks is backed
# off; one losing packets may really have lost the keyframe and stays at the base interval.
KEYFRAME_BACKOFF_LOSS = 0.1
# Retransmissions (NACK service) are budgeted too, or a subscriber on a slow link NACKs what
# congestion dropped, the resends congest it more, and it ends up sent many times its media:
# - a packet is resent at most once per round trip (RTT from its receiver reports, at least
#   MIN_RTT when none is known yet);
# - resends may add at most RTX_SHARE of the media bytes it was sent, with at most
#   RTX_BURST bytes of credit saved up;
# - a packet older than NACK_MAX_AGE is past any jitter buffer's use and is not resent.
MIN_RTT = 0.05
DEFAULT_RTT = 0.1
RTX_SHARE = 0.5
RTX_LOSS_CUTOFF = 0.5
RTX_BURST = 256 * 1024
RTX_INITIAL_CREDIT = 32 * 1024  # so the first packets of a new copy can be repaired too
NACK_MAX_AGE = 1.0
RESENT_SLOTS = 1024


class JoinTimer:
    """When one subscription asked to join: observed at its first forwarded frame per kind
    (time to first frame) and at its first forwarded packet of any kind (join latency)."""

    __slots__ = ("_joined", "_kinds", "clock", "requested_at")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.requested_at = clock()
        self._joined = False
        self._kinds: set[str] = set()

    def first_frame(self, kind: str, stats: MediaStats) -> None:
        elapsed = self.clock() - self.requested_at
        if not self._joined:
            self._joined = True
            stats.join_latency.observe(elapsed)
        if kind not in self._kinds:
            self._kinds.add(kind)
            histogram = stats.first_frame_latency.get(kind)
            if histogram is not None:
                histogram.observe(elapsed)


class PacketSink(Protocol):
    """What a down-track sends through: its subscriber's transport."""

    @property
    def ready(self) -> bool: ...

    def send_rtp(self, packet: bytes | bytearray) -> None: ...

    def send_rtcp(self, packet: bytes) -> None: ...

    def forget_downtrack(self, downtrack: DownTrack) -> None: ...


def ntp_now(wallclock: float) -> int:
    seconds = wallclock + NTP_EPOCH_OFFSET
    return (int(seconds) << 32) | int((seconds % 1) * (1 << 32))


class DownTrack:
    """One subscriber's copy of one producer. While it waits for a keyframe (or is paused,
    or its transport is not connected yet) its producer hands it each packet; once started,
    its record (`Copy`) sits in the producer's route and the router's loop sends for it."""

    __slots__ = (
        "_counts",
        "_identity_ext",
        "_keyframe_asked_at",
        "_keyframe_base",
        "_keyframe_interval",
        "_keyframe_pending",
        "_paused",
        "_resent_at",
        "_resent_seq",
        "_rtt_measured",
        "_rtx_credit",
        "_rtx_mark",
        "_rtx_seq",
        "active",
        "clock",
        "closed",
        "copy",
        "ext_remap_failures",
        "forward_errors",
        "join",
        "keyframe_requests_suppressed",
        "keyframe_waits",
        "kind",
        "loss",
        "nack_misses",
        "nacks_received",
        "nacks_served",
        "producer",
        "rtt",
        "rtx_payload_type",
        "rtx_sent",
        "rtx_ssrc",
        "seqmap",
        "sink",
        "started",
        "stats",
        "wallclock",
    )

    def __init__(
        self,
        producer: Producer,
        sink: PacketSink,
        *,
        ssrc: int,
        payload_type: int,
        ext_map: list[int],
        rtx_ssrc: int | None = None,
        rtx_payload_type: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        stats: MediaStats | None = None,
        join: JoinTimer | None = None,
        keyframe_interval: float = DEFAULT_SUBSCRIBER_KEYFRAME_INTERVAL,
    ) -> None:
        self.producer = producer
        self.sink = sink
        self.kind = producer.kind
        self.rtx_ssrc = rtx_ssrc if rtx_payload_type is not None else None
        self.rtx_payload_type = rtx_payload_type
        self.clock = clock
        self.wallclock = wallclock
        self.started = False
        # In the producer's route (the router sends for it) rather than handed each packet.
        self.active = False
        self.closed = False
        # Held by signaling until the subscriber has the SSRC (renegotiated sections).
        self._paused = False
        # Random starts (RFC 3550 §5.1) keep sequence numbers and timestamps unpredictable.
        self.copy: Copy = producer.router.new_copy(
            sink,
            ssrc=ssrc,
            payload_type=payload_type,
            ext_map=ext_map,
            identity_ext=_is_identity(ext_map, producer.ext_ids),
            last_seq=secrets.randbelow(1 << 15),
            last_ts=secrets.randbelow(1 << 31),
        )
        self.copy.owner = self
        # Which source stream each stretch of our numbering came from (for NACKs).
        self.seqmap: SeqMap[Producer] = SeqMap()
        self._rtx_seq = secrets.randbelow(1 << 15)
        self.nacks_received = 0
        self.nacks_served = 0
        self.nack_misses = 0
        self.rtx_sent = 0
        self.keyframe_waits = 0
        self.keyframe_requests_suppressed = 0
        self._keyframe_base = keyframe_interval
        self._keyframe_interval = keyframe_interval
        self._keyframe_asked_at: float | None = None
        self._keyframe_pending = False
        self.rtt = DEFAULT_RTT
        self._rtt_measured = False
        self.loss = 0.0  # fraction lost in the subscriber's last receiver report
        self._rtx_credit = float(RTX_INITIAL_CREDIT)
        self._rtx_mark = 0
        # Allocated at the first NACK: most copies never see one.
        self._resent_seq: array[int] | None = None
        self._resent_at: array[float] = array("d")
        self.ext_remap_failures = 0
        self.forward_errors = 0
        self.stats = stats if stats is not None else MediaStats()
        self._counts = self.stats.by_kind.setdefault(self.kind, [0, 0, 0, 0])
        self.join = join

    # -- the record's fields, under the names the rest of the SFU uses -----------------------

    @property
    def ssrc(self) -> int:
        return self.copy.ssrc

    @property
    def payload_type(self) -> int:
        return self.copy.payload_type

    @property
    def last_out_seq(self) -> int:
        return self.copy.last_seq

    @property
    def last_out_ts(self) -> int:
        return self.copy.last_ts

    @property
    def packets_sent(self) -> int:
        return self.copy.packets

    @property
    def octets_sent(self) -> int:
        return self.copy.payload_octets

    @property
    def _seq_offset(self) -> int:
        return self.copy.seq_offset

    @property
    def _ts_offset(self) -> int:
        return self.copy.ts_offset

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value
        if value and self.active:
            self._deactivate()
        for producer in self.sources():
            producer.refresh_attention()

    def sources(self) -> tuple[Producer, ...]:
        """The producers that hand this copy packets (a simulcast copy: two while it
        switches layers)."""
        return (self.producer,)

    # -- per packet (until started; then the router sends) -----------------------------------

    def forward(
        self, data: bytes, hdr: RtpHeader, keyframe: bool, source: Producer | None = None
    ) -> None:
        """A packet of the producer (`source`) while this copy is not in its route."""
        sink = self.sink
        if self.closed or self._paused or not sink.ready:
            return
        if not self.started:
            if keyframe:
                self._start(hdr)
            elif self._start_from_cache(data):
                return
            else:
                # Video from mid-GOP would only show as decode errors; wait for a keyframe,
                # which the producer asks for (throttled) so the wait is short.
                self.keyframe_waits += 1
                self.producer.request_keyframe()
                return
        if keyframe:
            self._keyframe_pending = False
        self._activate()
        self._send(data, hdr)

    def _send(self, data: bytes, hdr: RtpHeader) -> None:
        now = self.producer.last_packet_at
        if not self.producer.router.send_one(self.copy, data, hdr, now, self.kind):
            self.forward_rebuilt(data, hdr, now)

    def _start_from_cache(self, data: bytes) -> bool:
        """Start on the producer's keyframe cache (its packets since the last keyframe,
        ending with `data`), without waiting for a keyframe request's round trip."""
        gop = self.producer.cached_gop()
        if not gop or gop[-1] is not data:
            return False
        first = parse_header(gop[0])
        if first is None:
            return False
        self._start(first)
        self._keyframe_pending = False  # it starts on a keyframe, as if it had asked
        self._activate()
        self.stats.keyframe_cache_hits += 1
        for packet in tuple(gop):
            hdr = parse_header(packet)
            if hdr is not None:
                self._send(packet, hdr)
        return True

    def forward_rebuilt(self, data: bytes, hdr: RtpHeader, now: float) -> None:
        """The router could not rewrite this copy's extension ids in place: rebuild it."""
        copy = self.copy
        seq = (hdr.seq + copy.seq_offset) & 0xFFFF
        ts = (hdr.timestamp + copy.ts_offset) & 0xFFFFFFFF
        packet = self._rewrite(data, hdr, seq, ts)
        if packet is not None:
            self.producer.router.send_built(copy, packet, hdr, now, self.kind)

    def padding_packet(self, size: int, twcc_ext_id: int) -> bytes | None:
        """A padding-only packet of `size` bytes (at most 255 of padding) on this copy's RTX
        stream, with an empty transport-cc element for the transport to number: bytes for a
        bandwidth probe that no decoder ever sees (RFC 4588 section 4 allows them). None
        without an RTX stream, or before the copy started."""
        if self.rtx_payload_type is None or self.rtx_ssrc is None or not self.started:
            return None
        size = min(max(size, 1), 255)
        self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
        # V=2, P (padding), X (one-byte extension block with the transport-cc element).
        header = _PADDING_HEADER.pack(
            0xB0, self.rtx_payload_type, self._rtx_seq, self.copy.last_ts, self.rtx_ssrc
        )
        block = bytes([0xBE, 0xDE, 0x00, 0x01, twcc_ext_id << 4 | 1, 0, 0, 0])
        return header + block + bytes(size - 1) + bytes([size])

    def keyframe_forwarded(self) -> None:
        self._keyframe_pending = False

    def copy_failed(self) -> None:
        """`forward` raised for this copy (called inside the producer's `except`): count it,
        and log the traceback once per down-track, since the next packet will fail the same
        way and a log line per packet would drown everything else."""
        self.forward_errors += 1
        self.stats.forward_errors += 1
        if self.forward_errors == 1:
            log.exception(
                "media: cannot build the copy for subscriber SSRC %d (PT %d); its packets are "
                "skipped and counted in sfu_forward_errors_total, other subscribers unaffected",
                self.ssrc,
                self.payload_type,
            )

    def _rewrite(self, data: bytes, hdr: RtpHeader, seq: int, ts: int) -> bytearray | None:
        copy = self.copy
        buf = bytearray(data)
        rewrite_header(buf, copy.ssrc, seq, ts, copy.payload_type)
        if hdr.has_extension and not remap_extension_ids(buf, hdr, copy.ext_map):
            # The subscriber's ids don't fit the one-byte form in place: rebuild (rare).
            rebuilt = rebuild_extensions(data, hdr, copy.ext_map, two_byte=True)
            if rebuilt is None:
                self.ext_remap_failures += 1
                return None
            rewrite_header(rebuilt, copy.ssrc, seq, ts, copy.payload_type)
            return rebuilt
        return buf

    def _start(self, hdr: RtpHeader) -> None:
        """Map the producer's numbering onto ours so that our stream continues seamlessly."""
        copy = self.copy
        if self.join is not None and not self.started and copy.packets == 0:
            self.join.first_frame(self.kind, self.stats)
        self.started = True
        elapsed = 0.0 if copy.last_at == 0.0 else self.clock() - copy.last_at
        gap = int(elapsed * self.producer.codec.clock_rate)
        copy.seq_offset, copy.ts_offset = self.seqmap.begin(
            self.producer, hdr.ssrc, hdr.seq, hdr.timestamp, copy.last_seq, copy.last_ts, gap
        )

    def _activate(self) -> None:
        """Started and sendable: from now on the router's loop sends this copy."""
        if self.active or self.closed:
            return
        self.active = True
        producer = self.producer
        if self in producer.waiting:
            producer.waiting.remove(self)
        producer.route.add(self.copy)
        producer.refresh_attention()

    def _deactivate(self) -> None:
        """Back to being handed packets by the producer (paused, or re-basing on a restart)."""
        producer = self.producer
        if self.active:
            self.active = False
            producer.route.remove(self.copy)
        if not self.closed and self not in producer.waiting:
            producer.waiting.append(self)

    def restrict_extensions(self, accepted_ids: set[int]) -> None:
        """Drop extensions the subscriber's answer did not accept (ids are the offered ones)."""
        table = [t if t and t in accepted_ids else 0 for t in self.copy.ext_map]
        self.copy.set_ext_map(table, _is_identity(table, self.producer.ext_ids))

    def disable_rtx(self) -> None:
        self.rtx_payload_type = None
        self.rtx_ssrc = None

    def resync(self) -> None:
        """The producer's source changed: re-base on its next keyframe (audio: next packet)."""
        self.started = False
        self._deactivate()

    # -- feedback from the subscriber --------------------------------------------------------

    def on_nack(self, seqs: tuple[int, ...]) -> list[int]:
        """Resend what the ring still has, within this subscriber's retransmission budget;
        return the producer seqs the ring no longer has (worth asking the publisher for)."""
        self.nacks_received += len(seqs)
        missing: list[int] = []
        if not self.started or self.closed or not self.sink.ready:
            return missing
        now = self.clock()
        sent = self.octets_sent
        # Resends help a subscriber that loses a little; one that loses much is congested,
        # and more resends only deepen it: the share shrinks with its reported loss, to
        # nothing at RTX_LOSS_CUTOFF.
        share = RTX_SHARE * max(0.0, 1.0 - self.loss / RTX_LOSS_CUTOFF)
        credit = min(self._rtx_credit + (sent - self._rtx_mark) * share, RTX_BURST)
        self._rtx_mark = sent
        resent_seq = self._resent_seq
        if resent_seq is None:
            resent_seq = self._resent_seq = array("l", [-1]) * RESENT_SLOTS
            self._resent_at = array("d", [0.0]) * RESENT_SLOTS
        resent_at = self._resent_at
        guard = max(self.rtt, MIN_RTT)
        suppressed = self.stats.nacks_suppressed
        seqmap = self.seqmap
        current = seqmap.current
        for out_seq in seqs:
            slot = out_seq % RESENT_SLOTS
            if resent_seq[slot] == out_seq and now - resent_at[slot] < guard:
                suppressed[0] += 1  # the first resend may still be on its way
                continue
            segment = seqmap.lookup(out_seq)
            if segment is None:
                self.nack_misses += 1
                continue
            producer = segment.source
            in_seq = (out_seq - segment.seq_offset) & 0xFFFF
            data = producer.get(in_seq)
            if data is None or int.from_bytes(data[8:12]) != segment.ssrc:
                # Gone from the ring, or a packet of a later stream that reuses the number.
                self.nack_misses += 1
                if segment is current:
                    missing.append(in_seq)  # the publisher may still have it
                continue
            if now - producer.arrived_at(in_seq) > NACK_MAX_AGE:
                suppressed[1] += 1
                continue
            if len(data) > credit:
                suppressed[2] += 1
                continue
            hdr = parse_header(data)
            if hdr is None:
                continue
            ts = (hdr.timestamp + segment.ts_offset) & 0xFFFFFFFF
            packet = self._rewrite(data, hdr, out_seq, ts)
            if packet is None:
                continue
            credit -= len(data)
            resent_seq[slot] = out_seq
            resent_at[slot] = now
            if self.rtx_payload_type is not None and self.rtx_ssrc is not None:
                rewritten = parse_header(packet)
                if rewritten is None:
                    continue
                self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
                self.sink.send_rtp(
                    build_rtx(
                        packet, rewritten, self.rtx_ssrc, self._rtx_seq, self.rtx_payload_type
                    )
                )
                self.rtx_sent += 1
                self.stats.rtx_sent[0] += 1
            else:
                # Byte-identical to the first send, so re-protecting it under the same index
                # reuses no keystream with different plaintext.
                self.sink.send_rtp(packet)
                self._counts[2] += 1
                self._counts[3] += len(packet)
            self.nacks_served += 1
        self._rtx_credit = credit
        return missing

    def on_keyframe_request(self) -> None:
        """A PLI or FIR from the subscriber. Its first goes through; later ones at most one
        per interval, none while a keyframe it asked for has not reached it yet, and the
        interval doubles (up to KEYFRAME_BACKOFF_MAX times) while it keeps asking right
        after keyframes arrived: it cannot use them (a missing E2EE key, or heavy loss)."""
        if self.kind != "video" or self.closed:
            return
        now = self.clock()
        asked = self._keyframe_asked_at
        interval = self._keyframe_interval
        if asked is not None:
            since = now - asked
            if since < interval or (self._keyframe_pending and since < 2 * interval):
                self.keyframe_requests_suppressed += 1
                self.stats.keyframe_requests[2] += 1
                return
        producer = self.producer
        if not producer.request_keyframe() and not producer.keyframe_outstanding:
            # The track's throttle refused, and the keyframe it last asked for has already
            # come (before this copy needed one, e.g. a subscriber still waiting for its
            # E2EE key): nothing is on its way for this copy. Counting this as asked would
            # hold its next request back for up to 2 intervals; its next one goes through
            # as soon as the track's throttle allows.
            return
        if asked is not None:
            since = now - asked
            if since >= 4 * interval:
                self._keyframe_interval = self._keyframe_base  # quiet for long: forgiven
            elif not self._keyframe_pending and self.loss < KEYFRAME_BACKOFF_LOSS:
                self._keyframe_interval = min(
                    interval * 2, self._keyframe_base * KEYFRAME_BACKOFF_MAX
                )
        self._keyframe_asked_at = now
        self._keyframe_pending = True

    def on_report(self, fraction_lost: int, lsr: int, dlsr: int) -> None:
        """A reception report block about this copy (RFC 3550 §6.4.1): the share of packets
        it lost, and the round-trip time, smoothed as TCP does (RFC 6298) so one short sample
        cannot shrink the resend guard below the real round trip."""
        self.loss = fraction_lost / 256
        if lsr == 0:
            return  # no SR of ours reached the subscriber yet
        compact = (ntp_now(self.wallclock()) >> 16) & 0xFFFFFFFF
        sample = ((compact - lsr - dlsr) & 0xFFFFFFFF) / 65536
        if sample < 10.0:
            self.rtt = sample if not self._rtt_measured else 0.875 * self.rtt + 0.125 * sample
            self._rtt_measured = True

    # -- periodic ----------------------------------------------------------------------------

    def sender_report(self) -> bytes | None:
        """An SR in this down-track's own timeline (RFC 3550 §6.4.1), once it has sent."""
        if not self.started or self.packets_sent == 0:
            return None
        elapsed = self.clock() - self.copy.last_at
        # Wraps like any RTP timestamp: a track silent for long enough would overflow 32 bits.
        rtp_ts = (self.last_out_ts + int(elapsed * self.producer.codec.clock_rate)) & 0xFFFFFFFF
        return build_sr(
            self.ssrc, ntp_now(self.wallclock()), rtp_ts, self.packets_sent, self.octets_sent
        )

    # -- teardown ----------------------------------------------------------------------------

    def on_producer_closed(self) -> None:
        """The publisher left: tell the subscriber this stream has ended (RTCP BYE)."""
        if self.closed:
            return
        self.bye()
        self.closed = True
        self.active = False

    def bye(self) -> None:
        """RTCP BYE for this copy's SSRCs, so the subscriber's stack ends the stream now."""
        if self.sink.ready:
            ssrcs = [self.ssrc] + ([self.rtx_ssrc] if self.rtx_ssrc is not None else [])
            self.sink.send_rtcp(build_bye(ssrcs))

    def stop(self) -> None:
        """Signaling ended this subscription: BYE (once), then close."""
        if not self.closed:
            self.bye()
        self.close()

    def close(self) -> None:
        self.closed = True
        self.producer.detach(self)
        self.sink.forget_downtrack(self)
        # The record points back here for the attention path: cut it, so an ended
        # subscription is freed by reference counting, not by the cycle collector.
        self.copy.owner = None


def _is_identity(ext_map: list[int], ext_ids: dict[str, int]) -> bool:
    """Whether every extension the publisher may send keeps its id for this subscriber, so
    the extension block needs no rewrite at all."""
    return all(ext_id < len(ext_map) and ext_map[ext_id] == ext_id for ext_id in ext_ids.values())
