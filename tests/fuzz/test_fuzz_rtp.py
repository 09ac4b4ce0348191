"""RTP (sfu/media/rtp.py): the readers never raise on hostile input, they return None. What
they find, and the rewriters' output, must agree with each other (tests/fuzz/targets.py)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from sfu.media import rtp
from tests.fuzz.strategies import FUZZ, inputs, run_target


@FUZZ
@given(inputs("rtp"))
def test_readers_and_rewriters_hold_on_any_input(data: bytes) -> None:
    run_target("rtp", data)


class Built(NamedTuple):
    """A well-formed packet and what it was built from."""

    data: bytes
    marker: bool
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    csrc_count: int
    elements: list[tuple[int, bytes]]
    payload: bytes


@st.composite
def packets(draw: st.DrawFn) -> Built:
    marker = draw(st.booleans())
    payload_type = draw(st.integers(0, 127))
    seq = draw(st.integers(0, 0xFFFF))
    timestamp = draw(st.integers(0, 0xFFFFFFFF))
    ssrc = draw(st.integers(0, 0xFFFFFFFF))
    cc = draw(st.integers(0, 15))
    two_byte = draw(st.booleans())
    if two_byte:
        element = st.tuples(st.integers(1, 255), st.binary(max_size=40))
    else:
        element = st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16))
    elements = draw(st.lists(element, max_size=6))
    block = bytearray()
    for ext_id, value in elements:
        if two_byte:
            block += bytes((ext_id, len(value)))
        else:
            block.append((ext_id << 4) | (len(value) - 1))
        block += value
    block += bytes(-len(block) % 4)
    payload = draw(st.binary(max_size=100))
    padding = draw(st.integers(0, 30))

    first = 0x80 | (0x10 if elements else 0) | (0x20 if padding else 0) | cc
    head = struct.pack(
        "!BBHII", first, (0x80 if marker else 0) | payload_type, seq, timestamp, ssrc
    )
    head += bytes(4 * cc)
    if elements:
        profile = rtp.PROFILE_TWO_BYTE if two_byte else rtp.PROFILE_ONE_BYTE
        head += struct.pack("!HH", profile, len(block) // 4) + block
    tail = bytes(padding - 1) + bytes((padding,)) if padding else b""
    data = head + payload + tail
    return Built(data, marker, payload_type, seq, timestamp, ssrc, cc, elements, payload)


@FUZZ
@given(packets())
def test_a_built_packet_reads_back_as_built(built: Built) -> None:
    data = built.data
    hdr = rtp.parse_header(data)
    assert hdr is not None
    assert (hdr.marker, hdr.payload_type, hdr.seq, hdr.timestamp, hdr.ssrc, hdr.csrc_count) == (
        built.marker,
        built.payload_type,
        built.seq,
        built.timestamp,
        built.ssrc,
        built.csrc_count,
    )
    assert data[hdr.header_len : hdr.payload_end] == built.payload
    found = [(i, data[o : o + n]) for i, o, n in rtp.iter_extensions(data, hdr)]
    assert found == built.elements
    run_target("rtp", data)
