"""Judging, without any key, whether a published track carries SFrame-encrypted frames.

docs/e2ee.md §8 explains the limits: a single well-formed SFrame header proves almost
nothing (most random byte strings parse as one), so a frame only counts as enveloped when it
is consistent with the frames before it: same KID and a counter that moved forward by a small
step. Plaintext VP8 or Opus produces "headers" whose counters jump at random, and is caught
within a few frames. Ciphertext wrapped in a lying header cannot be caught without the key;
this catches clients that forgot E2EE, not clients that fake it.

Runs once per frame (not per packet), on bytes outside the encrypted part: the VP8 payload
descriptor, the documented clear prefix and the SFrame header.
"""

from __future__ import annotations

from collections import deque

from sfu.media.rtp import RtpHeader, parse_vp8

# Largest forward step of one KID's counter between two frames of one track that still
# counts as consistent. The counter is shared by all of a sender's tracks (audio at 50 fps
# and video at 30 give steps of 1-3; more tracks and lost frame starts widen it), while
# plaintext read as a header jumps at random: with a 1-byte "counter" (plaintext Opus, whose
# constant TOC byte parses as a fixed KID) a step this small happens 1 time in 8.
MAX_CTR_STEP = 32
AEAD_TAG = 16
WINDOW = 50
MIN_FRAMES = 20
ENCRYPTED_RATIO = 0.9
PLAINTEXT_RATIO = 0.5

STATE_ENCRYPTED = "encrypted"
STATE_PLAINTEXT = "plaintext_suspected"
STATE_UNKNOWN = "unknown"
STATES = (STATE_ENCRYPTED, STATE_PLAINTEXT, STATE_UNKNOWN)


def parse_sframe_header(data: bytes, pos: int, end: int) -> tuple[int, int, int] | None:
    """(kid, ctr, header length) of an RFC 9605 §4.3 header at data[pos:end], or None.

    Mirrors the client's decoder, kept separate because the server never imports the client.
    Non-minimal encodings are refused, as the client refuses them.
    """
    if pos >= end:
        return None
    config = data[pos]
    cursor = pos + 1
    if config & 0x80:  # X: KID is extended, K+1 bytes follow
        kid_len = ((config >> 4) & 0x07) + 1
        if cursor + kid_len > end:
            return None
        kid = int.from_bytes(data[cursor : cursor + kid_len])
        if kid < 8 or (kid_len > 1 and data[cursor] == 0):
            return None
        cursor += kid_len
    else:
        kid = (config >> 4) & 0x07
    if config & 0x08:  # Y: CTR is extended, C+1 bytes follow
        ctr_len = (config & 0x07) + 1
        if cursor + ctr_len > end:
            return None
        ctr = int.from_bytes(data[cursor : cursor + ctr_len])
        if ctr < 8 or (ctr_len > 1 and data[cursor] == 0):
            return None
        cursor += ctr_len
    else:
        ctr = config & 0x07
    return kid, ctr, cursor - pos


class EnvelopeJudge:
    """Per-track verdicts, fed the first packet of every frame."""

    __slots__ = (
        "_last_ctr",
        "_last_kid",
        "_last_ts",
        "_pending",
        "_recent",
        "_totals",
        "codec",
        "frames_none",
        "frames_sframe",
    )

    def __init__(self, codec: str, totals: list[int] | None = None) -> None:
        """`totals` is a shared [none, sframe] pair that outlives this track, so exported
        counters never go down when a track ends."""
        self.codec = codec
        self._totals = totals if totals is not None else [0, 0]
        self.frames_sframe = 0
        self.frames_none = 0
        self._recent: deque[bool] = deque(maxlen=WINDOW)
        self._last_kid = -1
        self._last_ctr = -1
        self._last_ts = -1
        # A frame that parsed but starts a new KID: judged by whether the next one follows it.
        self._pending = False

    def on_packet(self, data: bytes, hdr: RtpHeader) -> None:
        """Look at a packet; only the first one of each frame (new timestamp) is judged."""
        if hdr.timestamp == self._last_ts:
            return
        if self.codec == "vp8":
            desc = parse_vp8(data, hdr.header_len, hdr.payload_end)
            if desc is None or not desc.start_of_partition or desc.partition_id != 0:
                return  # not the frame's first packet (that one was lost or reordered)
            start = desc.header_offset
            prefix = 10 if not data[start] & 0x01 else 3
        elif self.codec == "opus":
            start, prefix = hdr.header_len, 0
        else:
            return  # docs/e2ee.md defines no clear prefix for this codec
        self._last_ts = hdr.timestamp
        end = hdr.payload_end
        if start == end:
            return  # zero-length frames are passed through unencrypted by design
        parsed = parse_sframe_header(data, start + prefix, end)
        if parsed is None or start + prefix + parsed[2] + AEAD_TAG > end:
            self._verdict(False)
            return
        kid, ctr, _ = parsed
        follows = kid == self._last_kid and 0 < ctr - self._last_ctr <= MAX_CTR_STEP
        self._last_kid, self._last_ctr = kid, ctr
        if follows:
            if self._pending:
                self._pending = False
                self._verdict(True)
            self._verdict(True)
        else:
            if self._pending:
                self._verdict(False)
            self._pending = True

    def _verdict(self, enveloped: bool) -> None:
        if enveloped:
            self.frames_sframe += 1
        else:
            self.frames_none += 1
        self._totals[enveloped] += 1
        self._recent.append(enveloped)

    @property
    def frames_judged(self) -> int:
        return self.frames_sframe + self.frames_none

    @property
    def state(self) -> str:
        recent = self._recent
        if len(recent) < MIN_FRAMES:
            return STATE_UNKNOWN
        ratio = sum(recent) / len(recent)
        if ratio >= ENCRYPTED_RATIO:
            return STATE_ENCRYPTED
        if ratio < PLAINTEXT_RATIO:
            return STATE_PLAINTEXT
        return STATE_UNKNOWN
