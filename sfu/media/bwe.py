"""Send-side bandwidth estimation toward one subscriber, from its transport-wide feedback.

In the spirit of Google Congestion Control (draft-ietf-rmcat-gcc-02), written for a sender
that does not choose its own rate: the SFU forwards whatever layer it picked, usually well
below what the path could carry, so the estimate says "sending this much showed no sign of
congestion" rather than "this much was measured to get through".

Two estimators, and the estimate is the smaller, within [MIN_BPS, MAX_BPS]:

- **Delay-based.** Packets sent within BURST_SECONDS of each other form a group. For each
  pair of consecutive groups, the variation of their one-way delay (arrival spacing minus
  send spacing) is accumulated, smoothed, and a least-squares line is fitted to the last
  TREND_WINDOW points against arrival time: a positive slope means a queue is building.
  The slope, scaled by TREND_GAIN and the number of samples (up to 60), is compared with an
  adaptive threshold (starts at 12.5 ms, follows |trend| up quickly and down slowly, kept
  within 6-600 ms) so that competing TCP flows do not starve us. A trend above it for more
  than OVERUSE_SECONDS (and two groups in a row, still rising) is *overuse*: the estimate
  drops to BETA x the acknowledged rate (what the subscriber reported receiving over the
  last ACK_WINDOW seconds). Below minus the threshold is *underuse*: queues are draining,
  hold. Otherwise *normal*: increase by INCREASE_PER_SECOND (8 %/s, multiplicative), or
  additively (one packet per response time) while within three deviations of the rate
  where overuse was last found.
- **Loss-based.** Over windows of at least LOSS_MIN_PACKETS reported packets and
  LOSS_MIN_SECONDS: above 10 % lost, the estimate becomes estimate x (1 - 0.5 x loss);
  below 2 % the loss-based cap rises 5 % per window; in between, hold.

The increase is capped at ACKED_CAP (1.5) times the acknowledged rate, as in GCC: sending
200 kbit/s without congestion says nothing about whether 2 Mbit/s would get through. An SFU
forwards whatever layer it picked, usually well below what the path could carry, so the
estimate is raised beyond that cap only by a probe (probe.py): padding sent on top of the
media at the rate a higher layer needs; when it gets through without overuse or loss,
`on_probe` lifts the estimate to the rate that was acknowledged during the probe.

Start value: START_BPS = 300 kbit/s (GCC's own start), enough for a lowest simulcast layer
plus audio on nearly any connection; higher layers wait for a probe to show room for them.
A subscriber whose packets carry no transport-cc slot (its publishers do not send
transport-cc: aiortc, for one) gets no numbers and sends no feedback, so its estimate
stays at START_BPS.

Everything is synchronous and pure: `on_feedback` takes a batch of per-packet results and
the current time (an injectable clock by default) and allocates nothing per packet.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Final

from sfu.media.twcc import PacketResult

log = logging.getLogger(__name__)

START_BPS: Final = 300_000.0
MIN_BPS: Final = 30_000.0
MAX_BPS: Final = 20_000_000.0

# Delay-based detector.
BURST_SECONDS: Final = 0.005  # packets sent this close together form one group
TREND_WINDOW: Final = 20  # points in the least-squares fit
TREND_SMOOTHING: Final = 0.9  # weight of the previous smoothed accumulated delay
TREND_GAIN: Final = 4.0
TREND_MAX_SAMPLES: Final = 60  # the slope is scaled by min(samples, this)
THRESHOLD_START_MS: Final = 12.5
THRESHOLD_MIN_MS: Final = 6.0
THRESHOLD_MAX_MS: Final = 600.0
# Threshold adaptation per ms: towards |trend| when it is above the threshold, back down
# when below (draft-ietf-rmcat-gcc-02 section 5.4: K_u, K_d).
THRESHOLD_UP: Final = 0.01
THRESHOLD_DOWN: Final = 0.00018
# A |trend| this far above the threshold (ms) is a spike, which does not move it.
THRESHOLD_SPIKE_MS: Final = 15.0
OVERUSE_SECONDS: Final = 0.010
# A delay variation this far off (both clocks jumping, a reference-time wrap) restarts the
# detector rather than feeding it.
MAX_DELTA_SECONDS: Final = 3.0

# Rate control.
BETA: Final = 0.85
INCREASE_PER_SECOND: Final = 1.08
# Increases stop at this multiple of the acknowledged rate (probes go beyond it).
ACKED_CAP: Final = 1.5
ACK_WINDOW: Final = 0.5  # seconds of arrivals the acknowledged rate is measured over
ACK_MIN_SPAN: Final = 0.1  # a shorter span says nothing reliable about a rate
PACKET_BITS: Final = 1200 * 8  # the additive step: one full packet per response time
DEFAULT_RTT: Final = 0.1

# Loss-based.
LOSS_HIGH: Final = 0.10
LOSS_LOW: Final = 0.02
LOSS_INCREASE: Final = 1.05
LOSS_MIN_PACKETS: Final = 20
LOSS_MIN_SECONDS: Final = 0.2
# After a loss-based decrease, the next one waits a round trip plus this (libwebrtc's rule):
# the losses right after a cut still belong to the rate before it.
LOSS_DECREASE_HOLD: Final = 0.3

# Per-feedback aggregates kept for the acknowledged rate (feedback comes every 50-100 ms).
_ACK_SLOTS: Final = 32

NORMAL: Final = "normal"
OVERUSE: Final = "overuse"
UNDERUSE: Final = "underuse"


class BandwidthEstimator:
    """One subscriber transport's estimate. Read `estimate_bps`; feed `on_feedback`."""

    __slots__ = (
        "_accumulated",
        "_ack_bytes",
        "_ack_first",
        "_ack_last",
        "_ack_next",
        "_capacity",
        "_capacity_dev",
        "_first_arrival",
        "_group_arrival",
        "_group_first_send",
        "_group_last_send",
        "_last_update",
        "_loss_cut_at",
        "_loss_lost",
        "_loss_since",
        "_loss_total",
        "_overuse_count",
        "_overuse_time",
        "_points",
        "_prev_arrival",
        "_prev_send",
        "_prev_trend",
        "_samples",
        "_smoothed",
        "_threshold_at",
        "_xs",
        "_ys",
        "acked_bps",
        "clock",
        "delay_bps",
        "estimate_bps",
        "loss",
        "loss_bps",
        "max_bps",
        "min_bps",
        "rtt",
        "signal",
        "threshold_ms",
        "trend",
        "updates",
    )

    def __init__(
        self,
        start_bps: float = START_BPS,
        *,
        min_bps: float = MIN_BPS,
        max_bps: float = MAX_BPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.min_bps = min_bps
        self.max_bps = max_bps
        start = min(max(start_bps, min_bps), max_bps)
        self.estimate_bps = start
        self.delay_bps = start
        self.loss_bps = max_bps
        # What the subscriber reported receiving over the last ACK_WINDOW (None: unknown).
        self.acked_bps: float | None = None
        # Fraction lost in the last completed loss window.
        self.loss = 0.0
        # Round-trip time (s); the transport updates it from receiver reports.
        self.rtt = DEFAULT_RTT
        self.signal = NORMAL
        self.trend = 0.0
        self.threshold_ms = THRESHOLD_START_MS
        self.updates = 0
        self._last_update: float | None = None
        # The group being collected, and the last complete one (send times on our clock,
        # arrival times on the subscriber's; -1: none).
        self._group_first_send = -1.0
        self._group_last_send = -1.0
        self._group_arrival = -1.0
        self._prev_send = -1.0
        self._prev_arrival = -1.0
        # Trendline state (ms).
        self._first_arrival = -1.0
        self._accumulated = 0.0
        self._smoothed = 0.0
        self._samples = 0
        self._xs = array("d", [0.0]) * TREND_WINDOW
        self._ys = array("d", [0.0]) * TREND_WINDOW
        self._points = 0
        self._prev_trend = 0.0
        self._overuse_time = -1.0
        self._overuse_count = 0
        self._threshold_at = -1.0
        # Rate where overuse was last found (bps), and its relative deviation.
        self._capacity = -1.0
        self._capacity_dev = 0.1
        # Acknowledged-rate ring: per feedback, first and last arrival and bytes received.
        self._ack_first = array("d", [0.0]) * _ACK_SLOTS
        self._ack_last = array("d", [0.0]) * _ACK_SLOTS
        self._ack_bytes = array("d", [0.0]) * _ACK_SLOTS
        self._ack_next = 0
        # Loss window.
        self._loss_lost = 0
        self._loss_total = 0
        self._loss_since: float | None = None
        self._loss_cut_at = -1e9

    # -- input -------------------------------------------------------------------------------

    def on_feedback(self, packets: Sequence[PacketResult], now: float | None = None) -> float:
        """Results of one feedback packet, in transport-wide order: (send time, arrival time
        or None if lost, size in bytes). Returns the new estimate (bps)."""
        if now is None:
            now = self.clock()
        first_arrival = -1.0
        last_arrival = -1.0
        received_bytes = 0
        lost = 0
        signal = self.signal
        for send, arrival, size in packets:
            if arrival is None:
                lost += 1
                continue
            received_bytes += size
            if first_arrival < 0.0:
                first_arrival = arrival
            last_arrival = max(last_arrival, arrival)
            detected = self._on_packet(send, arrival)
            if detected is not None:
                signal = detected
        if received_bytes:
            self._record_ack(first_arrival, last_arrival, received_bytes)
        self._update_loss(lost, len(packets), now)
        self._update_delay(signal, now)
        self.estimate_bps = min(max(min(self.delay_bps, self.loss_bps), self.min_bps), self.max_bps)
        self.updates += 1
        return self.estimate_bps

    # -- delay-based detector ----------------------------------------------------------------

    def _on_packet(self, send: float, arrival: float) -> str | None:
        """Group packets by send time; each completed group against the previous one gives
        one delay-variation sample. Returns the detector's signal when a sample was made."""
        first = self._group_first_send
        if first < 0.0:
            self._start_group(send, arrival)
            return None
        if send < first:
            return None  # sent before the current group: reordered in our own log
        if send - first <= BURST_SECONDS:
            self._group_last_send = max(self._group_last_send, send)
            self._group_arrival = max(self._group_arrival, arrival)
            return None
        signal: str | None = None
        if self._prev_send >= 0.0:
            send_delta = self._group_last_send - self._prev_send
            arrival_delta = self._group_arrival - self._prev_arrival
            if abs(arrival_delta - send_delta) > MAX_DELTA_SECONDS:
                self._reset_detector()
            else:
                signal = self._on_delta(send_delta, arrival_delta, self._group_arrival)
        self._prev_send = self._group_last_send
        self._prev_arrival = self._group_arrival
        self._start_group(send, arrival)
        return signal

    def _start_group(self, send: float, arrival: float) -> None:
        self._group_first_send = send
        self._group_last_send = send
        self._group_arrival = arrival

    def _reset_detector(self) -> None:
        self._first_arrival = -1.0
        self._accumulated = self._smoothed = 0.0
        self._samples = self._points = 0
        self._overuse_time = -1.0
        self._overuse_count = 0
        self._prev_trend = 0.0

    def _on_delta(self, send_delta: float, arrival_delta: float, arrival: float) -> str:
        """One inter-group delay variation: update the trendline and compare it with the
        adaptive threshold."""
        arrival_ms = arrival * 1000.0
        if self._first_arrival < 0.0:
            self._first_arrival = arrival_ms
        self._samples = min(self._samples + 1, 1000)
        self._accumulated += (arrival_delta - send_delta) * 1000.0
        self._smoothed = (
            TREND_SMOOTHING * self._smoothed + (1.0 - TREND_SMOOTHING) * self._accumulated
        )
        slot = self._points % TREND_WINDOW
        self._xs[slot] = arrival_ms - self._first_arrival
        self._ys[slot] = self._smoothed
        self._points += 1
        trend = self._slope()
        self.trend = trend * min(self._samples, TREND_MAX_SAMPLES) * TREND_GAIN
        return self._detect(self.trend, send_delta * 1000.0, arrival_ms)

    def _slope(self) -> float:
        """Least-squares slope of the window's points (0 until it is full)."""
        if self._points < TREND_WINDOW:
            return 0.0
        xs, ys = self._xs, self._ys
        mean_x = sum(xs) / TREND_WINDOW
        mean_y = sum(ys) / TREND_WINDOW
        num = 0.0
        den = 0.0
        for i in range(TREND_WINDOW):
            dx = xs[i] - mean_x
            num += dx * (ys[i] - mean_y)
            den += dx * dx
        return num / den if den > 0.0 else 0.0

    def _detect(self, trend: float, send_delta_ms: float, arrival_ms: float) -> str:
        threshold = self.threshold_ms
        signal = NORMAL
        if self._samples >= 2 and trend > threshold:
            # Overuse only once it has lasted: one noisy group must not halve the rate.
            if self._overuse_time < 0.0:
                self._overuse_time = send_delta_ms / 2.0
            else:
                self._overuse_time += send_delta_ms
            self._overuse_count += 1
            if (
                self._overuse_time > OVERUSE_SECONDS * 1000.0
                and self._overuse_count > 1
                and trend >= self._prev_trend
            ):
                self._overuse_time = 0.0
                self._overuse_count = 0
                signal = OVERUSE
            else:
                signal = self.signal if self.signal == OVERUSE else NORMAL
        elif self._samples >= 2 and trend < -threshold:
            self._overuse_time = -1.0
            self._overuse_count = 0
            signal = UNDERUSE
        else:
            self._overuse_time = -1.0
            self._overuse_count = 0
        self._prev_trend = trend
        self._adapt_threshold(trend, arrival_ms)
        self.signal = signal
        return signal

    def _adapt_threshold(self, trend: float, arrival_ms: float) -> None:
        """The threshold follows |trend|: quickly up (so a competing loss-based flow, which
        keeps queues full, does not make us back off for ever), slowly down."""
        if self._threshold_at < 0.0:
            self._threshold_at = arrival_ms
        magnitude = abs(trend)
        if magnitude > self.threshold_ms + THRESHOLD_SPIKE_MS:
            # A spike (a route change, a burst): not a reason to move the threshold.
            self._threshold_at = arrival_ms
            return
        gain = THRESHOLD_UP if magnitude > self.threshold_ms else THRESHOLD_DOWN
        elapsed = min(max(arrival_ms - self._threshold_at, 0.0), 100.0)
        self.threshold_ms += gain * (magnitude - self.threshold_ms) * elapsed
        self.threshold_ms = min(max(self.threshold_ms, THRESHOLD_MIN_MS), THRESHOLD_MAX_MS)
        self._threshold_at = arrival_ms

    # -- acknowledged rate -------------------------------------------------------------------

    def _record_ack(self, first: float, last: float, size: int) -> None:
        slot = self._ack_next % _ACK_SLOTS
        self._ack_first[slot] = first
        self._ack_last[slot] = last
        self._ack_bytes[slot] = float(size)
        self._ack_next += 1
        newest = last
        start = last
        total = 0.0
        for back in range(min(self._ack_next, _ACK_SLOTS)):
            i = (self._ack_next - 1 - back) % _ACK_SLOTS
            if newest - self._ack_last[i] > ACK_WINDOW:
                break
            start = min(start, self._ack_first[i])
            total += self._ack_bytes[i]
        span = newest - start
        if span >= ACK_MIN_SPAN:
            self.acked_bps = total * 8.0 / span

    # -- rate control ------------------------------------------------------------------------

    def _update_delay(self, signal: str, now: float) -> None:
        last = self._last_update
        self._last_update = now
        if signal == OVERUSE:
            base = self.acked_bps if self.acked_bps is not None else self.estimate_bps
            log.debug(
                "bwe: overuse (trend %.1f ms over threshold %.1f), acknowledged %.0f bit/s",
                self.trend,
                self.threshold_ms,
                base,
            )
            decreased = BETA * base
            self._note_capacity(base)
            # Never an increase by way of a decrease (the acknowledged rate can exceed the
            # estimate: the SFU does not pace to it).
            self.delay_bps = max(min(decreased, self.delay_bps), self.min_bps)
            return
        if signal == UNDERUSE or last is None:
            return  # queues are draining: hold
        elapsed = min(max(now - last, 0.0), 1.0)
        if elapsed == 0.0:
            return
        current = self.delay_bps
        capacity = self._capacity
        if capacity > 0.0 and abs(current - capacity) <= 3.0 * self._capacity_dev * capacity:
            # Near where overuse was found last: creep up by a packet per response time
            # instead of 8 %/s, which would overshoot straight back into the queue.
            response = self.rtt + 0.1
            increased = current + max(1000.0, PACKET_BITS / response) * elapsed
        else:
            increased = current * math.pow(INCREASE_PER_SECOND, elapsed)
        # Limited by loss, the delay-based estimate waits for the loss-based one rather than
        # running ahead unchecked; and it claims no more than ACKED_CAP x what got through.
        ceiling = max(self.loss_bps, current)
        if self.acked_bps is not None:
            ceiling = min(ceiling, max(ACKED_CAP * self.acked_bps, current))
        self.delay_bps = min(increased, ceiling, self.max_bps)

    def _note_capacity(self, rate: float) -> None:
        if self._capacity < 0.0:
            self._capacity = rate
            return
        deviation = abs(rate - self._capacity) / max(self._capacity, 1.0)
        self._capacity = 0.95 * self._capacity + 0.05 * rate
        self._capacity_dev = min(max(0.95 * self._capacity_dev + 0.05 * deviation, 0.05), 0.5)

    # -- loss-based --------------------------------------------------------------------------

    def _update_loss(self, lost: int, total: int, now: float) -> None:
        if self._loss_since is None:
            self._loss_since = now
        self._loss_lost += lost
        self._loss_total += total
        if self._loss_total < LOSS_MIN_PACKETS or now - self._loss_since < LOSS_MIN_SECONDS:
            return
        loss = self._loss_lost / self._loss_total
        self.loss = loss
        self._loss_lost = self._loss_total = 0
        self._loss_since = now
        if loss > LOSS_HIGH:
            if now - self._loss_cut_at < self.rtt + LOSS_DECREASE_HOLD:
                return
            self._loss_cut_at = now
            self.loss_bps = max(self.estimate_bps * (1.0 - 0.5 * loss), self.min_bps)
        elif loss < LOSS_LOW:
            self.loss_bps = min(max(self.loss_bps, self.estimate_bps) * LOSS_INCREASE, self.max_bps)

    # -- probes ------------------------------------------------------------------------------

    def on_probe(self, bps: float) -> float:
        """A probe at `bps` got through without overuse or loss: the path carries at least
        that much, whatever the cap on increases says."""
        bps = min(max(bps, self.min_bps), self.max_bps)
        self.delay_bps = max(self.delay_bps, bps)
        self.loss_bps = max(self.loss_bps, bps)
        self.estimate_bps = min(max(min(self.delay_bps, self.loss_bps), self.min_bps), self.max_bps)
        return self.estimate_bps
