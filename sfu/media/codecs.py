"""What the SFU knows about codecs, in one place: per packet, one set of flags parsed once.

Everything here reads bytes outside the client-encrypted frame (docs/e2ee.md, "What the SFU
reads"): the RTP payload-format descriptor that the packetizer adds after encryption (VP8's
of RFC 7741, VP9's of RFC 9628, H.264's NAL header of RFC 6184, AV1's aggregation header),
and the few leading bytes of a frame that the E2EE format leaves in the clear on purpose (the
"clear prefix"). A producer calls its codec's inspector once per packet and hands the result
to everything that needs it: keyframe detection, the envelope judge, layer selection.

The flags are one int, so the per-packet call allocates nothing:

- `KEYFRAME`: the packet starts a keyframe (a subscriber may start or switch here);
- `FRAME_START`: the packet starts a frame, and bits 16 and up hold the offset of the
  frame's first byte (the payload header, where the clear prefix begins);
- `FRAME_END`: the RTP marker bit of a video packet (last packet of a frame);
- `LAYER_SYNC` and the temporal layer id (`tid(flags)`, `TID_NONE` when the packet does not
  say): VP8's descriptor T/Y fields.

Audio packets are each a whole frame and any of them can start a stream: they carry
`KEYFRAME | FRAME_START | FRAME_END`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from sfu.media.rtp import Buffer, RtpHeader

KEYFRAME: Final = 0x01
FRAME_START: Final = 0x02
FRAME_END: Final = 0x04
LAYER_SYNC: Final = 0x08
TID_SHIFT: Final = 4
TID_NONE: Final = 7
_TID_NONE_BITS: Final = TID_NONE << TID_SHIFT
PAYLOAD_SHIFT: Final = 16
_AUDIO: Final = KEYFRAME | FRAME_START | FRAME_END | _TID_NONE_BITS

# The E2EE frame format's clear prefix (docs/e2ee.md sections 2 and 3): what a receiver's
# depacketizer or decoder needs before decryption. Defined again here because the server
# never imports the client; tests/client/sframe_vectors.json ("limits") pins both clients and
# this module to the same values.
VP8_KEYFRAME_CLEAR_PREFIX_LEN: Final = 10
VP8_DELTA_CLEAR_PREFIX_LEN: Final = 3
OPUS_CLEAR_PREFIX_LEN: Final = 0

Inspector = Callable[[Buffer, RtpHeader], int]


def tid(flags: int) -> int:
    """The temporal layer id in `flags` (TID_NONE: not signalled)."""
    return (flags >> TID_SHIFT) & 0x7


def frame_offset(flags: int) -> int:
    """Where the frame's first byte is (meaningful with FRAME_START)."""
    return flags >> PAYLOAD_SHIFT


def inspector(codec: str, kind: str) -> Inspector:
    """The per-packet inspector for a codec (its lower-case a=rtpmap name)."""
    if kind != "video":
        return _inspect_audio
    return _VIDEO.get(codec, _inspect_unknown_video)


def clear_prefix_len(codec: str, flags: int) -> int | None:
    """Clear bytes at the start of a frame whose first packet has `flags`; None when the
    E2EE format defines no clear prefix for this codec (docs/e2ee.md)."""
    if codec == "vp8":
        return VP8_KEYFRAME_CLEAR_PREFIX_LEN if flags & KEYFRAME else VP8_DELTA_CLEAR_PREFIX_LEN
    if codec == "opus":
        return OPUS_CLEAR_PREFIX_LEN
    return None


def vp8_keyframe_size(data: Buffer, hdr: RtpHeader, flags: int) -> tuple[int, int] | None:
    """(width, height) of a VP8 keyframe from its first packet (RFC 6386 section 9.1): the
    3-byte frame tag, the start code 9d 01 2a, then 14-bit width and height, all inside the
    10-byte clear prefix of keyframes. None when `flags` is not a keyframe start or the bytes
    are not there."""
    if not flags & KEYFRAME or not flags & FRAME_START:
        return None
    pos = flags >> PAYLOAD_SHIFT
    if pos + 10 > hdr.payload_end or data[pos + 3 : pos + 6] != b"\x9d\x01\x2a":
        return None
    width = (data[pos + 6] | data[pos + 7] << 8) & 0x3FFF
    height = (data[pos + 8] | data[pos + 9] << 8) & 0x3FFF
    return width, height


# --- per-codec inspectors ------------------------------------------------------------------


def _inspect_audio(data: Buffer, hdr: RtpHeader) -> int:
    return _AUDIO | hdr.header_len << PAYLOAD_SHIFT


def _inspect_unknown_video(data: Buffer, hdr: RtpHeader) -> int:
    return _TID_NONE_BITS | (FRAME_END if hdr.marker else 0)


def _inspect_vp8(data: Buffer, hdr: RtpHeader) -> int:
    """The VP8 payload descriptor (RFC 7741 section 4.2), walked without allocating; the
    same rules as `parse_vp8`, which the tests hold it to."""
    pos, end = hdr.header_len, hdr.payload_end
    flags = FRAME_END if hdr.marker else 0
    if pos >= end or end > len(data):
        return flags | _TID_NONE_BITS
    b = data[pos]
    pos += 1
    layer = _TID_NONE_BITS
    if b & 0x80:  # X: the extension byte follows
        if pos >= end:
            return flags | _TID_NONE_BITS
        x = data[pos]
        pos += 1
        if x & 0x80:  # I: PictureID, 7 or 15 bits
            if pos >= end:
                return flags | _TID_NONE_BITS
            pos += 2 if data[pos] & 0x80 else 1
            if pos > end:
                return flags | _TID_NONE_BITS
        if x & 0x40:  # L: TL0PICIDX
            pos += 1
        if x & 0x30:  # T or K: one shared TID|Y|KEYIDX byte
            if pos >= end:
                return flags | _TID_NONE_BITS
            if x & 0x20:
                t = data[pos]
                layer = (t >> 6) << TID_SHIFT | (LAYER_SYNC if t & 0x20 else 0)
            pos += 1
    if pos >= end:  # the descriptor must be followed by at least one payload byte
        return flags | layer
    flags |= layer
    if b & 0x10 and not b & 0x07:  # S=1 and partition 0: the frame's first packet
        flags |= FRAME_START | pos << PAYLOAD_SHIFT
        if not data[pos] & 0x01:  # the inverse key-frame bit P of the payload header
            flags |= KEYFRAME
    return flags


def _inspect_vp9(data: Buffer, hdr: RtpHeader) -> int:
    # RFC 9628 section 4.2: B (start of frame) set and P (inter-picture predicted) clear.
    flags = _TID_NONE_BITS | (FRAME_END if hdr.marker else 0)
    if hdr.payload_len < 1:
        return flags
    b = data[hdr.header_len]
    if b & 0x08:
        flags |= FRAME_START | hdr.header_len << PAYLOAD_SHIFT
        if not b & 0x40:
            flags |= KEYFRAME
    return flags


def _inspect_h264(data: Buffer, hdr: RtpHeader) -> int:
    # RFC 6184 section 5.4: IDR (5) or SPS (7), directly, first in a STAP-A, or starting a
    # FU-A. Frame starts are not flagged: a frame may span several NAL units.
    flags = _TID_NONE_BITS | (FRAME_END if hdr.marker else 0)
    pos, end = hdr.header_len, hdr.payload_end
    if end - pos < 2:
        return flags
    nal = data[pos] & 0x1F
    if nal == 24 and end - pos >= 4:
        nal = data[pos + 3] & 0x1F
    elif nal == 28:
        fu = data[pos + 1]
        return flags | KEYFRAME if fu & 0x80 and (fu & 0x1F) in (5, 7) else flags
    return flags | KEYFRAME if nal in (5, 7) else flags


def _inspect_av1(data: Buffer, hdr: RtpHeader) -> int:
    # AV1 RTP spec section 4.4: the aggregation header's N bit starts a new coded video
    # sequence; Z clear means the packet's first OBU element is not a continuation.
    flags = _TID_NONE_BITS | (FRAME_END if hdr.marker else 0)
    if hdr.payload_len < 1:
        return flags
    b = data[hdr.header_len]
    if b & 0x08:
        flags |= KEYFRAME | FRAME_START | hdr.header_len << PAYLOAD_SHIFT
    return flags


_VIDEO: dict[str, Inspector] = {
    "vp8": _inspect_vp8,
    "vp9": _inspect_vp9,
    "h264": _inspect_h264,
    "av1": _inspect_av1,
}


# --- VP8 payload descriptor (RFC 7741 section 4.2) -----------------------------------------


class Vp8Descriptor:
    """The VP8 payload descriptor of one packet; absent optional fields are -1.

    `header_offset` is where the VP8 payload header (the frame's first bytes, RFC 7741
    section 4.3) begins. The `*_offset` fields locate PictureID, TL0PICIDX and the
    TID/Y/KEYIDX byte for a down-track that has to rewrite them after a layer switch.
    """

    __slots__ = (
        "header_offset",
        "keyframe",
        "keyidx",
        "layer_sync",
        "non_reference",
        "partition_id",
        "picture_id",
        "picture_id_bits",
        "picture_id_offset",
        "start_of_partition",
        "tid",
        "tid_offset",
        "tl0picidx",
        "tl0picidx_offset",
    )

    def __init__(self) -> None:
        self.start_of_partition = False
        self.partition_id = 0
        self.non_reference = False
        self.picture_id = -1
        self.picture_id_bits = 0
        self.picture_id_offset = -1
        self.tl0picidx = -1
        self.tl0picidx_offset = -1
        self.tid = -1
        self.layer_sync = False
        self.keyidx = -1
        self.tid_offset = -1
        self.header_offset = -1
        self.keyframe = False

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Vp8Descriptor({fields})"


def parse_vp8(data: Buffer, offset: int, end: int) -> Vp8Descriptor | None:
    """Parse the descriptor in data[offset:end] (the RTP payload); None if truncated.

    A packet starts a keyframe when it starts partition 0 (S=1, PID=0) and the inverse
    key-frame bit P of the payload header is 0 (RFC 7741 section 4.3). That is one byte
    past the descriptor, inside the clear prefix the E2EE format leaves (docs/e2ee.md).
    """
    if offset >= end or end > len(data):
        return None
    b = data[offset]
    pos = offset + 1
    d = Vp8Descriptor()
    d.non_reference = b & 0x20 != 0
    d.start_of_partition = b & 0x10 != 0
    d.partition_id = b & 0x07
    if b & 0x80:  # X: the extension byte follows
        if pos >= end:
            return None
        x = data[pos]
        pos += 1
        if x & 0x80:  # I: PictureID, 7 bits or 15 bits when its first bit M is set
            if pos >= end:
                return None
            d.picture_id_offset = pos
            p = data[pos]
            if p & 0x80:
                if pos + 2 > end:
                    return None
                d.picture_id = ((p & 0x7F) << 8) | data[pos + 1]
                d.picture_id_bits = 15
                pos += 2
            else:
                d.picture_id = p
                d.picture_id_bits = 7
                pos += 1
        if x & 0x40:  # L: TL0PICIDX
            if pos >= end:
                return None
            d.tl0picidx_offset = pos
            d.tl0picidx = data[pos]
            pos += 1
        if x & 0x30:  # T or K: one shared TID|Y|KEYIDX byte
            if pos >= end:
                return None
            t = data[pos]
            d.tid_offset = pos
            if x & 0x20:
                d.tid = t >> 6
                d.layer_sync = t & 0x20 != 0
            if x & 0x10:
                d.keyidx = t & 0x1F
            pos += 1
    if pos >= end:  # the descriptor must be followed by at least one payload byte
        return None
    d.header_offset = pos
    d.keyframe = d.start_of_partition and d.partition_id == 0 and not data[pos] & 0x01
    return d
