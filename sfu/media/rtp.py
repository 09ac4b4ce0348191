"""RTP header helpers for the forwarding hot path.

The SFU forwards payloads untouched (docs/architecture.md, "What the server may read"), so
it only ever needs to locate things: the fixed header (RFC 3550 section 5.1), the
header-extension block and its elements (RFC 8285), the VP8 payload descriptor that sits in
front of the encoded frame (RFC 7741 section 4.2) and the RTX framing (RFC 4588 section 4).
Everything here works on offsets into the received datagram and writes with precompiled
`struct.Struct` objects, so a forwarded packet costs one small header object, one bytearray
copy and a `pack_into`.

Parsers never raise on hostile input: they return None (or stop iterating), because they run
inside `datagram_received`, where an exception per bad packet would flood the event loop's
error log. Writers may raise on caller mistakes (an out-of-range payload type), which are bugs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NamedTuple, TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
# Per-subscriber extension-id translation: a dict, or a list indexed by the publisher's id
# (the list is faster; build it once per subscriber with `id_map_list`). 0 means "drop".
ExtIdMap: TypeAlias = dict[int, int] | list[int]

RTP_VERSION: Final = 2
FIXED_HEADER_SIZE: Final = 12
# RFC 8285 section 4.2 and 4.3: the "defined by profile" values that announce each form.
PROFILE_ONE_BYTE: Final = 0xBEDE
PROFILE_TWO_BYTE: Final = 0x1000  # 0x100 followed by 4 "appbits", hence the 0xFFF0 mask
_TWO_BYTE_MASK: Final = 0xFFF0
# RFC 8285 section 4.2: in the one-byte form id 15 ends parsing of the whole block.
_ONE_BYTE_STOP_ID: Final = 15
ONE_BYTE_MAX_ID: Final = 14
ONE_BYTE_MAX_LEN: Final = 16
TWO_BYTE_MAX_LEN: Final = 255

_FIXED = struct.Struct("!BBHII")  # V|P|X|CC, M|PT, sequence number, timestamp, SSRC
_FIXED_EXT = struct.Struct("!BBHIIHH")  # the fixed header directly followed by profile, length
_FROM_BYTE1 = struct.Struct("!BHII")  # M|PT .. SSRC, written at offset 1 (byte 0 is kept)
_EXT_HEADER = struct.Struct("!HH")  # profile, length in 32-bit words
_U16 = struct.Struct("!H")
_ZEROS: Final = bytes(TWO_BYTE_MAX_LEN + 2)  # longest element: 2 header bytes + 255


class RtpHeader:
    """Where everything is in one RTP packet. Offsets index the buffer that was parsed.

    `header_len` is the payload offset (fixed header + CSRCs + extension block);
    `payload_end` excludes RTP padding. Without an extension block `ext_profile` is -1 and
    `ext_start == ext_end == 0`; otherwise `ext_start` is the first byte after the 4-byte
    profile/length word and `ext_end` is the first byte after the block.
    """

    __slots__ = (
        "csrc_count",
        "ext_end",
        "ext_profile",
        "ext_start",
        "header_len",
        "marker",
        "padding",
        "payload_end",
        "payload_type",
        "seq",
        "ssrc",
        "timestamp",
    )

    def __init__(
        self,
        marker: bool,
        payload_type: int,
        seq: int,
        timestamp: int,
        ssrc: int,
        csrc_count: int,
        padding: bool,
        header_len: int,
        payload_end: int,
        ext_profile: int,
        ext_start: int,
        ext_end: int,
    ) -> None:
        self.marker = marker
        self.payload_type = payload_type
        self.seq = seq
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.csrc_count = csrc_count
        self.padding = padding
        self.header_len = header_len
        self.payload_end = payload_end
        self.ext_profile = ext_profile
        self.ext_start = ext_start
        self.ext_end = ext_end

    @property
    def has_extension(self) -> bool:
        return self.ext_profile >= 0

    @property
    def payload_len(self) -> int:
        return self.payload_end - self.header_len

    def __repr__(self) -> str:
        return (
            f"RtpHeader(pt={self.payload_type}, seq={self.seq}, ts={self.timestamp}, "
            f"ssrc={self.ssrc:#010x}, marker={self.marker}, header_len={self.header_len}, "
            f"payload_end={self.payload_end}, ext_profile={self.ext_profile:#x})"
        )


def parse_header(data: Buffer) -> RtpHeader | None:
    """Locate the parts of an RTP packet; None for anything RFC 3550 A.1 would reject."""
    size = len(data)
    if size < FIXED_HEADER_SIZE:
        return None
    b0 = data[0]
    if b0 & 0x3F == 0x10 and b0 >> 6 == RTP_VERSION and size >= 16:
        # What WebRTC sends nearly always: extensions, no CSRCs, no padding. One unpack.
        _, b1, seq, timestamp, ssrc, profile, words = _FIXED_EXT.unpack_from(data, 0)
        pos = 16 + (words << 2)
        if pos > size:
            return None
        return RtpHeader(
            b1 >= 0x80, b1 & 0x7F, seq, timestamp, ssrc, 0, False, pos, size, profile, 16, pos
        )
    b0, b1, seq, timestamp, ssrc = _FIXED.unpack_from(data, 0)
    if b0 >> 6 != RTP_VERSION:
        return None
    pos = FIXED_HEADER_SIZE + ((b0 & 0x0F) << 2)
    profile = -1
    ext_start = ext_end = 0
    if b0 & 0x10:
        if size < pos + 4:
            return None
        profile, words = _EXT_HEADER.unpack_from(data, pos)
        ext_start = pos + 4
        pos = ext_end = ext_start + (words << 2)
    if pos > size:
        return None
    end = size
    if b0 & 0x20:
        # RFC 3550 section 5.1: the last octet counts the padding, itself included, so 0 is
        # invalid; a count reaching into the header is too (A.1). A padding-only packet with
        # an empty payload is legal (bandwidth probes look like that).
        pad = data[size - 1]
        if pad == 0 or pad > size - pos:
            return None
        end -= pad
    return RtpHeader(
        b1 >= 0x80,
        b1 & 0x7F,
        seq,
        timestamp,
        ssrc,
        b0 & 0x0F,
        b0 & 0x20 != 0,
        pos,
        end,
        profile,
        ext_start,
        ext_end,
    )


def rewrite_header(
    buf: bytearray,
    ssrc: int,
    seq: int,
    timestamp: int,
    payload_type: int,
    marker: bool | None = None,
) -> None:
    """Give a forwarded copy the subscriber's SSRC, sequence number, timestamp and PT.

    `seq` and `timestamp` are reduced modulo 2**16 and 2**32 so callers can pass unwrapped
    (extended) counters. `marker=None` keeps the publisher's marker bit.
    """
    m = buf[1] & 0x80 if marker is None else (0x80 if marker else 0)
    # Masking PT keeps a bad value from silently flipping the marker bit next to it.
    _FROM_BYTE1.pack_into(
        buf, 1, m | (payload_type & 0x7F), seq & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc
    )


def rewritten_copy(data: bytes, ssrc: int, seq: int, timestamp: int, payload_type: int) -> bytes:
    """A copy of `data` with the subscriber's SSRC, sequence number, timestamp and PT, and
    everything else (marker, extensions, payload, padding) byte for byte: one allocation,
    directly the `bytes` SRTP wants."""
    return b"".join(
        (
            data[:1],
            _FROM_BYTE1.pack(
                (data[1] & 0x80) | payload_type, seq & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc
            ),
            memoryview(data)[FIXED_HEADER_SIZE:],
        )
    )


# --- RFC 8285 header extensions -----------------------------------------------------------


def iter_extensions(data: Buffer, hdr: RtpHeader) -> Iterator[tuple[int, int, int]]:
    """Yield (id, data offset, data length) for each element, in order, without copying.

    Stops quietly at the first element that does not fit or is reserved (RFC 8285 section
    4.2: id 15 ends processing; an id-0 byte other than 0x00 is neither padding nor an
    element). A profile that is neither RFC 8285 form yields nothing: its content is opaque.
    """
    profile = hdr.ext_profile
    pos = hdr.ext_start
    end = hdr.ext_end
    if profile == PROFILE_ONE_BYTE:
        while pos < end:
            b = data[pos]
            if b == 0:  # padding byte (RFC 8285 section 4.1)
                pos += 1
                continue
            ext_id = b >> 4
            if ext_id == 0 or ext_id == _ONE_BYTE_STOP_ID:
                return
            start = pos + 1
            pos = start + (b & 0x0F) + 1
            if pos > end:
                return
            yield ext_id, start, pos - start
    elif profile & _TWO_BYTE_MASK == PROFILE_TWO_BYTE:
        while pos < end:
            ext_id = data[pos]
            if ext_id == 0:
                pos += 1
                continue
            start = pos + 2
            if start > end:
                return
            pos = start + data[pos + 1]
            if pos > end:
                return
            yield ext_id, start, pos - start


def _locate_extension(data: Buffer, hdr: RtpHeader, ext_id: int) -> int:
    """The first element with `ext_id`, packed as `offset << 8 | length`, or -1. Same rules
    as `iter_extensions`, written out (and packed into one int, so nothing is allocated)
    because it runs for several extensions per packet."""
    profile = hdr.ext_profile
    pos = hdr.ext_start
    end = hdr.ext_end
    if profile == PROFILE_ONE_BYTE:
        while pos < end:
            b = data[pos]
            if b == 0:
                pos += 1
                continue
            found = b >> 4
            if found == 0 or found == _ONE_BYTE_STOP_ID:
                return -1
            start = pos + 1
            pos = start + (b & 0x0F) + 1
            if pos > end:
                return -1
            if found == ext_id:
                return start << 8 | (pos - start)
    elif profile & _TWO_BYTE_MASK == PROFILE_TWO_BYTE:
        while pos < end:
            found = data[pos]
            if found == 0:
                pos += 1
                continue
            start = pos + 2
            if start > end:
                return -1
            pos = start + data[pos + 1]
            if pos > end:
                return -1
            if found == ext_id:
                return start << 8 | (pos - start)
    return -1


def find_extension(data: Buffer, hdr: RtpHeader, ext_id: int) -> tuple[int, int] | None:
    """(offset, length) of the first element with `ext_id`, or None."""
    loc = _locate_extension(data, hdr, ext_id)
    return None if loc < 0 else (loc >> 8, loc & 0xFF)


def read_transport_seq(data: Buffer, hdr: RtpHeader, ext_id: int) -> int:
    """The transport-wide sequence number (draft-holmer-rmcat-transport-wide-cc-extensions-01
    section 2: 16 bits, big-endian) under `ext_id`, or -1. Runs for every packet of a
    publisher that negotiated it, so it returns a plain int, no tuple."""
    loc = _locate_extension(data, hdr, ext_id)
    if loc < 0 or loc & 0xFF < 2:
        return -1
    at = loc >> 8
    return data[at] << 8 | data[at + 1]


def id_map_list(mapping: dict[int, int]) -> list[int]:
    """Turn {publisher id: subscriber id} into the 256-entry list `remap_extension_ids`
    prefers; ids absent from the dict map to 0 (drop)."""
    table = [0] * 256
    for src, dst in mapping.items():
        if 0 < src < 256:
            table[src] = dst
    return table


def _as_table(mapping: ExtIdMap) -> list[int]:
    """One lookup form for the loops below; the packet path passes lists already."""
    return id_map_list(mapping) if isinstance(mapping, dict) else mapping


def _zero_tail(buf: bytearray, start: int, end: int) -> None:
    # A block may be up to 2**18 bytes long (RFC 3550 section 5.3.1), longer than _ZEROS;
    # the slice assignment must never change the buffer's length.
    n = end - start
    buf[start:end] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


def remap_extension_ids(buf: bytearray, hdr: RtpHeader, mapping: ExtIdMap) -> bool:
    """Translate extension ids in place into the subscriber's negotiated ids.

    Elements whose id maps to 0 (or is absent from the mapping) are removed by overwriting
    the element header *and* its data with 0x00 bytes. RFC 8285 section 4.1 defines every
    0x00 byte in either form as a padding byte that carries neither id nor length and that
    receivers skip, so the block keeps its size, no byte moves, and the payload offset and
    payload bytes stay exactly as they were. (Rewriting the id to 0 alone would be wrong in
    the one-byte form, where a non-zero length nibble after id 0 is malformed, and id 15
    would hide every later element.) The dropped values are gone rather than merely hidden.

    Bytes the receiver could not parse anyway (after an id-15 byte, a reserved id-0 header
    or a truncated element) are zeroed too, with the same meaning to a receiver.

    Returns False when a target id cannot be written in the block's form (above 14 in the
    one-byte form, above 255 in the two-byte form). The buffer is then partly rewritten and
    must be discarded: call `rebuild_extensions` on the original packet instead. A profile
    that is not an RFC 8285 form is left untouched (True): its content is opaque to us and
    receivers that did not negotiate it ignore it.
    """
    profile = hdr.ext_profile
    pos = hdr.ext_start
    end = hdr.ext_end
    table = _as_table(mapping)
    table_len = len(table)
    if profile == PROFILE_ONE_BYTE:
        while pos < end:
            b = buf[pos]
            if b == 0:
                pos += 1
                continue
            ext_id = b >> 4
            stop = pos + 1 + (b & 0x0F) + 1
            if ext_id == 0 or ext_id == _ONE_BYTE_STOP_ID or stop > end:
                _zero_tail(buf, pos, end)
                return True
            new_id = table[ext_id] if ext_id < table_len else 0
            if new_id == 0:
                buf[pos:stop] = _ZEROS[: stop - pos]
            elif new_id != ext_id:
                if not 0 < new_id <= ONE_BYTE_MAX_ID:
                    return False
                buf[pos] = (new_id << 4) | (b & 0x0F)
            pos = stop
    elif profile & _TWO_BYTE_MASK == PROFILE_TWO_BYTE:
        while pos < end:
            ext_id = buf[pos]
            if ext_id == 0:
                pos += 1
                continue
            stop = pos + 2
            if stop <= end:
                stop += buf[pos + 1]
            if stop > end:
                _zero_tail(buf, pos, end)
                return True
            new_id = table[ext_id] if ext_id < table_len else 0
            if new_id == 0:
                buf[pos:stop] = _ZEROS[: stop - pos]
            elif new_id != ext_id:
                if not 0 < new_id <= 255:
                    return False
                buf[pos] = new_id
            pos = stop
    return True


def rebuild_extensions(
    data: Buffer, hdr: RtpHeader, mapping: ExtIdMap, two_byte: bool
) -> bytearray | None:
    """Copy the packet with a freshly built extension block in the chosen RFC 8285 form.

    The slow path for what `remap_extension_ids` cannot do in place: ids above 14, or a
    subscriber that needs a different form. Whether the two-byte form may be sent to a
    subscriber is a signaling decision (RFC 8285 section 6, a=extmap-allow-mixed) made by
    the caller. Returns None if a kept element does not fit the one-byte form (empty, or
    longer than 16 bytes). With no element kept the extension block and X bit are dropped.
    Payload and RTP padding are copied byte for byte.
    """
    table = _as_table(mapping)
    block = bytearray()
    for ext_id, off, length in iter_extensions(data, hdr):
        new_id = table[ext_id] if ext_id < len(table) else 0
        if new_id == 0:
            continue
        if two_byte:
            if not 0 < new_id <= 255:
                return None
            block.append(new_id)
            block.append(length)
        else:
            if not 0 < new_id <= ONE_BYTE_MAX_ID or not 0 < length <= ONE_BYTE_MAX_LEN:
                return None
            block.append((new_id << 4) | (length - 1))
        block += data[off : off + length]
    fixed_end = FIXED_HEADER_SIZE + 4 * hdr.csrc_count
    rest_start = hdr.ext_end if hdr.has_extension else fixed_end
    out = bytearray(data[:fixed_end])
    if block:
        block += _ZEROS[: -len(block) % 4]
        out[0] |= 0x10
        out += _EXT_HEADER.pack(PROFILE_TWO_BYTE if two_byte else PROFILE_ONE_BYTE, len(block) // 4)
        out += block
    else:
        out[0] &= 0xEF
    out += data[rest_start:]
    return out


# --- Extension values the router reads ------------------------------------------------------


def read_audio_level(data: Buffer, hdr: RtpHeader, ext_id: int) -> tuple[bool, int] | None:
    """(voice activity, level in -dBov 0..127) from RFC 6464 section 3, or None."""
    loc = find_extension(data, hdr, ext_id)
    if loc is None or loc[1] < 1:
        return None
    b = data[loc[0]]
    return b >= 0x80, b & 0x7F


def read_sdes_extension(data: Buffer, hdr: RtpHeader, ext_id: int) -> str | None:
    """MID (RFC 8843 section 15), RID or repaired RID (RFC 8852 section 3) as text, or None.

    Values are ASCII tokens; a value is cut at the first NUL because senders that pad the
    one-byte form's minimum length use trailing zeros, and empty or non-ASCII values are
    treated as absent.
    """
    loc = find_extension(data, hdr, ext_id)
    if loc is None:
        return None
    off, length = loc
    raw = bytes(data[off : off + length])
    nul = raw.find(0)
    if nul >= 0:
        raw = raw[:nul]
    if not raw:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


class DependencyDescriptorInfo(NamedTuple):
    """The mandatory fields of the AV1 dependency descriptor (AV1 RTP spec, appendix A.2).

    Deeper parsing (templates, decode targets) needs the structure from a previous keyframe
    and belongs to the layer selector; `offset`/`length` locate the whole extension value.
    """

    start_of_frame: bool
    end_of_frame: bool
    template_id: int
    frame_number: int
    offset: int
    length: int


def read_dependency_descriptor(
    data: Buffer, hdr: RtpHeader, ext_id: int
) -> DependencyDescriptorInfo | None:
    loc = find_extension(data, hdr, ext_id)
    if loc is None or loc[1] < 3:  # the mandatory fields take 3 bytes
        return None
    off, length = loc
    b = data[off]
    return DependencyDescriptorInfo(
        b >= 0x80, b & 0x40 != 0, b & 0x3F, _U16.unpack_from(data, off + 1)[0], off, length
    )


# --- RTX (RFC 4588) -------------------------------------------------------------------------


def build_rtx(original: Buffer, hdr: RtpHeader, rtx_ssrc: int, rtx_seq: int, rtx_pt: int) -> bytes:
    """Wrap a stored packet for retransmission on the RTX stream.

    RFC 4588 section 4: same header (marker, timestamp, CSRCs, extensions) with the RTX
    SSRC, sequence number and payload type, and the original sequence number (OSN) in
    front of the original payload. The original's RTP padding is not part of its payload,
    so it is not carried and the P bit is cleared.
    """
    hl = hdr.header_len
    head = bytearray(original[:hl])
    head[0] &= 0xDF
    _FROM_BYTE1.pack_into(
        head, 1, (head[1] & 0x80) | rtx_pt, rtx_seq & 0xFFFF, hdr.timestamp, rtx_ssrc
    )
    return b"".join((head, _U16.pack(hdr.seq), memoryview(original)[hl : hdr.payload_end]))


def unwrap_rtx(data: Buffer, hdr: RtpHeader) -> tuple[int, int] | None:
    """(original sequence number, original payload offset) of an RTX packet, or None.

    None also for RTX packets without an OSN: libwebrtc sends padding-only RTX packets as
    bandwidth probes, and they repair nothing.
    """
    hl = hdr.header_len
    if hdr.payload_end - hl < 2:
        return None
    return _U16.unpack_from(data, hl)[0], hl + 2


def rtx_to_original(data: Buffer, hdr: RtpHeader, ssrc: int, payload_type: int) -> bytes | None:
    """Rebuild the packet an RTX packet repairs (RFC 4588 section 4), or None without OSN.

    The RTX packet's own padding belongs to the RTX stream and is dropped.
    """
    unwrapped = unwrap_rtx(data, hdr)
    if unwrapped is None:
        return None
    osn, payload_offset = unwrapped
    hl = hdr.header_len
    head = bytearray(data[:hl])
    head[0] &= 0xDF
    _FROM_BYTE1.pack_into(head, 1, (head[1] & 0x80) | payload_type, osn, hdr.timestamp, ssrc)
    return b"".join((head, memoryview(data)[payload_offset : hdr.payload_end]))


# --- Sequence number arithmetic (RFC 3550 appendix A.1) -------------------------------------


def seq_delta(a: int, b: int) -> int:
    """Signed distance from b to a in 16-bit serial arithmetic, in [-32768, 32767]."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d >= 0x8000 else d


def seq_newer(a: int, b: int) -> bool:
    """True if sequence number a comes after b. Exactly half the space apart is ambiguous;
    the larger raw value wins so that seq_newer(a, b) and seq_newer(b, a) never agree."""
    d = (a - b) & 0xFFFF
    if d == 0x8000:
        return a > b
    return 0 < d < 0x8000


class SeqUnwrapper:
    """Extends 16-bit sequence numbers to a monotonic counter (RFC 3550 appendix A.1).

    The first value seen is returned as is; each later one is placed at the nearest
    position to the highest value seen so far, so reordering and retransmissions up to
    half the space away resolve correctly. A packet older than the first one across a wrap
    gets a negative value.
    """

    __slots__ = ("_highest",)

    def __init__(self) -> None:
        self._highest: int | None = None

    @property
    def highest(self) -> int | None:
        return self._highest

    def unwrap(self, seq: int) -> int:
        highest = self._highest
        if highest is None:
            self._highest = seq
            return seq
        d = (seq - highest) & 0xFFFF
        if d >= 0x8000:
            return highest + d - 0x10000
        ext = highest + d
        self._highest = ext
        return ext
