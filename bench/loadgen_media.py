"""Synthetic end-to-end-encrypted media for the load generator: senders and receivers.

A publisher sends what an SFrame-encrypting browser would put on the wire, without an encoder
or a key: VP8 at 30 frames/s and about 1 Mbit/s, and Opus at 50 packets/s and 48 kbit/s.

Video packet (RTP payload)::

    first packet of a frame:  VP8 descriptor (S=1) | clear prefix (10 / 3) | SFrame header |
                              mark | random "ciphertext"
    other packets:            VP8 descriptor (S=0) | mark | random "ciphertext"

Audio packet::

    SFrame header | mark | random "ciphertext"

`mark` is 16 bytes: send time (time.monotonic_ns, the same clock in every process of the
machine), frame id and packet id. To the SFU it is ciphertext like the rest; only the
receiving generator reads it, to measure one-way latency through the SFU and loss.

Two receivers: `SubscriberStream` decrypts every packet and reads its mark (exact loss by send
time, latency of every packet); `CountingStream`, for rates where decrypting everything would
make the generator the bottleneck, counts packets off the wire by SSRC and sequence number
from the clear RTP header and decrypts only 1 packet in N, for latency samples. The clear
prefix is what docs/e2ee.md specifies (its first byte carries VP8's inverse keyframe bit, which
the SFU reads to let new subscribers start on a keyframe); the SFrame header is a valid RFC 9605
header from `sfu.client.sframe`.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import struct
import time
from array import array
from collections.abc import Callable

from bench.loadgen_peer import AUDIO_PT, VIDEO_PT, Peer, Ssrcs
from sfu.client.sframe import encode_header

FPS = 30
VIDEO_BITRATE = 1_000_000
# Bytes of one encoded+encrypted frame: ~4.2 KB at 1 Mbit/s and 30 frames/s.
FRAME_BYTES = VIDEO_BITRATE // 8 // FPS
MAX_CHUNK = 1100  # payload bytes per packet: with headers and the SRTP tag under 1200
PACKETS_PER_FRAME = math.ceil(FRAME_BYTES / MAX_CHUNK)
KEYFRAME_EVERY = 2 * FPS  # a keyframe every 2 s, and whenever the SFU sends a PLI
AUDIO_PPS = 50
AUDIO_FRAME_BYTES = 120  # 120 B x 50/s = 48 kbit/s
PACKETS_PER_SECOND = FPS * PACKETS_PER_FRAME + AUDIO_PPS  # per publisher


def video_shape(kbps: int) -> tuple[int, int]:
    """(frame bytes, packets per frame) of 30 frames/s video at `kbps` kbit/s."""
    frame_bytes = kbps * 1000 // 8 // FPS
    return frame_bytes, max(1, math.ceil(frame_bytes / MAX_CHUNK))


def packets_per_second(kbps: int) -> int:
    """What one publisher sends per second with video at `kbps` (audio included)."""
    return FPS * video_shape(kbps)[1] + AUDIO_PPS


# VP8 frame tag (RFC 6386 section 9.1): byte 0 bit 0 is P, 0 on keyframes; bit 4 show_frame.
# A keyframe's prefix adds the start code and a 640x480 size.
VP8_KEY_PREFIX = bytes([0x10, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01])
VP8_DELTA_PREFIX = bytes([0x11, 0x00, 0x00])
VP8_DESC_START = b"\x10"  # S=1, PID=0: starts partition 0 of a frame
VP8_DESC_CONT = b"\x00"

MARK = struct.Struct("!QII")  # send time ns, frame id, packet id
RTP = struct.Struct("!BBHII")
_SSRC = struct.Struct("!I")
_SEQ_SSRC = struct.Struct("!H4xI")  # from byte 2 of an RTP header: sequence number, SSRC
_RTCP_HEAD = struct.Struct("!BBH")

# Random bytes are only filler the SFU cannot read; slicing a pool is far cheaper than urandom.
_POOL = os.urandom(1 << 16)


class Window:
    """The measurement window on the monotonic clock, by *send* time of each packet.

    Counting by the timestamp carried inside the packet makes "sent in the window" and
    "received of those sent in the window" the same packets in every process, without any
    per-packet coordination between publisher and subscriber processes.
    """

    __slots__ = ("end_ns", "start_ns")

    def __init__(self) -> None:
        self.start_ns = 1 << 62  # nothing counts until the window is set
        self.end_ns = 0


class Publisher:
    """One WHIP session: paced VP8-like frames and Opus-like packets, SRTP-protected."""

    def __init__(
        self, index: int, peer: Peer, ssrcs: Ssrcs, window: Window, video_kbps: int = 1000
    ) -> None:
        self.index = index
        self.frame_bytes, self.packets_per_frame = video_shape(video_kbps)
        self.peer = peer
        self.ssrcs = ssrcs
        self.window = window
        self.kid = index + 1
        # SFrame counters must never repeat per key; start past the inline range so the header
        # length stays 1 + 2 bytes for the whole run (any length parses the same way).
        self.ctr = 1 << 8
        self.video_seq = secrets.randbelow(1 << 16)
        self.audio_seq = secrets.randbelow(1 << 16)
        self.video_ts0 = secrets.randbelow(1 << 32)
        self.audio_ts0 = secrets.randbelow(1 << 32)
        self.frame_no = 0
        self.audio_no = 0
        self.packet_id = 0
        self.pool_at = 0
        self.force_keyframe = True
        self.sent_total = 0
        self.sent_video = 0  # in the window
        self.sent_audio = 0
        self.keyframes = 0
        self.plis = 0
        self.nacks = 0
        self.rtcp_failures = 0

    def _filler(self, size: int) -> bytes:
        at = self.pool_at
        if at + size > len(_POOL):
            at = 0
        self.pool_at = at + size + 1
        return _POOL[at : at + size]

    def send_video_frame(self) -> None:
        srtp, send = self.peer.srtp, self.peer.send
        if srtp is None or self.peer.closed:
            return
        frame_no = self.frame_no
        self.frame_no += 1
        keyframe = self.force_keyframe or frame_no % KEYFRAME_EVERY == 0
        if keyframe:
            self.force_keyframe = False
            self.keyframes += 1
        lead = (VP8_KEY_PREFIX if keyframe else VP8_DELTA_PREFIX) + encode_header(
            self.kid, self.ctr
        )
        self.ctr += 1
        ts = (self.video_ts0 + frame_no * (90000 // FPS)) & 0xFFFFFFFF
        ssrc = self.ssrcs.video
        count = self.packets_per_frame
        chunk = self.frame_bytes // count
        window = self.window
        for k in range(count):
            last = k == count - 1
            self.video_seq = seq = (self.video_seq + 1) & 0xFFFF
            header = RTP.pack(0x80, (0x80 | VIDEO_PT) if last else VIDEO_PT, seq, ts, ssrc)
            size = chunk - MARK.size - (len(lead) if k == 0 else 0)
            now = time.monotonic_ns()
            mark = MARK.pack(now, frame_no, self.packet_id)
            self.packet_id += 1
            if k == 0:
                packet = b"".join((header, VP8_DESC_START, lead, mark, self._filler(size)))
            else:
                packet = b"".join((header, VP8_DESC_CONT, mark, self._filler(size)))
            protected = srtp.protect_rtp(packet)
            if protected is None:
                continue
            send(protected)
            self.sent_total += 1
            if window.start_ns <= now < window.end_ns:
                self.sent_video += 1

    def send_audio(self) -> None:
        srtp = self.peer.srtp
        if srtp is None or self.peer.closed:
            return
        n = self.audio_no
        self.audio_no += 1
        self.audio_seq = seq = (self.audio_seq + 1) & 0xFFFF
        ts = (self.audio_ts0 + n * 960) & 0xFFFFFFFF
        sframe = encode_header(self.kid, self.ctr)
        self.ctr += 1
        now = time.monotonic_ns()
        mark = MARK.pack(now, n, self.packet_id)
        self.packet_id += 1
        filler = self._filler(AUDIO_FRAME_BYTES - len(sframe) - MARK.size)
        packet = b"".join(
            (RTP.pack(0x80, AUDIO_PT, seq, ts, self.ssrcs.audio), sframe, mark, filler)
        )
        protected = srtp.protect_rtp(packet)
        if protected is None:
            return
        self.peer.send(protected)
        self.sent_total += 1
        if self.window.start_ns <= now < self.window.end_ns:
            self.sent_audio += 1

    def reset_window(self) -> None:
        self.sent_video = self.sent_audio = 0

    def on_srtp(self, data: bytes, _arrived: int) -> None:
        """RTCP from the SFU: a PLI or FIR means a subscriber is waiting for a keyframe."""
        srtp = self.peer.srtp
        if srtp is None or len(data) < 2 or not 63 < data[1] & 0x7F < 96:
            return
        plain = srtp.unprotect_rtcp(data)
        if plain is None:
            self.rtcp_failures += 1
            return
        pos = 0
        while pos + 4 <= len(plain):
            first, packet_type, length = _RTCP_HEAD.unpack_from(plain, pos)
            fmt = first & 0x1F
            if packet_type == 206 and fmt in (1, 4):  # PLI, FIR
                self.plis += 1
                self.force_keyframe = True
            elif packet_type == 205 and fmt == 1:  # generic NACK: not answered (no RTX cache)
                self.nacks += 1
            pos += 4 * (length + 1)


def sframe_header_len(config: int) -> int:
    """Length of an RFC 9605 header from its first byte: |X|KLEN/KID|Y|CLEN/CTR|."""
    size = 1
    if config & 0x80:
        size += ((config >> 4) & 0x07) + 1
    if config & 0x08:
        size += (config & 0x07) + 1
    return size


def mark_offset(plain: bytes, video: bool) -> int:
    """Where the 16-byte mark starts in a decrypted RTP packet of our publishers."""
    b0 = plain[0]
    at = 12 + ((b0 & 0x0F) << 2)
    if b0 & 0x10:  # header extension: skip it
        at += 4 + ((plain[at + 2] << 8 | plain[at + 3]) << 2)
    if video:
        if plain[at] & 0x10:  # S: the frame's first packet carries prefix + SFrame header
            at += 1
            at += 3 if plain[at] & 0x01 else 10
            at += sframe_header_len(plain[at])
        else:
            at += 1
    else:
        at += sframe_header_len(plain[at])
    return at


class _Stream:
    """What both receivers of one subscription (one subscriber x one publisher) keep: the
    peer and its SRTP, the SSRC -> kind map from the answer, the shared window and latency
    arrays, and the counters the report reads."""

    __slots__ = (
        "_ready",
        "audio_latency",
        "got_audio",
        "got_video",
        "kinds",
        "peer",
        "publisher",
        "read_lag_max_ns",
        "read_lag_sum_ns",
        "received_total",
        "reordered",
        "rtcp",
        "srtp_failures",
        "subscriber",
        "unknown",
        "unprotect",
        "video_latency",
        "win_audio",
        "win_video",
        "window",
    )

    def __init__(
        self,
        subscriber: int,
        publisher: int,
        peer: Peer,
        window: Window,
        video_latency: array[int],
        audio_latency: array[int],
    ) -> None:
        assert peer.srtp is not None
        assert peer.answer is not None
        self.subscriber = subscriber
        self.publisher = publisher
        self.peer = peer
        self.window = window
        self.unprotect: Callable[[bytes], bytes | None] = peer.srtp.unprotect_rtp
        # The SFU picks the SSRCs a subscriber sees; the answer's a=ssrc lines say which is which.
        self.kinds = dict(peer.answer.ssrc_kinds)
        self.video_latency = video_latency
        self.audio_latency = audio_latency
        self.received_total = 0
        self.win_video = 0
        self.win_audio = 0
        self.got_video = False
        self.got_audio = False
        self.reordered = 0
        self.rtcp = 0
        self.srtp_failures = 0
        self.unknown = 0
        # How long packets sat in the socket before we read them: the generator's own lag,
        # excluded from latency by the kernel timestamp but worth watching.
        self.read_lag_sum_ns = 0
        self.read_lag_max_ns = 0
        self._ready = asyncio.get_running_loop().create_future()

    async def started(self) -> None:
        """Until both video (the SFU waits for a keyframe) and audio have arrived."""
        await self._ready

    def reset_window(self) -> None:
        self.win_video = self.win_audio = 0
        self.read_lag_sum_ns = self.read_lag_max_ns = 0


class SubscriberStream(_Stream):
    """One WHEP session (one subscriber x one publisher): unprotect, find the mark, count."""

    __slots__ = ("last_packet_id",)

    def __init__(
        self,
        subscriber: int,
        publisher: int,
        peer: Peer,
        window: Window,
        video_latency: array[int],
        audio_latency: array[int],
    ) -> None:
        super().__init__(subscriber, publisher, peer, window, video_latency, audio_latency)
        self.last_packet_id = -1

    def on_srtp(self, data: bytes, arrived: int) -> None:
        """`arrived` is the kernel's receive time: our own processing is not SFU latency."""
        if 63 < data[1] & 0x7F < 96:
            self.rtcp += 1  # the SFU's sender reports: nothing to measure
            return
        plain = self.unprotect(data)
        if plain is None:
            self.srtp_failures += 1
            return
        kind = self.kinds.get(_SSRC.unpack_from(plain, 8)[0])
        if kind != "video" and kind != "audio":
            self.unknown += 1
            return
        sent_ns, _frame_id, packet_id = MARK.unpack_from(plain, mark_offset(plain, kind == "video"))
        self.received_total += 1
        if packet_id < self.last_packet_id:
            self.reordered += 1
        else:
            self.last_packet_id = packet_id
        window = self.window
        if window.start_ns <= sent_ns < window.end_ns:
            lag = time.monotonic_ns() - arrived
            self.read_lag_sum_ns += lag
            if lag > self.read_lag_max_ns:
                self.read_lag_max_ns = lag
            if kind == "video":
                self.win_video += 1
                self.video_latency.append(arrived - sent_ns)
            else:
                self.win_audio += 1
                self.audio_latency.append(arrived - sent_ns)
        if not self._ready.done():
            if kind == "video":
                self.got_video = True
            else:
                self.got_audio = True
            if self.got_video and self.got_audio:
                self._ready.set_result(None)


class CountingStream(_Stream):
    """One subscription counted off the wire, for rates where decrypting every packet would
    make the generator the bottleneck.

    Per datagram: the payload type (RTCP is skipped), sequence number and SSRC from the clear
    RTP header, a sequence-number extension and a few counters; nothing is decrypted. The
    window is by kernel arrival time. Loss is counted from sequence-number gaps per SSRC
    inside the window: both SFUs map a publisher's sequence numbers onto each subscriber's
    stream with a fixed offset, so a packet lost anywhere (publisher -> SFU socket, inside the
    SFU, SFU -> subscriber) leaves a gap. One packet in `sample_every` of the window is
    decrypted for its mark: latency samples, and a check that the payload arrived intact.
    """

    __slots__ = ("countdown", "rtx", "sample_every", "samples", "tracks")

    def __init__(
        self,
        subscriber: int,
        publisher: int,
        peer: Peer,
        window: Window,
        video_latency: array[int],
        audio_latency: array[int],
        sample_every: int,
    ) -> None:
        super().__init__(subscriber, publisher, peer, window, video_latency, audio_latency)
        self.sample_every = max(1, sample_every)
        self.countdown = self.sample_every
        # ssrc -> [last seq, its extended value, window's lowest and highest extended seq,
        # packets in the window, 1 for video]
        self.tracks: dict[int, list[int]] = {}
        self.samples = 0
        self.rtx = 0
        # Here read_lag_sum_ns / read_lag_max_ns cover the decrypted samples only.

    def reset_window(self) -> None:
        super().reset_window()
        self.samples = 0
        for track in self.tracks.values():
            track[2] = track[3] = -1
            track[4] = 0

    def expected(self) -> int:
        """Packets the window's sequence-number ranges span, over every track."""
        return sum(t[3] - t[2] + 1 for t in self.tracks.values() if t[4])

    def on_srtp(self, data: bytes, arrived: int) -> None:
        if 63 < data[1] & 0x7F < 96:
            self.rtcp += 1
            return
        seq, ssrc = _SEQ_SSRC.unpack_from(data, 2)
        track = self.tracks.get(ssrc)
        if track is None:
            kind = self.kinds.get(ssrc)
            if kind != "video" and kind != "audio":
                if kind == "rtx":
                    self.rtx += 1
                else:
                    self.unknown += 1
                return
            track = self.tracks[ssrc] = [seq, seq, -1, -1, 0, kind == "video"]
            self._started(kind == "video")
        self.received_total += 1
        delta = (seq - track[0]) & 0xFFFF
        if delta < 0x8000:
            track[0] = seq
            ext = track[1] = track[1] + delta
        else:
            self.reordered += 1
            ext = track[1] - (0x10000 - delta)
        window = self.window
        if not window.start_ns <= arrived < window.end_ns:
            return
        if track[4] == 0 or ext < track[2]:
            track[2] = ext
        if ext > track[3]:
            track[3] = ext
        track[4] += 1
        video = track[5]
        if video:
            self.win_video += 1
        else:
            self.win_audio += 1
        self.countdown -= 1
        if self.countdown == 0:
            self.countdown = self.sample_every
            self._sample(data, arrived, video != 0)

    def _sample(self, data: bytes, arrived: int, video: bool) -> None:
        plain = self.unprotect(data)
        if plain is None:
            self.srtp_failures += 1
            return
        sent_ns = MARK.unpack_from(plain, mark_offset(plain, video))[0]
        self.samples += 1
        (self.video_latency if video else self.audio_latency).append(arrived - sent_ns)
        lag = time.monotonic_ns() - arrived
        self.read_lag_sum_ns += lag
        if lag > self.read_lag_max_ns:
            self.read_lag_max_ns = lag

    def _started(self, video: bool) -> None:
        if video:
            self.got_video = True
        else:
            self.got_audio = True
        if self.got_video and self.got_audio and not self._ready.done():
            self._ready.set_result(None)
