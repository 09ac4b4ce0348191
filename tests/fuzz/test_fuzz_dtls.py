"""DTLS (sfu/media/dtls.py): the record splitter returns None for anything that is not whole
records, and DtlsServer.feed() never raises: it counts a malformed datagram, or fails the
handshake, and only ever sends whole records within the MTU."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from sfu.media import dtls
from tests.fuzz.strategies import FUZZ, inputs, run_target


@FUZZ
@given(inputs("dtls"))
def test_splitter_and_server_take_any_datagram(data: bytes) -> None:
    run_target("dtls", data)


records = st.builds(
    lambda kind, epoch, seq, body: (
        struct.pack("!BHH", kind, 0xFEFD, epoch)
        + seq.to_bytes(6)
        + struct.pack("!H", len(body))
        + body
    ),
    st.integers(20, 63),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**48 - 1),
    st.binary(max_size=300),
)


@FUZZ
@given(st.lists(records, min_size=1, max_size=8), st.integers(13, 1500))
def test_records_split_and_pack_back_whole(parts: list[bytes], mtu: int) -> None:
    data = b"".join(parts)
    assert dtls._split_records(data) == parts
    datagrams = dtls._pack_datagrams(data, mtu)
    assert b"".join(datagrams) == data
    for datagram in datagrams:
        inside = dtls._split_records(datagram)
        assert inside is not None
        assert len(datagram) <= mtu or len(inside) == 1
    # Cutting the last record short leaves a tail that is not a record.
    assert dtls._split_records(data[:-1]) is None
