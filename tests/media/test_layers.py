"""layers.py: which simulcast layer each subscription gets, from sizes, rates and estimate."""

from __future__ import annotations

from sfu.media.layers import (
    UP_HEADROOM,
    USABLE_SHARE,
    LayerDemand,
    allocate,
    allocate_with_target,
)

RATES = (150_000.0, 500_000.0, 1_500_000.0)
SIZES = ((160, 120), (320, 240), (640, 480))


def demand(
    *,
    size: tuple[int, int] | None = None,
    current: int | None = 0,
    active: tuple[bool, ...] = (True, True, True),
    sizes: tuple[tuple[int, int], ...] = SIZES,
    hold_up: bool = False,
) -> LayerDemand:
    return LayerDemand(
        rates=RATES,
        sizes=sizes,
        active=active,
        max_width=None if size is None else size[0],
        max_height=None if size is None else size[1],
        current=current,
        hold_up=hold_up,
    )


def test_without_an_estimate_the_requested_size_decides() -> None:
    choices = allocate(
        [demand(), demand(size=(160, 120)), demand(size=(300, 200)), demand(size=(0, 0))],
        None,
    )
    assert choices == [(2, "bandwidth"), (0, "size"), (1, "size"), (None, "size")]


def test_unknown_sizes_fall_back_to_the_layer_position() -> None:
    unknown = ((0, 0), (0, 0), (0, 0))
    choices = allocate(
        [demand(size=(320, 180), sizes=unknown), demand(size=(640, 360), sizes=unknown)], None
    )
    assert [c[0] for c in choices] == [0, 1]


def test_the_highest_layer_that_fits_the_estimate() -> None:
    assert allocate([demand(current=2)], 2_000_000) == [(2, "bandwidth")]
    assert allocate([demand(current=2)], 1_000_000) == [(1, "bandwidth")]
    assert allocate([demand(current=2)], 300_000) == [(0, "bandwidth")]
    # Not even the lowest layer fits: paused.
    assert allocate([demand(current=2)], 100_000) == [(None, "bandwidth")]


def test_moving_up_needs_headroom_but_staying_does_not() -> None:
    just_enough = RATES[2] / USABLE_SHARE
    assert allocate([demand(current=2)], just_enough)[0][0] == 2
    assert allocate([demand(current=1)], just_enough)[0][0] == 1
    assert allocate([demand(current=1)], just_enough * UP_HEADROOM * 1.01)[0][0] == 2
    # Held after a move down for bandwidth: no move up, however much there is, and no probe.
    choices, target = allocate_with_target([demand(current=1, hold_up=True)], 10_000_000)
    assert choices[0][0] == 1
    assert target is None


def test_the_estimate_is_shared_larger_tiles_first_and_everyone_gets_a_low_layer() -> None:
    spotlight = demand(size=(640, 480), current=0)
    thumbs = [demand(size=(160, 120), current=0) for _ in range(3)]
    budget = (RATES[2] + 3 * RATES[0]) / USABLE_SHARE * UP_HEADROOM * 1.01
    choices = allocate([*thumbs, spotlight], budget)
    assert [c[0] for c in choices] == [0, 0, 0, 2]
    # Less: the spotlight drops a layer, the thumbnails keep theirs.
    choices = allocate([*thumbs, spotlight], (RATES[1] + 3 * RATES[0]) / USABLE_SHARE * 1.3)
    assert [c[0] for c in choices] == [0, 0, 0, 1]


def test_layers_the_publisher_stopped_are_not_chosen() -> None:
    choices = allocate([demand(current=2, active=(True, True, False))], 10_000_000)
    assert choices == [(1, "publisher")]
    assert allocate([demand(current=None, active=(False, False, False))], None) == [(0, "start")]


def test_a_move_up_budgets_for_the_layers_recent_peak() -> None:
    # The top layer was throttled by its sender for a moment: 300 kbit/s now, 1.5 Mbit/s at
    # its recent peak. A move up to it must budget for the peak, staying need not.
    throttled = LayerDemand(
        rates=(150_000.0, 500_000.0, 300_000.0),
        sizes=SIZES,
        active=(True, True, True),
        max_width=None,
        max_height=None,
        current=1,
        peaks=(150_000.0, 500_000.0, 1_500_000.0),
    )
    assert allocate([throttled], 1_200_000)[0][0] == 1
    assert allocate([throttled], 2_500_000)[0][0] == 2
