"""Bandwidth probes toward one subscriber: padding on top of its media, to learn whether the
path would carry a higher simulcast layer before switching to it.

The estimator (bwe.py) never claims more than 1.5x what was acknowledged, and an SFU that
forwards a low layer acknowledges little. So when the layer allocator finds a subscription
held back by bandwidth alone, it asks for a probe at the estimate that step needs
(`layers.allocate_with_target`, plus PROBE_OVERSHOOT), in steps of at most PROBE_MAX_STEP
times what the subscriber acknowledges now. For PROBE_SECONDS, every timer tick sends
padding-only RTX packets (RFC 4588 allows them; receivers drop them after their transport-cc
numbers are counted) at the difference between that rate and what the subscriber was
acknowledging. The probe fails at the first overuse or heavy loss in the feedback (the
padding stops at once); otherwise, PROBE_SETTLE after the padding ends, if the subscriber
acknowledged at least PROBE_ACK_SHARE of the probe's rate, that rate becomes the estimate's
new floor (`BandwidthEstimator.on_probe`), and the allocator's next round moves the
subscription up.

A failed probe is retried after PROBE_RETRY, doubling up to PROBE_RETRY_MAX; so a link at its
limit sees a short burst of extra queueing every few seconds, and a link whose limit was
lifted is found within PROBE_RETRY_MAX.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from sfu.media.bwe import LOSS_HIGH, OVERUSE, BandwidthEstimator

log = logging.getLogger(__name__)

PROBE_SECONDS: Final = 0.5
PROBE_SETTLE: Final = 0.3  # feedback about the last padding arrives within this
PROBE_OVERSHOOT: Final = 1.15
# A probe asks for at most this multiple of what the subscriber acknowledges now: a path at
# its limit then sees a third more for a few hundred milliseconds, which its queue absorbs,
# not twice as much, which would drop packets. Higher layers are reached in steps.
PROBE_MAX_STEP: Final = 1.5
PROBE_RETRY: Final = 1.0
PROBE_RETRY_MAX: Final = 5.0
PROBE_AFTER_SUCCESS: Final = 0.5
# A probe got through when the subscriber acknowledged at least this share of its rate.
PROBE_ACK_SHARE: Final = 0.9


class Prober:
    """One subscriber transport's probe state; driven by the engine's timer."""

    __slots__ = (
        "_base",
        "_failures",
        "_next_at",
        "_peak",
        "_totals",
        "_updates",
        "active",
        "failed",
        "padding_bytes",
        "started",
        "succeeded",
        "target",
        "until",
    )

    def __init__(self, totals: list[int] | None = None) -> None:
        """`totals`: a shared [started, succeeded, failed, padding bytes] for the metrics."""
        self._totals = totals if totals is not None else [0, 0, 0, 0]
        self.active = False
        self.target = 0.0
        self.until = 0.0
        self._base = 0.0
        self._peak = 0.0
        self._updates = 0
        self._next_at = 0.0
        self._failures = 0
        self.started = 0
        self.succeeded = 0
        self.failed = 0
        self.padding_bytes = 0

    def want(self, target_bps: float, bwe: BandwidthEstimator, now: float) -> bool:
        """The allocator would move a subscription up at `target_bps`: probe for it, unless
        a probe runs, the last one failed too recently, or the estimate already allows it."""
        if self.active or now < self._next_at or target_bps <= bwe.estimate_bps:
            return False
        self._base = bwe.acked_bps or 0.0
        step = max(self._base, bwe.estimate_bps) * PROBE_MAX_STEP
        self.active = True
        self.target = min(target_bps * PROBE_OVERSHOOT, step)
        self.until = now + PROBE_SECONDS
        self._peak = 0.0
        self._updates = bwe.updates
        self.started += 1
        self._totals[0] += 1
        return True

    def tick(
        self, bwe: BandwidthEstimator, now: float, elapsed: float, pad: Callable[[int], int]
    ) -> None:
        """Every timer tick while active: judge the feedback so far, and send `elapsed`
        seconds' worth of padding through `pad` (which returns the bytes it sent)."""
        if not self.active:
            return
        fresh = bwe.updates > self._updates
        if fresh and (bwe.signal == OVERUSE or bwe.loss > LOSS_HIGH):
            self._finish(now, success=False)
            return
        if fresh and bwe.acked_bps is not None:
            self._peak = max(self._peak, bwe.acked_bps)
        if now < self.until:
            rate = self.target - self._base
            if rate > 0.0:
                sent = pad(int(rate * min(elapsed, 0.1) / 8))
                self.padding_bytes += sent
                self._totals[3] += sent
            return
        if now >= self.until + PROBE_SETTLE:
            # Got through: no overuse (checked above), and the subscriber acknowledged about
            # the probe's rate. The estimate goes to the probe's rate, never to a peak a
            # burst (a keyframe, a cache start) happened to make.
            success = self._peak >= PROBE_ACK_SHARE * self.target
            if success:
                bwe.on_probe(self.target)
            self._finish(now, success=success)

    def _finish(self, now: float, *, success: bool) -> None:
        log.debug(
            "probe %s: target %.0f bit/s, acknowledged up to %.0f, from %.0f",
            "succeeded" if success else "failed",
            self.target,
            self._peak,
            self._base,
        )
        self.active = False
        self._totals[1 if success else 2] += 1
        if success:
            self.succeeded += 1
            self._failures = 0
            self._next_at = now + PROBE_AFTER_SUCCESS
        else:
            self.failed += 1
            self._next_at = now + min(PROBE_RETRY * 2**self._failures, PROBE_RETRY_MAX)
            self._failures = min(self._failures + 1, 8)
