"""RTP helpers: RFC 8285 layouts, aiortc interop both ways, rewriting that leaves payloads
alone, VP8 descriptors, RTX, sequence arithmetic, and 20k fuzzed inputs that never raise."""

from __future__ import annotations

import random
import struct

import pytest
from aiortc import rtp as artp
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

from sfu.media import codecs, rtp
from sfu.media.rtp import RtpHeader

URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_RID = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
URI_RRID = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
URI_ABS = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
URI_TCC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
URI_TOFFSET = "urn:ietf:params:rtp-hdrext:toffset"


def ext_map(ids: dict[str, int]) -> artp.HeaderExtensionsMap:
    m = artp.HeaderExtensionsMap()
    m.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=i, uri=uri) for uri, i in ids.items()
            ]
        )
    )
    return m


PUB_IDS = {URI_MID: 1, URI_RID: 2, URI_ABS: 3, URI_LEVEL: 4, URI_TCC: 5, URI_RRID: 6}


def build(
    *,
    pt: int = 96,
    seq: int = 1000,
    ts: int = 123456,
    ssrc: int = 0x11223344,
    marker: int = 0,
    payload: bytes = b"\x90\x80\x01payload-bytes",
    csrc: list[int] | None = None,
    padding: int = 0,
    ids: dict[str, int] | None = None,
    **ext: object,
) -> bytes:
    pkt = artp.RtpPacket(
        payload_type=pt, marker=marker, sequence_number=seq, timestamp=ts, ssrc=ssrc
    )
    pkt.payload = payload
    pkt.csrc = csrc or []
    pkt.padding_size = padding
    for key, value in ext.items():
        setattr(pkt.extensions, key, value)
    return bytes(pkt.serialize(ext_map(ids or PUB_IDS)))


def parsed(data: rtp.Buffer) -> RtpHeader:
    hdr = rtp.parse_header(data)
    assert hdr is not None
    return hdr


def element(data: bytes | bytearray, hdr: RtpHeader, ext_id: int) -> bytes | None:
    loc = rtp.find_extension(data, hdr, ext_id)
    return None if loc is None else bytes(data[loc[0] : loc[0] + loc[1]])


# --- fixed header ---------------------------------------------------------------------------


def test_fixed_header_fields() -> None:
    data = struct.pack("!BBHII", 0x80, 0x80 | 111, 65535, 0xFFFFFFFF, 0xDEADBEEF) + b"abc"
    hdr = parsed(data)
    assert (hdr.marker, hdr.payload_type, hdr.seq, hdr.timestamp, hdr.ssrc) == (
        True,
        111,
        65535,
        0xFFFFFFFF,
        0xDEADBEEF,
    )
    assert (hdr.header_len, hdr.payload_end, hdr.payload_len) == (12, 15, 3)
    assert not hdr.has_extension
    assert not hdr.padding
    assert hdr.csrc_count == 0
    assert "seq=65535" in repr(hdr)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80" * 11,
        b"\x40" + bytes(11),  # version 1
        b"\xc0" + bytes(11),  # version 3
        b"\x81" + bytes(14),  # one CSRC announced, 3 bytes present
        b"\x90" + bytes(13),  # X set, extension header truncated
        b"\x90" + bytes(11) + b"\xbe\xde\x00\x02" + bytes(7),  # block longer than packet
        b"\xa0" + bytes(11) + b"\x00",  # padding count 0
        b"\xa0" + bytes(11) + b"ab\x04",  # padding count larger than the payload
    ],
)
def test_malformed_headers_are_rejected(data: bytes) -> None:
    assert rtp.parse_header(data) is None


def test_padding_is_excluded_and_padding_only_packets_parse() -> None:
    data = build(payload=b"hello", padding=7)
    hdr = parsed(data)
    assert hdr.padding
    assert data[hdr.header_len : hdr.payload_end] == b"hello"
    assert len(data) - hdr.payload_end == 7
    probe = b"\xa0" + bytes(11) + bytes(3) + b"\x04"  # all padding, as bandwidth probes are
    hdr = parsed(probe)
    assert hdr.payload_len == 0
    assert hdr.header_len == 12


def test_memoryview_and_bytearray_inputs() -> None:
    data = build(mid="a", audio_level=(True, 30))
    for view in (bytearray(data), memoryview(data)):
        hdr = parsed(view)
        assert rtp.read_sdes_extension(view, hdr, 1) == "a"
        assert rtp.read_audio_level(view, hdr, 4) == (True, 30)


# --- interop with aiortc ----------------------------------------------------------------------


def random_packet(rnd: random.Random) -> tuple[bytes, dict[str, object]]:
    fields: dict[str, object] = {
        "pt": rnd.randrange(128),
        "seq": rnd.randrange(65536),
        "ts": rnd.randrange(1 << 32),
        "ssrc": rnd.randrange(1 << 32),
        "marker": rnd.randrange(2),
        "payload": rnd.randbytes(rnd.randrange(0, 1300)),
        "csrc": [rnd.randrange(1 << 32) for _ in range(rnd.randrange(4))],
        "padding": rnd.choice([0, 0, 1, 4, 255]),
    }
    ext: dict[str, object] = {}
    if rnd.random() < 0.7:
        # A MID longer than 16 bytes makes aiortc switch to the two-byte form.
        ext["mid"] = rnd.choice(["0", "1", "video", "m" * rnd.randrange(1, 30)])
    if rnd.random() < 0.5:
        ext["rtp_stream_id"] = rnd.choice(["q", "h", "f"])
    if rnd.random() < 0.5:
        ext["abs_send_time"] = rnd.randrange(1 << 24)
    if rnd.random() < 0.5:
        ext["audio_level"] = (bool(rnd.randrange(2)), rnd.randrange(128))
    if rnd.random() < 0.5:
        ext["transport_sequence_number"] = rnd.randrange(65536)
    return build(**fields, **ext), {**fields, **ext}  # type: ignore[arg-type]


def test_parses_what_aiortc_serializes() -> None:
    rnd = random.Random(8285)
    two_byte_seen = 0
    for _ in range(500):
        data, f = random_packet(rnd)
        hdr = parsed(data)
        assert hdr.payload_type == f["pt"]
        assert hdr.seq == f["seq"]
        assert hdr.timestamp == f["ts"]
        assert hdr.ssrc == f["ssrc"]
        assert hdr.marker == bool(f["marker"])
        assert hdr.padding == bool(f["padding"])
        assert hdr.csrc_count == len(f["csrc"])  # type: ignore[arg-type]
        assert data[hdr.header_len : hdr.payload_end] == f["payload"]
        two_byte_seen += hdr.ext_profile == rtp.PROFILE_TWO_BYTE
        assert rtp.read_sdes_extension(data, hdr, 1) == f.get("mid")
        assert rtp.read_sdes_extension(data, hdr, 2) == f.get("rtp_stream_id")
        assert rtp.read_audio_level(data, hdr, 4) == f.get("audio_level")
        abs_send = element(data, hdr, 3)
        assert (abs_send and int.from_bytes(abs_send, "big")) == f.get("abs_send_time")
        tcc = element(data, hdr, 5)
        assert (tcc and int.from_bytes(tcc, "big")) == f.get("transport_sequence_number")
        # The generic iterator agrees with aiortc's own element list.
        if hdr.has_extension:
            profile, words = struct.unpack_from("!HH", data, hdr.ext_start - 4)
            value = data[hdr.ext_start : hdr.ext_start + 4 * words]
            theirs = artp.unpack_header_extensions(profile, value)
            ours = [(i, data[o : o + n]) for i, o, n in rtp.iter_extensions(data, hdr)]
            assert ours == theirs
    assert two_byte_seen > 20


def test_rewrite_header_in_place_keeps_everything_else() -> None:
    data = build(marker=1, mid="v", transport_sequence_number=7, padding=3, csrc=[5, 6])
    hdr = parsed(data)
    buf = bytearray(data)
    rtp.rewrite_header(
        buf, ssrc=0xCAFEBABE, seq=65536 + 9, timestamp=(1 << 32) + 77, payload_type=100
    )
    out = parsed(buf)
    assert (out.ssrc, out.seq, out.timestamp, out.payload_type, out.marker) == (
        0xCAFEBABE,
        9,
        77,
        100,
        True,
    )
    assert buf[0] == data[0]
    assert buf[12:] == data[12:]
    theirs = artp.RtpPacket.parse(bytes(buf), ext_map(PUB_IDS))
    assert theirs.sequence_number == 9
    assert theirs.ssrc == 0xCAFEBABE
    assert theirs.marker == 1
    assert theirs.extensions.mid == "v"
    assert theirs.payload == data[hdr.header_len : hdr.payload_end]
    rtp.rewrite_header(buf, 1, 2, 3, 4, marker=False)
    assert not parsed(buf).marker
    rtp.rewrite_header(buf, 1, 2, 3, 4, marker=True)
    assert parsed(buf).marker
    assert parsed(buf).payload_type == 4


# --- RFC 8285 layouts -------------------------------------------------------------------------


def with_block(profile: int, block: bytes, payload: bytes = b"PAYLOAD!") -> bytes:
    assert len(block) % 4 == 0
    return (
        struct.pack("!BBHII", 0x90, 96, 1, 2, 3)
        + struct.pack("!HH", profile, len(block) // 4)
        + block
        + payload
    )


# RFC 8285 section 4.2's figure: elements of 1 and 2 data bytes, two padding bytes, then an
# element of 4 data bytes, in three words.
ONE_BYTE_RFC = bytes([0x10, 0xAA, 0x21, 0xBB, 0xBB, 0x00, 0x00, 0x33, 0xCC, 0xCC, 0xCC, 0xCC])
# RFC 8285 section 4.3's figure: an empty element, one of 1 byte, a padding byte, one of 4.
TWO_BYTE_RFC = bytes([0x01, 0x00, 0x02, 0x01, 0xBB, 0x00, 0x03, 0x04, 0xCC, 0xCC, 0xCC, 0xCC])


def test_rfc8285_one_byte_example() -> None:
    data = with_block(0xBEDE, ONE_BYTE_RFC)
    hdr = parsed(data)
    assert list(rtp.iter_extensions(data, hdr)) == [(1, 17, 1), (2, 19, 2), (3, 24, 4)]
    assert rtp.find_extension(data, hdr, 3) == (24, 4)
    assert rtp.find_extension(data, hdr, 4) is None
    assert data[hdr.header_len : hdr.payload_end] == b"PAYLOAD!"


@pytest.mark.parametrize("appbits", [0x0, 0x5, 0xF])
def test_rfc8285_two_byte_example(appbits: int) -> None:
    data = with_block(0x1000 | appbits, TWO_BYTE_RFC)
    hdr = parsed(data)
    assert list(rtp.iter_extensions(data, hdr)) == [(1, 18, 0), (2, 20, 1), (3, 24, 4)]
    assert rtp.find_extension(data, hdr, 1) == (18, 0)
    assert rtp.find_extension(data, hdr, 3) == (24, 4)


def test_one_byte_id_15_and_reserved_id_0_stop_parsing() -> None:
    # RFC 8285 section 4.2: id 15 ends processing; elements after it are not considered.
    data = with_block(0xBEDE, bytes([0x10, 0xAA, 0xF0, 0x20, 0xBB, 0, 0, 0]))
    hdr = parsed(data)
    assert list(rtp.iter_extensions(data, hdr)) == [(1, 17, 1)]
    assert rtp.find_extension(data, hdr, 2) is None
    data = with_block(0xBEDE, bytes([0x10, 0xAA, 0x01, 0x20, 0xBB, 0, 0, 0]))
    assert list(rtp.iter_extensions(data, parsed(data))) == [(1, 17, 1)]


def test_truncated_elements_stop_parsing() -> None:
    data = with_block(0xBEDE, bytes([0x10, 0xAA, 0x2F, 0xBB]))  # claims 16 bytes
    hdr = parsed(data)
    assert list(rtp.iter_extensions(data, hdr)) == [(1, 17, 1)]
    assert rtp.find_extension(data, hdr, 2) is None
    data = with_block(0x1000, bytes([0x01, 0x01, 0xAA, 0x02]))  # length byte missing
    hdr = parsed(data)
    assert list(rtp.iter_extensions(data, hdr)) == [(1, 18, 1)]
    assert rtp.find_extension(data, hdr, 2) is None
    data = with_block(0x1000, bytes([0x01, 0x09, 0xAA, 0x00]))
    assert rtp.find_extension(data, parsed(data), 1) is None


def test_non_rfc8285_profile_is_opaque() -> None:
    data = with_block(0xABCD, bytes([0x10, 0xAA, 0, 0]))
    hdr = parsed(data)
    assert hdr.has_extension
    assert list(rtp.iter_extensions(data, hdr)) == []
    buf = bytearray(data)
    assert rtp.remap_extension_ids(buf, hdr, {1: 2})
    assert buf == data


# --- id remapping -----------------------------------------------------------------------------

SUB_IDS = {URI_MID: 9, URI_ABS: 2, URI_TCC: 3, URI_LEVEL: 1}  # no RID, different numbers
PUB_TO_SUB = {1: 9, 3: 2, 5: 3, 4: 1}


@pytest.mark.parametrize("as_list", [False, True])
def test_remap_one_byte_for_subscriber(as_list: bool) -> None:
    data = build(
        mid="video",
        rtp_stream_id="h",
        abs_send_time=0x123456,
        audio_level=(False, 40),
        transport_sequence_number=4242,
        padding=5,
    )
    hdr = parsed(data)
    assert hdr.ext_profile == rtp.PROFILE_ONE_BYTE
    buf = bytearray(data)
    mapping = rtp.id_map_list(PUB_TO_SUB) if as_list else PUB_TO_SUB
    assert rtp.remap_extension_ids(buf, hdr, mapping)
    assert len(buf) == len(data)
    assert buf[: hdr.ext_start] == data[: hdr.ext_start]
    assert buf[hdr.ext_end :] == data[hdr.ext_end :]  # payload and padding untouched
    out = parsed(buf)
    assert buf[out.header_len : out.payload_end] == data[hdr.header_len : hdr.payload_end]
    assert rtp.read_sdes_extension(buf, out, 9) == "video"
    assert rtp.read_audio_level(buf, out, 1) == (False, 40)
    assert {i for i, _, _ in rtp.iter_extensions(buf, out)} == {9, 2, 3, 1}
    rid_off, rid_len = rtp.find_extension(data, hdr, 2) or (0, 0)
    assert rid_len == 1
    assert buf[rid_off - 1 : rid_off + rid_len] == b"\x00\x00"
    # The subscriber's stack (aiortc as a stand-in) reads its own ids correctly.
    theirs = artp.RtpPacket.parse(bytes(buf), ext_map(SUB_IDS))
    assert theirs.extensions.mid == "video"
    assert theirs.extensions.abs_send_time == 0x123456
    assert theirs.extensions.transport_sequence_number == 4242
    assert theirs.extensions.audio_level == (False, 40)
    assert theirs.extensions.rtp_stream_id is None
    assert theirs.payload == data[hdr.header_len : hdr.payload_end]


def test_remap_drops_values_by_zeroing_them() -> None:
    data = with_block(0xBEDE, bytes([0x12, 0xAA, 0xBB, 0xCC, 0x20, 0xDD, 0, 0]))
    hdr = parsed(data)
    buf = bytearray(data)
    assert rtp.remap_extension_ids(buf, hdr, {2: 7})
    assert bytes(buf[hdr.ext_start : hdr.ext_end]) == bytes([0, 0, 0, 0, 0x70, 0xDD, 0, 0])
    assert list(rtp.iter_extensions(buf, parsed(buf))) == [(7, 21, 1)]
    # aiortc's parser treats the zeroed bytes as padding too.
    assert artp.unpack_header_extensions(0xBEDE, bytes(buf[16:24])) == [(7, b"\xdd")]


def test_remap_two_byte_form() -> None:
    data = build(mid="m" * 20, transport_sequence_number=99, rtp_stream_id="f")
    hdr = parsed(data)
    assert hdr.ext_profile == rtp.PROFILE_TWO_BYTE
    buf = bytearray(data)
    assert rtp.remap_extension_ids(buf, hdr, {1: 200, 5: 3})
    out = parsed(buf)
    assert buf[out.header_len : out.payload_end] == data[hdr.header_len : hdr.payload_end]
    assert rtp.read_sdes_extension(buf, out, 200) == "m" * 20
    assert element(buf, out, 3) == (99).to_bytes(2, "big")
    assert rtp.find_extension(buf, out, 2) is None
    assert not rtp.remap_extension_ids(bytearray(data), hdr, {1: 256})


def test_remap_zeroes_what_receivers_could_not_parse() -> None:
    data = with_block(0xBEDE, bytes([0x10, 0xAA, 0xF3, 0x20, 0xBB, 0xCC, 0xDD, 0xEE]))
    hdr = parsed(data)
    buf = bytearray(data)
    assert rtp.remap_extension_ids(buf, hdr, {1: 1, 2: 2})
    assert bytes(buf[hdr.ext_start : hdr.ext_end]) == bytes([0x10, 0xAA]) + bytes(6)
    data = with_block(0x1000, bytes([0x01, 0x01, 0xAA, 0x02]))
    buf = bytearray(data)
    assert rtp.remap_extension_ids(buf, parsed(data), [0, 1, 2])
    assert bytes(buf[16:20]) == bytes([0x01, 0x01, 0xAA, 0x00])


def test_remap_zeroes_long_tails_without_resizing() -> None:
    # Found by the fuzzer: a tail longer than any single element must not shrink the buffer.
    data = with_block(0xBEDE, bytes([0x10, 0xAA, 0xF0]) + bytes(range(256)) * 2 + bytes(1))
    hdr = parsed(data)
    buf = bytearray(data)
    assert rtp.remap_extension_ids(buf, hdr, {1: 1})
    assert len(buf) == len(data)
    assert buf[hdr.ext_end :] == b"PAYLOAD!"
    assert not any(buf[hdr.ext_start + 2 : hdr.ext_end])


def test_remap_to_id_above_14_needs_rebuild_into_two_byte_form() -> None:
    data = build(mid="audio", audio_level=(True, 3), padding=2)
    hdr = parsed(data)
    assert not rtp.remap_extension_ids(bytearray(data), hdr, {1: 20, 4: 1})
    rebuilt = rtp.rebuild_extensions(data, hdr, {1: 20, 4: 1}, two_byte=True)
    assert rebuilt is not None
    out = parsed(rebuilt)
    assert out.ext_profile == rtp.PROFILE_TWO_BYTE
    assert rtp.read_sdes_extension(rebuilt, out, 20) == "audio"
    assert rtp.read_audio_level(rebuilt, out, 1) == (True, 3)
    assert rebuilt[out.header_len :] == data[hdr.header_len :]  # payload and padding
    assert rebuilt[1:12] == data[1:12]
    theirs = artp.RtpPacket.parse(bytes(rebuilt), ext_map({URI_MID: 20, URI_LEVEL: 1}))
    assert theirs.extensions.mid == "audio"
    assert theirs.padding_size == 2


def test_rebuild_to_one_byte_and_to_nothing() -> None:
    data = build(mid="m" * 20, rtp_stream_id="q", csrc=[1, 2])
    hdr = parsed(data)
    assert rtp.rebuild_extensions(data, hdr, {1: 1, 2: 2}, two_byte=False) is None  # 20 bytes
    one = rtp.rebuild_extensions(data, hdr, {2: 14}, two_byte=False)
    assert one is not None
    out = parsed(one)
    assert out.ext_profile == rtp.PROFILE_ONE_BYTE
    assert out.csrc_count == 2
    assert rtp.read_sdes_extension(one, out, 14) == "q"
    assert one[12:20] == data[12:20] == struct.pack("!II", 1, 2)  # the CSRC list is kept
    bare = rtp.rebuild_extensions(data, hdr, {}, two_byte=False)
    assert bare is not None
    out = parsed(bare)
    assert not out.has_extension
    assert out.header_len == 20
    assert bare[out.header_len :] == data[hdr.header_len :]
    empty_two = rtp.rebuild_extensions(data, hdr, {1: 0}, two_byte=True)
    assert empty_two is not None
    assert parsed(empty_two).has_extension is False


def test_id_map_list() -> None:
    table = rtp.id_map_list({1: 5, 300: 2, 0: 4})
    assert len(table) == 256
    assert table[1] == 5
    assert table[0] == 0
    assert sum(table) == 5


# --- extension values -------------------------------------------------------------------------


def test_audio_level_rfc6464() -> None:
    data = with_block(0xBEDE, bytes([0x10, 0x80 | 127, 0x20, 0x05]))
    hdr = parsed(data)
    assert rtp.read_audio_level(data, hdr, 1) == (True, 127)
    assert rtp.read_audio_level(data, hdr, 2) == (False, 5)
    assert rtp.read_audio_level(data, hdr, 3) is None
    empty = with_block(0x1000, bytes([0x01, 0x00, 0, 0]))
    assert rtp.read_audio_level(empty, parsed(empty), 1) is None


def test_sdes_strings() -> None:
    data = with_block(0xBEDE, bytes([0x11, ord("0"), 0, 0x21, 0xFF, 0xFE, 0x30, 0x00]))
    hdr = parsed(data)
    assert rtp.read_sdes_extension(data, hdr, 1) == "0"  # cut at the NUL
    assert rtp.read_sdes_extension(data, hdr, 2) is None  # not ASCII
    assert rtp.read_sdes_extension(data, hdr, 3) is None  # empty after the cut
    assert rtp.read_sdes_extension(data, hdr, 4) is None


def test_dependency_descriptor_mandatory_fields() -> None:
    dd = bytes([0x80 | 0x40 | 0x05, 0x12, 0x34, 0xAB, 0xCD])
    data = with_block(0x1000, bytes([0x07, len(dd)]) + dd + bytes(1))
    hdr = parsed(data)
    info = rtp.read_dependency_descriptor(data, hdr, 7)
    assert info == rtp.DependencyDescriptorInfo(True, True, 5, 0x1234, 18, 5)
    short = with_block(0xBEDE, bytes([0x71, 0x80, 0x01, 0]))
    assert rtp.read_dependency_descriptor(short, parsed(short), 7) is None


# --- VP8 payload descriptor (RFC 7741) ----------------------------------------------------


# --- RTX (RFC 4588) -------------------------------------------------------------------------


def test_rtx_round_trip_and_aiortc_agrees() -> None:
    original = build(marker=1, mid="v", padding=9, csrc=[7], seq=40000, payload=b"frame")
    hdr = parsed(original)
    rtx = rtp.build_rtx(original, hdr, rtx_ssrc=0x0A0B0C0D, rtx_seq=70000, rtx_pt=97)
    rhdr = parsed(rtx)
    assert (rhdr.ssrc, rhdr.seq, rhdr.payload_type, rhdr.marker) == (0x0A0B0C0D, 4464, 97, True)
    assert not rhdr.padding
    assert rhdr.timestamp == hdr.timestamp
    assert rtp.unwrap_rtx(rtx, rhdr) == (40000, rhdr.header_len + 2)
    assert rtx[rhdr.header_len + 2 : rhdr.payload_end] == b"frame"
    restored = rtp.rtx_to_original(rtx, rhdr, ssrc=hdr.ssrc, payload_type=hdr.payload_type)
    assert restored is not None
    unpadded = bytearray(original[: hdr.payload_end])
    unpadded[0] &= 0xDF
    assert restored == bytes(unpadded)
    theirs = artp.unwrap_rtx(artp.RtpPacket.parse(rtx, ext_map(PUB_IDS)), 96, hdr.ssrc)
    assert theirs.sequence_number == 40000
    assert theirs.payload == b"frame"
    assert theirs.extensions.mid == "v"
    assert theirs.csrc == [7]
    # And the other way round: aiortc's RTX packet unwraps with ours.
    wrapped = artp.wrap_rtx(artp.RtpPacket.parse(original), 97, 5, 0x99).serialize()
    whdr = parsed(wrapped)
    assert rtp.unwrap_rtx(wrapped, whdr) == (40000, whdr.header_len + 2)


def test_rtx_without_osn() -> None:
    probe = b"\xa0" + bytes(11) + bytes(3) + b"\x04"
    hdr = parsed(probe)
    assert rtp.unwrap_rtx(probe, hdr) is None
    assert rtp.rtx_to_original(probe, hdr, 1, 96) is None
    one = struct.pack("!BBHII", 0x80, 97, 1, 2, 3) + b"\x01"
    assert rtp.unwrap_rtx(one, parsed(one)) is None


# --- sequence numbers -----------------------------------------------------------------------


def test_seq_newer_and_delta() -> None:
    assert rtp.seq_newer(1, 0)
    assert not rtp.seq_newer(0, 1)
    assert rtp.seq_newer(0, 65535)
    assert not rtp.seq_newer(65535, 0)
    assert rtp.seq_newer(100, 65000)
    assert not rtp.seq_newer(5, 5)
    assert rtp.seq_newer(0x8000, 0) != rtp.seq_newer(0, 0x8000)
    assert rtp.seq_delta(0, 65535) == 1
    assert rtp.seq_delta(65535, 0) == -1
    assert rtp.seq_delta(0x8000, 0) == -0x8000
    assert rtp.seq_delta(0x7FFF, 0) == 0x7FFF
    rnd = random.Random(3550)
    for _ in range(2000):
        a, b = rnd.randrange(65536), rnd.randrange(65536)
        if a != b:
            assert rtp.seq_newer(a, b) != rtp.seq_newer(b, a)
        assert (b + rtp.seq_delta(a, b)) & 0xFFFF == a


def test_seq_unwrapper() -> None:
    u = rtp.SeqUnwrapper()
    assert rtp.SeqUnwrapper().highest is None
    assert [u.unwrap(s) for s in (65530, 65535, 3, 65534, 10)] == [
        65530,
        65535,
        65539,
        65534,
        65546,
    ]
    assert u.highest == 65546
    # Many wraps forward, one step at a time.
    u = rtp.SeqUnwrapper()
    ext = [u.unwrap(i & 0xFFFF) for i in range(0, 5 * 65536, 1000)]
    assert ext == list(range(0, 5 * 65536, 1000))
    # Older than the first packet, across the wrap.
    u = rtp.SeqUnwrapper()
    assert u.unwrap(1) == 1
    assert u.unwrap(65535) == -1
    assert u.highest == 1


# --- fuzzing --------------------------------------------------------------------------------


def exercise(data: bytes) -> None:
    hdr = rtp.parse_header(data)
    if hdr is None:
        return
    assert 12 <= hdr.header_len <= hdr.payload_end <= len(data)
    for ext_id, off, length in rtp.iter_extensions(data, hdr):
        assert hdr.ext_start <= off
        assert off + length <= hdr.ext_end
        assert rtp.find_extension(data, hdr, ext_id) is not None
    for ext_id in (1, 2, 3, 14, 15, 200):
        rtp.find_extension(data, hdr, ext_id)
        rtp.read_audio_level(data, hdr, ext_id)
        rtp.read_sdes_extension(data, hdr, ext_id)
        rtp.read_dependency_descriptor(data, hdr, ext_id)
    buf = bytearray(data)
    rtp.remap_extension_ids(buf, hdr, {1: 2, 2: 1, 3: 0, 7: 14, 200: 14})
    assert len(buf) == len(data)
    assert buf[hdr.ext_end :] == data[hdr.ext_end :]
    after = rtp.parse_header(buf)
    assert after is not None
    assert after.payload_end == hdr.payload_end
    for two_byte in (False, True):
        rebuilt = rtp.rebuild_extensions(data, hdr, {1: 1, 2: 5}, two_byte)
        if rebuilt is not None:
            out = rtp.parse_header(rebuilt)
            assert out is not None
            assert rebuilt[out.header_len :] == data[hdr.header_len :]
    rtp.rewrite_header(buf, 1, 2, 3, 4)
    codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
    if rtp.unwrap_rtx(data, hdr) is not None:
        assert rtp.rtx_to_original(data, hdr, 5, 96) is not None
    rtx = rtp.build_rtx(data, hdr, 1, 2, 97)
    assert rtp.parse_header(rtx) is not None


def test_fuzz_never_raises() -> None:
    rnd = random.Random(20_000)
    seeds = [random_packet(rnd)[0] for _ in range(50)]
    seeds += [with_block(0xBEDE, ONE_BYTE_RFC), with_block(0x1000, TWO_BYTE_RFC)]
    accepted = 0
    for i in range(20_000):
        kind = i % 4
        if kind == 0:
            data = bytes([0x80 | rnd.randrange(64)]) + rnd.randbytes(rnd.randrange(40))
        else:
            mutated = bytearray(rnd.choice(seeds))
            for _ in range(rnd.randrange(1, 6)):
                pos = rnd.randrange(min(len(mutated), 48))
                mutated[pos] = rnd.randrange(256)
            if kind == 2:
                del mutated[rnd.randrange(len(mutated) + 1) :]
            elif kind == 3:
                mutated[0] = (mutated[0] & 0xC0) | 0x30 | (mutated[0] & 0x0F)  # force X and P
            data = bytes(mutated)
        exercise(data)
        accepted += rtp.parse_header(data) is not None
    assert 2_000 < accepted < 19_000  # the corpus exercised both verdicts
