"""RTCP (sfu/media/rtcp.py) and transport-wide CC feedback (sfu/media/twcc.py): neither parser
raises; parse_rtcp says ok=False and parse_transport_feedback returns None for what is
malformed, and the two agree on the feedback packets they both read."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from sfu.media import rtcp, twcc
from tests.fuzz.strategies import FUZZ, inputs, run_target

# A TWCC header whose length field (0 words) ends the packet before its own fixed fields,
# followed by 16 bytes of something else. parse_transport_feedback used to read those as its
# fields and accept the packet, which parse_rtcp rightly refuses.
SHORT_TWCC = bytes.fromhex("8fcd0000") + bytes(16)


@FUZZ
@given(inputs("rtcp"))
@example(SHORT_TWCC)
def test_parsers_never_raise_and_agree(data: bytes) -> None:
    run_target("rtcp", data)


def test_feedback_whose_length_field_excludes_its_fixed_fields_is_refused() -> None:
    assert twcc.parse_transport_feedback(SHORT_TWCC) is None
    assert rtcp.parse_rtcp(SHORT_TWCC) == ([], False)


@FUZZ
@given(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=200),
)
def test_a_nack_reads_back_as_the_numbers_it_was_built_from(
    sender: int, media: int, lost: list[int]
) -> None:
    packets, ok = rtcp.parse_rtcp(rtcp.build_nack(sender, media, lost))
    assert ok
    (nack,) = packets
    assert isinstance(nack, rtcp.Nack)
    assert (nack.sender_ssrc, nack.media_ssrc) == (sender, media)
    assert set(nack.seqs) == set(lost)
