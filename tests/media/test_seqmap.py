"""seqmap.py: one outgoing numbering across the source streams it was cut from."""

from __future__ import annotations

from sfu.media.seqmap import MAX_SEGMENTS, SeqMap


def test_a_new_segment_continues_the_numbering_and_the_clock() -> None:
    m: SeqMap[str] = SeqMap()
    seq_offset, ts_offset = m.begin(
        "low", 1, in_seq=500, in_ts=9000, last_out_seq=99, last_out_ts=1000, ts_gap=0
    )
    assert (500 + seq_offset) & 0xFFFF == 100
    assert (9000 + ts_offset) & 0xFFFFFFFF == 1001  # at least one tick forward
    # Switch to another source after 10 packets and 3000 ticks of media.
    seq_offset2, ts_offset2 = m.begin(
        "high",
        2,
        in_seq=65530,
        in_ts=4_294_967_000,
        last_out_seq=109,
        last_out_ts=4001,
        ts_gap=3000,
    )
    assert (65530 + seq_offset2) & 0xFFFF == 110
    assert (4_294_967_000 + ts_offset2) & 0xFFFFFFFF == 7001
    # The map tells which source sent which number.
    low = m.lookup(105)
    high = m.lookup(112)
    assert low is not None
    assert high is not None
    assert (low.source, low.ssrc, SeqMap.source_seq(low, 105)) == ("low", 1, 505)
    assert (high.source, SeqMap.source_seq(high, 112)) == ("high", (65530 + 2) & 0xFFFF)
    assert m.current is high
    assert m.lookup(99) is None  # before anything was sent


def test_numbering_wraps_around() -> None:
    m: SeqMap[str] = SeqMap()
    m.begin("a", 1, in_seq=10, in_ts=0, last_out_seq=65534, last_out_ts=0, ts_gap=1)
    segment = m.lookup(3)  # 65535, 0, 1, 2, 3 were sent by "a"
    assert segment is not None
    assert SeqMap.source_seq(segment, 3) == 14


def test_a_segment_that_never_sent_is_replaced_and_old_ones_are_dropped() -> None:
    m: SeqMap[int] = SeqMap()
    m.begin(1, 1, 0, 0, last_out_seq=10, last_out_ts=0, ts_gap=1)
    m.begin(2, 2, 50, 0, last_out_seq=10, last_out_ts=0, ts_gap=1)  # nothing sent in between
    assert len(m) == 1
    current = m.current
    assert current is not None
    assert current.source == 2
    for i in range(MAX_SEGMENTS + 3):
        m.begin(i, i, 0, 0, last_out_seq=20 + 10 * i, last_out_ts=0, ts_gap=1)
    assert len(m) == MAX_SEGMENTS
    assert m.lookup(25) is None  # forgotten
