"""The SFU's own loss detection on a publisher's stream (sfu/media/nackgen.py)."""

from __future__ import annotations

from sfu.media.nackgen import (
    INITIAL_RTT,
    MAX_GAP,
    MAX_MISSING,
    MAX_TRIES,
    NACK_MAX_AGE,
    NackGenerator,
)


def feed(gen: NackGenerator, seqs: list[int], now: float = 10.0) -> list[list[int]]:
    asked = []
    for seq in seqs:
        due = gen.on_packet(seq, now)
        if due is not None:
            asked.append(due)
    return asked


def test_an_unbroken_stream_asks_for_nothing() -> None:
    gen = NackGenerator()
    assert feed(gen, [*range(65500, 65536), *range(100)]) == []
    assert gen.missing == {}


def test_a_gap_is_asked_for_at_the_next_packet_and_not_again_within_a_round_trip() -> None:
    gen = NackGenerator()
    assert feed(gen, [1, 2, 3, 6]) == [[4, 5]]
    assert gen.tracking(4)
    assert gen.tracking(5)
    assert feed(gen, [7, 8], now=10.0 + INITIAL_RTT) == []


def test_a_repair_ends_the_requests_and_gives_a_round_trip_sample() -> None:
    gen = NackGenerator()
    feed(gen, [1, 3])
    assert gen.on_packet(2, 10.04) is None
    assert not gen.tracking(2)
    assert abs(gen.rtt - (0.875 * INITIAL_RTT + 0.125 * 0.04)) < 1e-9
    # Later packets, even much later, ask for nothing more.
    assert feed(gen, [4, 5], now=10.5) == []


def test_an_unrepaired_packet_is_asked_for_a_few_times_then_given_up() -> None:
    gen = NackGenerator()
    now = 10.0
    asks = feed(gen, [1, 3], now)
    seq = 4
    while now < 10.0 + NACK_MAX_AGE:
        now += 0.01
        asks += feed(gen, [seq], now)
        seq += 1
    assert asks == [[2]] * MAX_TRIES
    assert not gen.tracking(2)


def test_a_packet_older_than_any_jitter_buffer_could_use_is_not_asked_for() -> None:
    gen = NackGenerator()
    feed(gen, [1, 3])
    assert gen.on_packet(4, 10.0 + NACK_MAX_AGE + 0.01) is None
    assert not gen.tracking(2)


def test_numbers_wrap() -> None:
    gen = NackGenerator()
    assert feed(gen, [65533, 1]) == [[65534, 65535, 0]]


def test_a_jump_larger_than_any_loss_to_repair_is_not_asked_for() -> None:
    gen = NackGenerator()
    feed(gen, [1, 3])  # 2 is being asked for
    assert gen.on_packet(3 + MAX_GAP + 1, 10.0) is None
    assert gen.missing == {}
    assert feed(gen, [3 + MAX_GAP + 2]) == []


def test_late_duplicate_and_reordered_packets_ask_for_nothing() -> None:
    gen = NackGenerator()
    assert feed(gen, [10, 11, 11, 9, 12]) == []


def test_a_restarted_stream_starts_afresh() -> None:
    gen = NackGenerator()
    feed(gen, [1, 3])
    gen.reset()
    assert not gen.tracking(2)
    assert feed(gen, [40000, 40001]) == []


def test_a_publisher_sending_only_jumps_cannot_grow_the_table() -> None:
    gen = NackGenerator()
    seqs = [MAX_GAP * i for i in range(50)]  # every jump just small enough to be loss
    asked = feed(gen, seqs)
    assert len(gen.missing) <= MAX_MISSING
    assert all(len(one) <= MAX_MISSING for one in asked)
    # The newest gaps are the ones kept.
    assert gen.tracking(seqs[-1] - 1)
    assert not gen.tracking(1)
