"""codecs.py: per-packet flags parsed once, and the VP8 descriptor parser they agree with."""

from __future__ import annotations

import random
import struct

import pytest

from sfu.media import codecs, rtp
from sfu.media.rtp import RtpHeader


def parsed(data: rtp.Buffer) -> RtpHeader:
    hdr = rtp.parse_header(data)
    assert hdr is not None
    return hdr


def vp8_packet(descriptor: bytes, frame: bytes) -> tuple[bytes, RtpHeader]:
    data = struct.pack("!BBHII", 0x80, 96, 1, 2, 3) + descriptor + frame
    return data, parsed(data)


KEYFRAME_START = bytes([0x50, 0x2A, 0x00, 0x9D, 0x01, 0x2A])  # P bit 0, then the start code
DELTA_START = bytes([0x51, 0x2A, 0x00])


def test_vp8_minimal_descriptor() -> None:
    data, hdr = vp8_packet(b"\x10", KEYFRAME_START)
    d = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
    assert d is not None
    assert d.keyframe
    assert d.start_of_partition
    assert d.partition_id == 0
    assert d.header_offset == 13
    assert d.picture_id == -1
    assert d.tid == -1
    assert d.tl0picidx == -1
    data, hdr = vp8_packet(b"\x10", DELTA_START)
    d = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
    assert d is not None
    assert not d.keyframe
    # Not the start of partition 0: the byte after the descriptor is mid-frame data.
    for first in (0x00, 0x11, 0x20):
        data, hdr = vp8_packet(bytes([first]), KEYFRAME_START)
        d = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
        assert d is not None
        assert not d.keyframe
    assert "keyframe=False" in repr(d)


def test_vp8_full_descriptor_offsets() -> None:
    # X, N, S; I with a 15-bit PictureID, L, T with Y, K.
    desc = bytes([0xB0, 0xF0, 0x80 | 0x12, 0x34, 0x77, (2 << 6) | 0x20 | 0x0B])
    data, hdr = vp8_packet(desc, KEYFRAME_START)
    d = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
    assert d is not None
    assert (d.picture_id, d.picture_id_bits, d.picture_id_offset) == (0x1234, 15, 14)
    assert (d.tl0picidx, d.tl0picidx_offset) == (0x77, 16)
    assert (d.tid, d.layer_sync, d.keyidx, d.tid_offset) == (2, True, 11, 17)
    assert d.non_reference
    assert d.header_offset == 18
    assert d.keyframe


def test_vp8_seven_bit_picture_id_and_k_without_t() -> None:
    desc = bytes([0x90, 0x90, 0x55, 0x1F])  # X, S; I (7-bit), K only
    data, hdr = vp8_packet(desc, DELTA_START)
    d = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
    assert d is not None
    assert (d.picture_id, d.picture_id_bits, d.tid, d.keyidx) == (0x55, 7, -1, 31)
    assert d.header_offset == 16
    assert not d.keyframe


@pytest.mark.parametrize(
    "desc",
    [b"", b"\x90", b"\x90\x80", b"\x90\x80\x80\x01", b"\x90\x40", b"\x90\x20", b"\x90\x80\x80"],
)
def test_vp8_truncated_descriptors(desc: bytes) -> None:
    data, hdr = vp8_packet(desc, b"")
    assert codecs.parse_vp8(data, hdr.header_len, hdr.payload_end) is None
    assert codecs.parse_vp8(data, 5, len(data) + 1) is None


def test_inspector_flags_for_a_vp8_keyframe_with_temporal_layer() -> None:
    desc = bytes([0xB0, 0xF0, 0x80 | 0x12, 0x34, 0x77, (2 << 6) | 0x20 | 0x0B])
    frame = KEYFRAME_START + bytes([0x80, 0x02, 0xE0, 0x01])  # 640 x 480
    data = struct.pack("!BBHII", 0x80 | 0, 0x80 | 96, 1, 2, 3) + desc + frame
    hdr = parsed(data)
    flags = codecs.inspector("vp8", "video")(data, hdr)
    assert flags & codecs.KEYFRAME
    assert flags & codecs.FRAME_START
    assert flags & codecs.FRAME_END
    assert flags & codecs.LAYER_SYNC
    assert codecs.tid(flags) == 2
    assert codecs.frame_offset(flags) == 18
    assert codecs.vp8_keyframe_size(data, hdr, flags) == (640, 480)
    assert codecs.clear_prefix_len("vp8", flags) == codecs.VP8_KEYFRAME_CLEAR_PREFIX_LEN


def test_inspector_flags_for_a_vp8_delta_and_a_continuation() -> None:
    data, hdr = vp8_packet(b"\x10", DELTA_START)
    flags = codecs.inspector("vp8", "video")(data, hdr)
    assert flags & codecs.FRAME_START
    assert not flags & codecs.KEYFRAME
    assert not flags & codecs.FRAME_END
    assert codecs.tid(flags) == codecs.TID_NONE
    assert codecs.vp8_keyframe_size(data, hdr, flags) is None
    assert codecs.clear_prefix_len("vp8", flags) == codecs.VP8_DELTA_CLEAR_PREFIX_LEN
    data, hdr = vp8_packet(b"\x00", KEYFRAME_START)  # mid-frame: S = 0
    flags = codecs.inspector("vp8", "video")(data, hdr)
    assert not flags & (codecs.FRAME_START | codecs.KEYFRAME)


def test_audio_packets_are_whole_frames_that_can_start_a_stream() -> None:
    data = struct.pack("!BBHII", 0x80, 111, 1, 2, 3) + b"\x78abc"
    hdr = parsed(data)
    flags = codecs.inspector("opus", "audio")(data, hdr)
    assert flags & codecs.KEYFRAME
    assert flags & codecs.FRAME_START
    assert flags & codecs.FRAME_END
    assert codecs.frame_offset(flags) == 12
    assert codecs.clear_prefix_len("opus", flags) == 0
    assert codecs.clear_prefix_len("h264", flags) is None


@pytest.mark.parametrize(
    ("codec", "payload", "keyframe"),
    [
        ("vp9", b"\x08\x00", True),  # B, not P
        ("vp9", b"\x48\x00", False),  # B and P
        ("h264", b"\x65\x00", True),  # IDR
        ("h264", b"\x7c\x85", True),  # FU-A starting an IDR
        ("h264", b"\x7c\x05", False),  # FU-A continuing it
        ("h264", b"\x18\x00\x02\x67", True),  # STAP-A starting with an SPS
        ("av1", b"\x08", True),  # N: new coded video sequence
        ("av1", b"\x10", False),
        ("unknown", b"\x00", False),
    ],
)
def test_keyframe_detection_per_codec(codec: str, payload: bytes, keyframe: bool) -> None:
    data = struct.pack("!BBHII", 0x80, 96, 1, 2, 3) + payload
    flags = codecs.inspector(codec, "video")(data, parsed(data))
    assert bool(flags & codecs.KEYFRAME) == keyframe


def test_the_inspector_reads_random_descriptors_as_the_parser_does() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 9)))
        data = struct.pack("!BBHII", 0x80, 96, 1, 2, 3) + payload
        hdr = parsed(data)
        flags = codecs.inspector("vp8", "video")(data, hdr)
        d = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
        assert bool(flags & codecs.KEYFRAME) == (d is not None and d.keyframe), payload
        if d is not None and d.start_of_partition and d.partition_id == 0:
            assert codecs.frame_offset(flags) == d.header_offset
        if d is not None and d.tid >= 0:
            assert codecs.tid(flags) == d.tid
