"""Which simulcast layer each of one subscriber's video subscriptions gets.

Pure and synchronous: it sees, per subscription, the layers' measured rates, sizes and
whether the publisher is sending them, the size the subscriber renders the track at, and the
subscriber's bandwidth estimate; it returns a layer (or none) per subscription and why.

The rules (docs/architecture.md, "Simulcast"):

1. Size: never more than the subscriber shows. The cap is the smallest layer at least as
   large as the requested size in both dimensions (or the largest, when none is); a request of
   0 x 0 means no video at all. Layers without a known size (no VP8 keyframe seen yet, other
   codecs) are ranked by position: a request up to 320 x 180 gets the lowest layer, up to
   640 x 360 the middle one.
2. Bandwidth: first every subscription, the largest requested size first, gets its lowest
   sending layer; one already flowing is paused only when what is left of the estimate is
   below PAUSE_BELOW of that layer's rate, a paused one resumes only with UP_HEADROOM. Then,
   in the same order, each moves to the highest layer up to its cap that the rest of
   USABLE_SHARE of the estimate pays for. Moving above the layer it has (or is switching to)
   needs UP_HEADROOM more than the layer's rate, so that an estimate hovering at one layer's
   rate does not switch it up and down; and a subscription that recently had to move down
   for bandwidth (`hold_up`) does not move up, nor ask for a probe, until the hold ends.
3. Without an estimate (the subscriber did not negotiate transport-cc), size alone decides.
4. `allocate_with_target` also says which estimate would allow the cheapest step that
   bandwidth holds back: the rate a probe (probe.py) should try.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The largest width or height a subscriber may ask for: more than any camera or screen a
# browser captures, and a bound that keeps the value a small int.
MAX_VIDEO_DIMENSION = 16384
USABLE_SHARE = 0.9
UP_HEADROOM = 1.2
# A flowing subscription is paused only when the estimate left for it falls below this share
# of its lowest layer's rate (resuming needs UP_HEADROOM): no pause on a dip.
PAUSE_BELOW = 0.75
# A sending layer whose rate has not been measured yet counts as at least this (bits/s).
MIN_LAYER_RATE = 30_000.0
# What a layer not measured yet (its first RATE_WINDOW) is assumed to cost, by its position
# from the top: browsers' usual caps for the top three layers. Assuming less would send a
# new subscriber straight to the top layer of a publisher that just started.
DEFAULT_RATES_FROM_TOP = (1_500_000.0, 500_000.0, 150_000.0)
# Without known sizes: the largest request (pixels) each position serves.
RANK_AREAS = (320 * 180, 640 * 360)


@dataclass(frozen=True)
class LayerDemand:
    rates: Sequence[float]  # bits/s per layer, lowest first
    sizes: Sequence[tuple[int, int]]  # (0, 0): not known
    active: Sequence[bool]  # the publisher is sending it
    max_width: int | None  # None: no limit; 0 x 0: no video
    max_height: int | None
    current: int | None  # the layer it forwards or switches to; None: paused
    hold_up: bool = False
    # Each layer's recent peak rate (bits/s): what a move up to it budgets for. Empty: the
    # rates above serve.
    peaks: Sequence[float] = ()


Choice = tuple[int | None, str]


def default_rate(index: int, layers: int) -> float:
    """The assumed rate of layer `index` (lowest first) of `layers`, until measured."""
    from_top = layers - 1 - index
    return DEFAULT_RATES_FROM_TOP[min(from_top, len(DEFAULT_RATES_FROM_TOP) - 1)]


def size_cap(demand: LayerDemand, sending: Sequence[int]) -> int:
    """The highest layer (index) the requested size calls for, among `sending`."""
    if demand.max_width is None or demand.max_height is None:
        return sending[-1]
    want_w, want_h = demand.max_width, demand.max_height
    if all(demand.sizes[i] != (0, 0) for i in sending):
        for i in sending:
            width, height = demand.sizes[i]
            if width >= want_w and height >= want_h:
                return i
        return sending[-1]
    area = want_w * want_h
    for rank, limit in enumerate(RANK_AREAS):
        if area <= limit and rank < len(sending):
            return sending[rank]
    return sending[-1]


def allocate(demands: Sequence[LayerDemand], estimate: float | None) -> list[Choice]:
    """A (layer index or None, reason) per demand; reasons: "size", "bandwidth",
    "publisher" (the layer it had stopped), "start" (nothing is being sent yet)."""
    return _allocate(demands, estimate)[0]


def allocate_with_target(
    demands: Sequence[LayerDemand], estimate: float | None
) -> tuple[list[Choice], float | None]:
    """`allocate`, and the estimate at which it would move some subscription one step up
    (or resume a paused one) when only bandwidth stops it: what a probe should show the
    path carries. None when nothing is held back by bandwidth."""
    return _allocate(demands, estimate)


def _allocate(
    demands: Sequence[LayerDemand], estimate: float | None
) -> tuple[list[Choice], float | None]:
    choices: list[Choice] = [(None, "size")] * len(demands)
    caps: dict[int, tuple[list[int], int]] = {}
    for n, demand in enumerate(demands):
        if demand.max_width == 0 and demand.max_height == 0:
            continue  # the subscriber shows no video for it
        sending = [i for i, on in enumerate(demand.active) if on]
        if not sending:
            # Nothing arrives yet (or the publisher paused every layer): stay, or start low.
            choices[n] = (demand.current if demand.current is not None else 0, "start")
            continue
        caps[n] = (sending, size_cap(demand, sending))
    if estimate is None:
        for n, (sending, cap) in caps.items():
            choices[n] = (cap, _reason(demands[n], cap, cap, sending))
        return choices, None

    def rate(demand: LayerDemand, i: int) -> float:
        return max(demand.rates[i], MIN_LAYER_RATE)

    remaining = estimate
    order = sorted(caps, key=lambda n: -_area(demands[n]))
    picked: dict[int, int] = {}
    steps: list[float] = []  # what each held-back subscription's next step would cost
    for n in order:
        demand = demands[n]
        low = caps[n][0][0]
        cost = rate(demand, low)
        # A flowing subscription keeps its lowest layer down to PAUSE_BELOW of its rate; a
        # paused one resumes only with the headroom a move up needs.
        if demand.current is not None:
            fits = cost * PAUSE_BELOW <= remaining
        else:
            fits = cost * UP_HEADROOM <= remaining * USABLE_SHARE
        if fits:
            picked[n] = low
            remaining -= cost
        elif not demand.hold_up:
            steps.append(cost * UP_HEADROOM)
    budget = remaining - estimate * (1.0 - USABLE_SHARE)
    for n in order:
        if n not in picked:
            continue
        demand = demands[n]
        sending, cap = caps[n]
        have = picked[n]
        for i in sending:
            if i <= have or i > cap:
                continue
            above = demand.current is None or i > demand.current
            if above and demand.hold_up:
                # Held after a move down: no move up, and no probe for one (probes on a link
                # at its limit cost its subscriber frames), until the hold ends.
                break
            cost = rate(demand, i)
            if above and demand.peaks:
                cost = max(cost, demand.peaks[i])
            extra = cost * (UP_HEADROOM if above else 1.0) - rate(demand, have)
            if extra > budget:
                steps.append(extra)
                break
            budget -= rate(demand, i) - rate(demand, have)
            have = i
        picked[n] = have
    for n, (sending, cap) in caps.items():
        index = picked.get(n)
        choices[n] = (index, _reason(demands[n], index, cap, sending))
    if not steps:
        return choices, None
    # What the chosen layers take of the usable share, plus the cheapest next step.
    spent = estimate * USABLE_SHARE - budget
    return choices, (spent + min(steps)) / USABLE_SHARE


def _reason(demand: LayerDemand, index: int | None, cap: int, sending: Sequence[int]) -> str:
    if index is None or index < cap:
        return "bandwidth"
    if demand.current is not None and demand.current not in sending:
        return "publisher"
    return "size" if cap < sending[-1] else "bandwidth"


def _area(demand: LayerDemand) -> float:
    if demand.max_width is None or demand.max_height is None:
        return float("inf")
    return float(demand.max_width * demand.max_height)
