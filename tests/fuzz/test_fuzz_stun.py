"""STUN (sfu/media/stun.py): parse() and the value accessors raise StunError and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfu.media import stun
from tests.fuzz.strategies import FUZZ, inputs, run_target

KEY = b"the-sfu-ice-password-0123"
ATTRIBUTE_TYPES = (
    stun.ATTR_USERNAME,
    stun.ATTR_PRIORITY,
    stun.ATTR_ICE_CONTROLLING,
    stun.ATTR_SOFTWARE,
    0x7FFF,
)
SIZES = {stun.ATTR_PRIORITY: 4, stun.ATTR_ICE_CONTROLLING: 8}


@st.composite
def attributes(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    out = []
    for attr_type in draw(st.lists(st.sampled_from(ATTRIBUTE_TYPES), max_size=5)):
        size = SIZES.get(attr_type)
        if size is None:
            out.append((attr_type, draw(st.binary(max_size=40))))
        else:
            out.append((attr_type, draw(st.binary(min_size=size, max_size=size))))
    return out


@FUZZ
@given(inputs("stun"))
def test_only_stun_error_escapes(data: bytes) -> None:
    run_target("stun", data)


@FUZZ
@given(attributes(), st.binary(min_size=12, max_size=12), st.booleans())
def test_what_encode_writes_parses_back(
    attrs: list[tuple[int, bytes]], tid: bytes, fingerprint: bool
) -> None:
    data = stun.encode(stun.BINDING_REQUEST, tid, attrs, integrity_key=KEY, fingerprint=fingerprint)
    msg = stun.parse(data)
    assert msg.transaction_id == tid
    assert msg.check_integrity(KEY)
    assert not msg.check_integrity(KEY + b"x")
    assert msg.check_fingerprint() is fingerprint
    first: dict[int, bytes] = {}
    for attr_type, value in attrs:
        first.setdefault(attr_type, value)
    assert msg.attribute_types() == list(first)
    for attr_type, value in first.items():
        assert msg.get(attr_type) == value


@FUZZ
@given(attributes(), st.data())
def test_every_truncation_is_refused(attrs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    message = stun.encode(stun.BINDING_SUCCESS, bytes(12), attrs, integrity_key=KEY)
    cut = data.draw(st.integers(0, len(message) - 1))
    with pytest.raises(stun.StunError):
        stun.parse(message[:cut])
