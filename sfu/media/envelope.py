"""Judging, without any key, whether a published track carries SFrame-encrypted frames.

docs/e2ee.md §8 explains the limits: a single well-formed SFrame header proves almost
nothing (most random byte strings parse as one), and neither do a few frames whose
"headers" happen to agree: plaintext often has bytes that stay put or drift slowly (a
constant Opus TOC byte read as the KID, a gain or quantiser field read as the counter). So a
track first has to establish a chain, a long run of frames with one KID and a counter moving
forward by small steps, and only frames that continue that chain count as enveloped.
Ciphertext wrapped in a lying header cannot be caught without the key; this catches clients
that forgot E2EE, not clients that fake it.

Runs once per frame (not per packet), on bytes outside the encrypted part: the VP8 payload
descriptor, the documented clear prefix and the SFrame header.
"""

from __future__ import annotations

from collections import deque

from sfu.media.codecs import FRAME_START, clear_prefix_len, frame_offset
from sfu.media.rtp import RtpHeader

# Largest forward step of one KID's counter between two frames of one track that still
# counts as consistent. The counter is shared by all of a sender's tracks (audio at 50 fps
# and video at 30 give steps of 1-3; more tracks and lost frame starts widen it), while
# plaintext read as a header jumps at random: with a 1-byte "counter" (plaintext Opus, whose
# constant TOC byte parses as a fixed KID) a step this small happens 1 time in 8.
MAX_CTR_STEP = 32
# Consecutive consistent frames that establish a chain (KID and counter). Real plaintext makes
# runs too: low-rate Opus (SILK), whose constant TOC byte reads as a fixed KID and whose next
# byte drifts with the signal's gain, gives runs of up to 8 frames on synthetic speech; plaintext
# VP8, whose first partition starts with near-literal header fields, up to 3. Twice the worst
# seen; the cost is that many frames going uncounted when a track starts or its KID changes.
ESTABLISH_RUN = 16
# Frames in a row that may fail to continue an established chain (one reordered or damaged
# frame) before the chain is forgotten.
MAX_MISSES = 1
# The frame format's tag size (docs/e2ee.md section 2); the clear prefixes are codec
# knowledge (codecs.py).
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
    """Per-track verdicts, fed the first packet of every frame.

    A frame counts as enveloped only when it continues the track's established chain: same
    KID as the chain and a counter 1 to MAX_CTR_STEP ahead of the chain's last counter. A chain
    is established by a run of ESTABLISH_RUN consecutive frames that each continue the one
    before; the frames of that run are not counted either way (they are evidence for the chain,
    not yet continuations of it), and the frames of a run that breaks before then count as
    without envelope. Plaintext whose header-shaped bytes drift upwards for a few frames (the
    gain byte of low-rate Opus, VP8 header fields) makes short runs, none this long in our
    measurements (docs/e2ee.md §8).
    """

    __slots__ = (
        "_cand_ctr",
        "_cand_kid",
        "_cand_len",
        "_est_ctr",
        "_est_kid",
        "_est_misses",
        "_last_ts",
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
        self._last_ts = -1
        # The established chain (KID -1: none yet) and how many frames in a row missed it.
        self._est_kid = -1
        self._est_ctr = -1
        self._est_misses = 0
        # The run of consecutive consistent frames that may establish a chain; its frames are
        # not counted until it either establishes one (then never) or breaks (then as none).
        self._cand_kid = -1
        self._cand_ctr = -1
        self._cand_len = 0

    def on_packet(self, data: bytes, hdr: RtpHeader, flags: int) -> None:
        """Look at a packet (with its codecs.py flags); only the first one of each frame
        (new timestamp) is judged."""
        if hdr.timestamp == self._last_ts:
            return
        prefix = clear_prefix_len(self.codec, flags)
        if prefix is None:
            return  # docs/e2ee.md defines no clear prefix for this codec
        if not flags & FRAME_START:
            return  # not the frame's first packet (that one was lost or reordered)
        start = frame_offset(flags)
        self._last_ts = hdr.timestamp
        end = hdr.payload_end
        if start == end:
            return  # zero-length frames are passed through unencrypted by design
        parsed = parse_sframe_header(data, start + prefix, end)
        if parsed is None or start + prefix + parsed[2] + AEAD_TAG > end:
            if self._est_kid >= 0:
                self._miss()
            if self._cand_len:
                self._drop_run()
            self._verdict(False)
            return
        kid, ctr, _ = parsed
        if kid == self._est_kid and 0 < ctr - self._est_ctr <= MAX_CTR_STEP:
            self._est_ctr = ctr
            self._est_misses = 0
            if self._cand_len:
                self._drop_run()  # a reordered or damaged frame in between
            self._verdict(True)
            return
        if self._est_kid >= 0:
            self._miss()
        if self._cand_len and kid == self._cand_kid and 0 < ctr - self._cand_ctr <= MAX_CTR_STEP:
            self._cand_ctr = ctr
            self._cand_len += 1
            if self._cand_len >= ESTABLISH_RUN:
                self._est_kid, self._est_ctr, self._est_misses = kid, ctr, 0
                self._cand_len = 0
            return
        self._drop_run()
        self._cand_kid, self._cand_ctr, self._cand_len = kid, ctr, 1

    def _miss(self) -> None:
        """A frame that does not continue the established chain; a second in a row ends it
        (one is allowed for a reordered or damaged frame)."""
        self._est_misses += 1
        if self._est_misses > MAX_MISSES:
            self._est_kid = -1

    def _drop_run(self) -> None:
        """The run under way broke before establishing a chain: its frames had no envelope."""
        for _ in range(self._cand_len):
            self._verdict(False)
        self._cand_len = 0

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
