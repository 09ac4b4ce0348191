"""A published track: the packets one publisher sends on one m-section, fanned out as is.

The producer keeps the last N packets (a ring indexed by sequence number) so subscribers'
NACKs are served without asking the publisher, asks the publisher itself for what was lost on
the way in (nackgen.py), knows where keyframes start (from the clear payload-format
descriptor, never from the encrypted frame), and throttles keyframe requests toward the
publisher: a PLI storm makes an encoder raise its QP for everyone (docs/architecture.md,
"Budgets per subscriber").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sfu.media.codecs import KEYFRAME, inspector, vp8_keyframe_size
from sfu.media.envelope import STATE_PLAINTEXT, EnvelopeJudge
from sfu.media.nackgen import NackGenerator
from sfu.media.router import Attention, Router
from sfu.media.rtp import RtpHeader, parse_header, read_audio_level, rtx_to_original
from sfu.media.stats import MediaStats

EXT_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"

if TYPE_CHECKING:
    from sfu.media.downtrack import DownTrack


class Upstream(Protocol):
    """The publisher's transport, as a producer needs it: feedback toward the sender."""

    def send_keyframe_request(self, producer: Producer) -> None: ...

    def send_nack(self, producer: Producer, seqs: list[int]) -> None: ...


DEFAULT_VIDEO_BUFFER = 500
DEFAULT_AUDIO_BUFFER = 200
DEFAULT_KEYFRAME_INTERVAL = 0.5
# The keyframe cache (packets since the last keyframe, so that a new subscriber starts at once
# instead of after a keyframe request's round trip) is dropped rather than grown past this:
# a GOP that long (about 2 s of 3 Mbit/s video) is better started with a fresh keyframe.
KEYFRAME_CACHE_PACKETS = 600
KEYFRAME_CACHE_BYTES = 1 << 20
# Layer bitrates are measured over windows at least this long (seconds).
RATE_WINDOW = 0.5


@dataclass(frozen=True)
class TrackCodec:
    """The single codec a producer was negotiated with (the answer pins one per m-section)."""

    name: str  # as in a=rtpmap, e.g. "VP8", "opus"
    clock_rate: int
    payload_type: int
    rtx_payload_type: int | None = None
    channels: int | None = None
    fmtp: str | None = None

    @property
    def key(self) -> str:
        return self.name.lower()


class Producer:
    """Inbound track of one publisher transport. Everything here runs per packet."""

    __slots__ = (
        "_gop",
        "_gop_bytes",
        "_gop_ts",
        "_inspect",
        "_keyframe_totals",
        "_last_keyframe_request",
        "_level_count",
        "_level_id",
        "_level_sum",
        "_rate_at",
        "_rate_bytes",
        "_ring",
        "_ring_at",
        "_ring_size",
        "_video",
        "bitrate",
        "bitrate_peak",
        "bytes_received",
        "clock",
        "closed",
        "codec",
        "created_at",
        "downtracks",
        "e2ee_required",
        "envelope",
        "ext_ids",
        "group",
        "height",
        "id",
        "keyframe_cache",
        "keyframe_interval",
        "keyframe_outstanding",
        "keyframe_requests_sent",
        "keyframe_requests_throttled",
        "keyframes_seen",
        "kind",
        "last_packet_at",
        "losses",
        "mid",
        "on_policy_violation",
        "packets_received",
        "rid",
        "route",
        "router",
        "rtx_duplicates",
        "rtx_packets_received",
        "rtx_ssrc",
        "ssrc",
        "ssrc_changes",
        "upstream",
        "waiting",
        "width",
    )

    def __init__(
        self,
        producer_id: str,
        kind: str,
        mid: str,
        codec: TrackCodec,
        ext_ids: dict[str, int],
        upstream: Upstream,
        *,
        ssrc: int | None = None,
        rtx_ssrc: int | None = None,
        buffer_size: int | None = None,
        keyframe_interval: float = DEFAULT_KEYFRAME_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        envelope_totals: list[int] | None = None,
        keyframe_totals: list[int] | None = None,
        router: Router | None = None,
        rid: str | None = None,
        keyframe_cache: bool = True,
    ) -> None:
        self.id = producer_id
        # A simulcast layer's RTP stream id (RFC 8852), and the track it is a layer of.
        self.rid = rid
        self.group: object = None
        self.kind = kind
        self.mid = mid
        self.codec = codec
        self.ext_ids = ext_ids
        self.ssrc = ssrc
        self.rtx_ssrc = rtx_ssrc
        self.upstream = upstream
        self.keyframe_interval = keyframe_interval
        self.clock = clock
        size = buffer_size or (DEFAULT_VIDEO_BUFFER if kind == "video" else DEFAULT_AUDIO_BUFFER)
        self._ring_size = size
        self._ring: list[bytes | None] = [None] * size
        # When each stored packet arrived: a NACK for a packet past any use is not served.
        self._ring_at = [0.0] * size
        # Codec knowledge, parsed once per packet (codecs.py).
        self._inspect = inspector(codec.key, kind)
        self._video = kind == "video"
        # Gaps in what the publisher sends, asked for again by the SFU itself (nackgen.py).
        self.losses = NackGenerator()
        self._last_keyframe_request = -1e9
        # A keyframe request went to the publisher and no keyframe has come since.
        self.keyframe_outstanding = False
        # Every subscriber's copy; `route` holds the started ones (the router sends them),
        # `waiting` the others, which are handed each packet here.
        self.router = router if router is not None else Router(MediaStats())
        self.route = self.router.new_route(kind)
        self.route.owner = self
        self.downtracks: list[DownTrack] = []
        self.waiting: list[DownTrack] = []
        self.closed = False
        self.created_at = clock()
        self.last_packet_at = self.created_at
        self._keyframe_totals = keyframe_totals if keyframe_totals is not None else [0, 0]
        self._level_id = ext_ids.get(EXT_AUDIO_LEVEL, 0) if kind == "audio" else 0
        self._level_sum = 0
        self._level_count = 0
        self.envelope = EnvelopeJudge(codec.key, envelope_totals)
        # Set by the control plane for rooms whose policy is `e2ee: required`.
        self.e2ee_required = False
        self.on_policy_violation: Callable[[Producer, str], None] | None = None
        self.packets_received = 0
        self.bytes_received = 0
        self.rtx_packets_received = 0
        self.rtx_duplicates = 0
        self.keyframes_seen = 0
        self.keyframe_requests_sent = 0
        self.keyframe_requests_throttled = 0
        self.ssrc_changes = 0
        # The picture size of the last keyframe, where the codec's clear bytes say (VP8).
        self.width = 0
        self.height = 0
        # Received bits per second over the last RATE_WINDOW (sample_rate()).
        self.bitrate = 0.0
        self.bitrate_peak = 0.0
        self._rate_at: float | None = None  # the first sample starts the first window
        self._rate_bytes = 0
        # Video packets since the last keyframe began (empty: no usable GOP).
        self.keyframe_cache = keyframe_cache and kind == "video"
        self._gop: list[bytes] = []
        self._gop_bytes = 0
        self._gop_ts = -1

    def on_rtp(
        self,
        data: bytes,
        hdr: RtpHeader,
        arrival: float | None = None,
        forwarded: bool = False,
        attention: Attention | None = None,
    ) -> None:
        """A decrypted media packet from the publisher: store it, fan it out untouched.
        `arrival` is the transport's read of the same (monotonic) clock, when it made one;
        `forwarded` says the native core already sent it to every copy in the route, except
        the `attention` ones it left to us."""
        if hdr.ssrc != self.ssrc:
            if self.ssrc is not None:
                # A new sender (e.g. the publisher's encoder restarted): subscribers must not
                # see a sequence jump, so each down-track re-bases its numbering.
                self.ssrc_changes += 1
                for downtrack in self.downtracks:
                    downtrack.resync()
                self.refresh_attention()
                self._ring = [None] * self._ring_size
                self._gop = []
                self.losses.reset()
            self.ssrc = hdr.ssrc
        self.packets_received += 1
        self.bytes_received += len(data)
        now = self.last_packet_at = self.clock() if arrival is None else arrival
        slot = hdr.seq % self._ring_size
        self._ring[slot] = data
        self._ring_at[slot] = now
        flags = self._inspect(data, hdr)
        self.envelope.on_packet(data, hdr, flags)
        if self._level_id:
            level = read_audio_level(data, hdr, self._level_id)
            if level is not None:
                self._level_sum += 127 - level[1]
                self._level_count += 1
        keyframe = flags & KEYFRAME != 0
        if not forwarded:
            attention = self.router.fan_out(self.route, data, hdr, now)
        if attention:
            self.attend(attention, data, hdr, now)
        if self.keyframe_cache:
            self._cache(data, hdr, flags)
        if keyframe and self._video:
            self.keyframes_seen += 1
            self.keyframe_outstanding = False
            if self.codec.key == "vp8":
                size = vp8_keyframe_size(data, hdr, flags)
                if size is not None:
                    self.width, self.height = size
            for downtrack in self.downtracks:
                if downtrack.active:
                    downtrack.keyframe_forwarded()
        if self.waiting:
            for downtrack in tuple(self.waiting):
                try:
                    downtrack.forward(data, hdr, keyframe, self)
                except Exception:
                    downtrack.copy_failed()
        lost = self.losses.on_packet(hdr.seq, now)
        if lost is not None:
            self.upstream.send_nack(self, lost)

    def _cache(self, data: bytes, hdr: RtpHeader, flags: int) -> None:
        gop = self._gop
        if flags & KEYFRAME and hdr.timestamp != self._gop_ts:
            self._gop = [data]
            self._gop_bytes = len(data)
            self._gop_ts = hdr.timestamp
        elif gop:
            if len(gop) >= KEYFRAME_CACHE_PACKETS or self._gop_bytes > KEYFRAME_CACHE_BYTES:
                gop.clear()  # too long a GOP: a new subscriber asks for a fresh keyframe
                self._gop_bytes = 0
            else:
                gop.append(data)
                self._gop_bytes += len(data)

    @property
    def rids(self) -> list[str]:
        return []  # one stream, not simulcast layers

    def layer(self, rid: str | None) -> Producer | None:
        """The stream a packet with this RID belongs to: this one (RIDs name layers of
        simulcast tracks only)."""
        return self

    def cached_gop(self) -> list[bytes]:
        """The packets since the last keyframe began (oldest first), empty when there is no
        complete run: a new copy can start on them without waiting for a keyframe."""
        return self._gop

    def sample_rate(self, now: float) -> float:
        """The received bitrate, re-measured when RATE_WINDOW has passed and averaged with
        the previous value (called by the layer allocator's timer, never per packet)."""
        if self._rate_at is None:
            self._rate_at, self._rate_bytes = now, self.bytes_received
            return self.bitrate
        elapsed = now - self._rate_at
        if elapsed >= RATE_WINDOW:
            measured = (self.bytes_received - self._rate_bytes) * 8 / elapsed
            # Smoothed over windows: one keyframe (or one quiet window) is not the rate.
            self.bitrate = measured if not self.bitrate else 0.5 * (self.bitrate + measured)
            # The recent peak, decaying by a tenth a window (half-life about 3 s): what a
            # move up to this layer must budget for, since a sender that throttled the
            # layer for a moment will send it at full rate again.
            self.bitrate_peak = max(measured, self.bitrate_peak * 0.9)
            self._rate_at = now
            self._rate_bytes = self.bytes_received
        return self.bitrate

    def attend(self, attention: Attention, data: bytes, hdr: RtpHeader, now: float) -> None:
        """Copies the router's loop left to us: rebuild their extension block (the other
        subscribers already have theirs)."""
        for copy in attention:
            downtrack = copy.owner
            if downtrack is None:
                continue
            try:
                downtrack.forward_rebuilt(data, hdr, now)
            except Exception:
                downtrack.copy_failed()

    def attach(self, downtrack: DownTrack) -> None:
        """A new subscriber's copy: handed packets until it starts on a keyframe."""
        self.downtracks.append(downtrack)
        self.waiting.append(downtrack)
        self.refresh_attention()

    def detach(self, downtrack: DownTrack) -> None:
        if downtrack in self.downtracks:
            self.downtracks.remove(downtrack)
        if downtrack in self.waiting:
            self.waiting.remove(downtrack)
        self.route.remove(downtrack.copy)
        downtrack.active = False
        self.refresh_attention()

    def refresh_attention(self) -> None:
        """Whether each packet must reach this object before the fan-out: only while some
        copy can start (connected, not paused) and waits for its first keyframe."""
        self.route.attention = any(
            not d.closed and not d.paused and d.sink.ready for d in self.waiting
        )

    def on_rtx(self, data: bytes, hdr: RtpHeader, arrival: float | None = None) -> None:
        """An RTX retransmission from the publisher (RFC 4588): repair as the original."""
        if self.ssrc is None:
            return
        self.rtx_packets_received += 1
        original = rtx_to_original(data, hdr, self.ssrc, self.codec.payload_type)
        if original is None:
            return  # padding-only probe
        original_hdr = parse_header(original)
        if original_hdr is None:
            return
        if self.get(original_hdr.seq) is not None:
            # A packet already received and forwarded: browsers probe their own bandwidth by
            # resending old packets over RTX ("redundant payloads"), often at several times
            # the media rate. Forwarded again, every subscriber would pay for the
            # publisher's probe.
            self.rtx_duplicates += 1
            return
        self.on_rtp(original, original_hdr, arrival)

    def take_levels(self) -> tuple[int, int]:
        """(sum of loudness, packets) since the last call, for the active-speaker detector."""
        taken = (self._level_sum, self._level_count)
        self._level_sum = self._level_count = 0
        return taken

    def get(self, seq: int) -> bytes | None:
        """A stored packet by its publisher sequence number, if still in the ring."""
        data = self._ring[seq % self._ring_size]
        if data is None or (data[2] << 8 | data[3]) != seq:
            return None
        return data

    def arrived_at(self, seq: int) -> float:
        """When the stored packet `seq` arrived (only meaningful if `get(seq)` has it)."""
        return self._ring_at[seq % self._ring_size]

    def request_keyframe(self) -> bool:
        """Ask the publisher for a keyframe, at most once per `keyframe_interval`."""
        if self.kind != "video" or self.closed:
            return False
        now = self.clock()
        if now - self._last_keyframe_request < self.keyframe_interval:
            self.keyframe_requests_throttled += 1
            self._keyframe_totals[1] += 1
            return False
        self._last_keyframe_request = now
        self.keyframe_outstanding = True
        self.keyframe_requests_sent += 1
        self._keyframe_totals[0] += 1
        self.upstream.send_keyframe_request(self)
        return True

    def request_retransmission(self, seqs: list[int]) -> None:
        """Ask the publisher for packets the ring no longer has (or never got)."""
        if seqs and not self.closed and self.ssrc is not None:
            # What the producer is asking for itself would only be resent twice.
            wanted = [seq for seq in seqs if not self.losses.tracking(seq)]
            if wanted:
                self.upstream.send_nack(self, wanted)

    def check_policy(self, now: float, grace: float) -> None:
        """In an `e2ee: required` room, a track judged plaintext_suspected once the grace
        period is over is reported (and then stopped by the control plane). A track with too
        few frames to judge is left alone: nothing readable can have left through it yet
        that a verdict could have prevented."""
        if not self.e2ee_required or self.closed or now - self.created_at < grace:
            return
        judge = self.envelope
        if judge.state != STATE_PLAINTEXT:
            return
        if self.on_policy_violation is not None:
            self.on_policy_violation(
                self,
                f"{self.kind} track (mid {self.mid}) sent {judge.frames_none} of "
                f"{judge.frames_judged} frames without an SFrame envelope; this room "
                "requires end-to-end encryption",
            )

    def close(self) -> None:
        self.closed = True
        for downtrack in list(self.downtracks):
            downtrack.on_producer_closed()
        self.downtracks.clear()
        self.waiting.clear()
        self.route.clear()
        self.route.attention = False
        self.route.owner = None
        # A subscriber's retired m-section keeps its ended track (for the codec it renders)
        # as long as that subscriber stays: without the packets that is a few hundred
        # bytes, not a ring of up to a few hundred kilobytes per publisher who ever left.
        self._ring = [None]
        self._ring_at = [0.0]
        self._ring_size = 1
        self._gop = []
