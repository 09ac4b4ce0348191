"""Simulcast (RFC 8853): one published video track sent as up to three layers, and a
subscriber's copy that forwards one layer at a time.

Each layer is an ordinary `Producer` (its own SSRC learnt from the RID header extension, its
own NACK ring, keyframe cache and route), so the router's loop and the native core forward a
layer exactly as any track. A `SimulcastProducer` groups the layers for the control plane,
which sees one track. A `SimulcastDownTrack` is one `Copy` record that sits in the route of
the layer it currently forwards; switching layers moves the record to another route at a
keyframe of the new layer, with the sequence map (seqmap.py) keeping the subscriber's
numbering and clock continuous. Layer choice never reads the encrypted frame: keyframes come
from the payload descriptor (codecs.py), sizes from the clear prefix of VP8 keyframes, rates
from byte counts (docs/architecture.md, "Simulcast").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from sfu.media.downtrack import DownTrack, PacketSink
from sfu.media.envelope import STATE_ENCRYPTED, STATE_PLAINTEXT, STATE_UNKNOWN
from sfu.media.layers import LayerDemand, allocate_with_target, default_rate
from sfu.media.producer import Producer, TrackCodec
from sfu.media.rtp import RtpHeader

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# A layer that sent nothing for this long is taken as paused by the publisher (browsers stop
# their top layers when their own estimate is low) and is not chosen.
LAYER_IDLE = 1.5

# Why a subscription's layer changed (sfu_simulcast_layer_switches_total{reason}).
REASON_BANDWIDTH = "bandwidth"
# While a switch waits for the target layer's keyframe, it is asked for again this often.
SWITCH_KEYFRAME_RETRY = 1.0


class EnvelopeSummary:
    """The E2EE verdict of a simulcast track: plaintext if any layer is judged so,
    encrypted if some layer is and none plaintext."""

    __slots__ = ("_layers",)

    def __init__(self, layers: Sequence[Producer]) -> None:
        self._layers = layers

    @property
    def state(self) -> str:
        states = {layer.envelope.state for layer in self._layers}
        if STATE_PLAINTEXT in states:
            return STATE_PLAINTEXT
        if STATE_ENCRYPTED in states:
            return STATE_ENCRYPTED
        return STATE_UNKNOWN


class SimulcastProducer:
    """One published video track made of layers (lowest first), as the control plane sees
    it: the same members it reads of a `Producer`."""

    kind = "video"

    def __init__(
        self,
        producer_id: str,
        mid: str,
        codec: TrackCodec,
        ext_ids: dict[str, int],
        rids: Sequence[str],
        make_layer: Callable[[str, str], Producer],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = producer_id
        self.mid = mid
        self.codec = codec
        self.ext_ids = ext_ids
        self.clock = clock
        self.layers = [make_layer(f"{producer_id}:{rid}", rid) for rid in rids]
        for layer in self.layers:
            layer.group = self
            layer.on_policy_violation = self._layer_violation
        self.by_rid = {layer.rid: layer for layer in self.layers}
        self.downtracks: list[SimulcastDownTrack] = []
        self.envelope = EnvelopeSummary(self.layers)
        self.on_policy_violation: Callable[[SimulcastProducer, str], None] | None = None
        self.closed = False
        self._e2ee_required = False

    # -- what the control plane reads of any track -------------------------------------------

    @property
    def ssrc(self) -> int | None:
        return next((layer.ssrc for layer in self.layers if layer.ssrc is not None), None)

    @property
    def rtx_ssrc(self) -> int | None:
        return None

    @property
    def rids(self) -> list[str]:
        return [layer.rid or "" for layer in self.layers]

    @property
    def e2ee_required(self) -> bool:
        return self._e2ee_required

    @e2ee_required.setter
    def e2ee_required(self, value: bool) -> None:
        self._e2ee_required = value
        for layer in self.layers:
            layer.e2ee_required = value

    def layer(self, rid: str | None) -> Producer | None:
        return self.by_rid.get(rid) if rid is not None else None

    def _layer_violation(self, layer: Producer, reason: str) -> None:
        if self.on_policy_violation is not None:
            self.on_policy_violation(self, f"layer {layer.rid}: {reason}")

    def check_policy(self, now: float, grace: float) -> None:
        for layer in self.layers:
            layer.check_policy(now, grace)

    def take_levels(self) -> tuple[int, int]:
        return 0, 0  # video carries no audio level

    def request_keyframe(self) -> bool:
        return any([layer.request_keyframe() for layer in self.layers])

    def attach(self, downtrack: DownTrack) -> None:
        """A new subscriber's copy: it starts on the lowest layer whose keyframe cache can
        start it at once (else the lowest, waiting for a keyframe), until the allocator's
        next round chooses. Browsers send keyframes only when asked, so the lowest layer's
        cache may have outgrown its bounds while a higher one's is fresh."""
        if isinstance(downtrack, SimulcastDownTrack):
            self.downtracks.append(downtrack)
            downtrack.producer = next(
                (layer for layer in self.layers if layer.cached_gop()), self.layers[0]
            )
        downtrack.producer.attach(downtrack)

    def close(self) -> None:
        self.closed = True
        for layer in self.layers:
            layer.close()
        self.downtracks.clear()

    # -- layer state, read by the allocator ---------------------------------------------------

    def active(self, layer: Producer, now: float) -> bool:
        return layer.ssrc is not None and now - layer.last_packet_at < LAYER_IDLE

    def sample(self, now: float) -> None:
        for layer in self.layers:
            layer.sample_rate(now)


class SimulcastDownTrack(DownTrack):
    """A subscriber's copy of a simulcast track: one outgoing stream, fed by one layer at a
    time. `self.producer` is the layer it forwards (or starts on); `target` the layer it
    switches to at that layer's next keyframe; `suspended` when no layer fits (its video is
    paused, audio unaffected)."""

    __slots__ = (
        "max_height",
        "max_width",
        "on_layer",
        "reason",
        "short_since",
        "suspended",
        "switch_asked_at",
        "target",
        "track",
        "up_at",
        "up_failures",
        "up_hold_until",
    )

    def __init__(self, track: SimulcastProducer, sink: PacketSink, **options: Any) -> None:
        """`options` as for DownTrack; the copy starts out waiting on the lowest layer."""
        super().__init__(track.layers[0], sink, **options)
        self.track = track
        self.target: Producer | None = None
        self.suspended = False
        self.reason: str | None = None
        # The size the subscriber renders this track at (None: no limit; 0 x 0: no video),
        # set by signaling.
        self.max_width: int | None = None
        self.max_height: int | None = None
        # No switch up before this (after a switch down for bandwidth, so a link at its
        # limit is not probed with a keyframe every allocation round).
        self.up_hold_until = 0.0
        # When it last moved up for bandwidth, and how many such moves in a row had to be
        # undone soon after: each doubles the hold (a link at its limit is probed ever less).
        self.up_at = -1e9
        self.up_failures = 0
        # Since when the estimate has not paid for the current layer (None: it does).
        self.short_since: float | None = None
        self.switch_asked_at = -1e9
        # Called when the layer or the paused state changes (the room protocol tells the
        # subscriber, `video_layer`).
        self.on_layer: Callable[[SimulcastDownTrack], None] | None = None

    @property
    def layer(self) -> Producer | None:
        """The layer this copy forwards now (None: not started, or paused)."""
        return None if self.suspended or not self.started else self.producer

    def resync(self) -> None:
        if not self.suspended:
            super().resync()

    def sources(self) -> tuple[Producer, ...]:
        if self.target is not None:
            return (self.producer, self.target)
        return (self.producer,)

    # -- per packet (only while not in a route, or switching) --------------------------------

    def forward(
        self, data: bytes, hdr: RtpHeader, keyframe: bool, source: Producer | None = None
    ) -> None:
        if self.suspended:
            return
        target = self.target
        if source is not None and source is target:
            if self.closed or self.paused or not self.sink.ready:
                return
            if not keyframe:
                # The keyframe asked for when the switch began may have been lost: ask
                # again, but not at every packet (each keyframe costs every subscriber of
                # that layer bandwidth).
                now = self.clock()
                if now - self.switch_asked_at >= SWITCH_KEYFRAME_RETRY:
                    self.switch_asked_at = now
                    target.request_keyframe()
                return
            self._switch(target, hdr)
            super().forward(data, hdr, keyframe, source)
            return
        if source is None or source is self.producer:
            super().forward(data, hdr, keyframe, source)

    def _switch(self, layer: Producer, hdr: RtpHeader) -> None:
        """Move the record from the current layer's route to `layer`'s, at its keyframe
        `hdr`; the sequence map continues our numbering and clock."""
        old = self.producer
        direction = (
            "up" if self.track.layers.index(layer) > self.track.layers.index(old) else "down"
        )
        self._leave(old)
        self.target = None
        if self in layer.waiting:
            layer.waiting.remove(self)
        self.producer = layer
        layer.downtracks.append(self)
        was_started = self.started
        self.started = False
        if was_started:
            self._start(hdr)
        self.stats.count_switch(direction, self.reason or REASON_BANDWIDTH)
        log.info(
            "simulcast: subscriber SSRC %d of track %s switched %s from layer %s to %s (%s)",
            self.ssrc,
            self.track.id,
            direction,
            old.rid,
            layer.rid,
            self.reason,
        )
        if self.on_layer is not None:
            self.on_layer(self)

    def _leave(self, layer: Producer) -> None:
        if self.active:
            self.active = False
            layer.route.remove(self.copy)
        if self in layer.waiting:
            layer.waiting.remove(self)
        if self in layer.downtracks:
            layer.downtracks.remove(self)
        layer.refresh_attention()

    # -- decisions (the allocator's timer) ----------------------------------------------------

    def choose(self, layer: Producer | None, reason: str, now: float) -> None:
        """Forward `layer` from now on (at its next keyframe), or nothing (None: video
        paused). A change of target cancels a pending switch."""
        self.reason = reason
        if layer is None:
            if not self.suspended:
                log.info(
                    "simulcast: subscriber SSRC %d of track %s: video paused (%s)",
                    self.ssrc,
                    self.track.id,
                    reason,
                )
                self._suspend()
                if self.on_layer is not None:
                    self.on_layer(self)
            return
        if self.suspended:
            log.info(
                "simulcast: subscriber SSRC %d of track %s: video resumes on layer %s",
                self.ssrc,
                self.track.id,
                layer.rid,
            )
            self._resume(layer)
            if self.on_layer is not None:
                self.on_layer(self)
            return
        if layer is self.producer:
            self._cancel_target()
            return
        if layer is self.target:
            return
        self._cancel_target()
        if not self.started:
            # Nothing sent yet: simply wait on the other layer instead.
            self._leave(self.producer)
            self.producer = layer
            layer.downtracks.append(self)
            layer.waiting.append(self)
            layer.refresh_attention()
            return
        self.target = layer
        layer.waiting.append(self)
        layer.refresh_attention()
        self.switch_asked_at = now
        layer.request_keyframe()

    def _cancel_target(self) -> None:
        target = self.target
        if target is not None:
            self.target = None
            if self in target.waiting:
                target.waiting.remove(self)
            target.refresh_attention()

    def _suspend(self) -> None:
        self._cancel_target()
        self._leave(self.producer)
        self.producer.downtracks.append(self)  # still its layer for NACKs and teardown
        self.suspended = True
        self.stats.video_paused += 1
        # Resumed later at a keyframe, re-based by the sequence map.
        self.started = False

    def _resume(self, layer: Producer) -> None:
        self.suspended = False
        self.stats.video_paused -= 1
        self._leave(self.producer)
        self.producer = layer
        layer.downtracks.append(self)
        layer.waiting.append(self)
        layer.refresh_attention()

    def demand(self, now: float) -> LayerDemand:
        layers = self.track.layers
        return LayerDemand(
            rates=[layer.bitrate or default_rate(i, len(layers)) for i, layer in enumerate(layers)],
            sizes=[(layer.width, layer.height) for layer in layers],
            active=[self.track.active(layer, now) for layer in layers],
            max_width=self.max_width,
            max_height=self.max_height,
            current=None if self.suspended else layers.index(self.target or self.producer),
            hold_up=now < self.up_hold_until,
            peaks=[layer.bitrate_peak for layer in layers],
        )

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        self._cancel_target()
        if self.suspended:
            self.suspended = False
            self.stats.video_paused -= 1
        if self in self.track.downtracks:
            self.track.downtracks.remove(self)
        self.on_layer = None
        super().close()

    def on_producer_closed(self) -> None:
        super().on_producer_closed()
        if self.suspended:
            self.suspended = False
            self.stats.video_paused -= 1


# How long a subscription stays off higher layers after it had to move down for bandwidth:
# UP_HOLD, doubled for each move up that had to be undone within UP_TRIAL, at most
# UP_HOLD_MAX. A move up that lasts UP_TRIAL is forgiven.
UP_HOLD = 4.0
# Moves down for bandwidth wait this long for the shortfall to last, unless the estimate is
# below DOWN_AT_ONCE of the current layer's rate; pauses wait PAUSE_AFTER.
DOWN_AFTER = 0.5
DOWN_AT_ONCE = 0.5
PAUSE_AFTER = 2.0
# 8 s leaves a subscriber whose limit was lifted time for a probe and a keyframe within
# 10 s (docs/performance.md, "Back up").
UP_HOLD_MAX = 8.0
UP_TRIAL = 20.0


def allocate_transport(
    downtracks: Sequence[SimulcastDownTrack], estimate: float | None, now: float
) -> float | None:
    """Choose a layer for each simulcast copy to one subscriber, within its estimate.
    Returns the estimate a probe should try, when bandwidth alone holds something back."""
    if not downtracks:
        return None
    demands = [d.demand(now) for d in downtracks]
    choices, wanted = allocate_with_target(demands, estimate)
    for downtrack, demand, (index, reason) in zip(downtracks, demands, choices, strict=True):
        layers = downtrack.track.layers
        current = demand.current
        if current is not None and now - downtrack.up_at >= UP_TRIAL:
            downtrack.up_failures = 0
        if (
            reason == REASON_BANDWIDTH
            and current is not None
            and (index is None or index < current)
        ):
            index = _confirm_down(downtrack, demand, index, estimate, now)
            if index is not None and index >= current:
                continue  # not yet: the shortfall has to last
            log.debug(
                "simulcast: estimate %s bit/s no longer pays layer %d of %s (rates %s)",
                f"{estimate:.0f}" if estimate is not None else "-",
                current,
                downtrack.track.id,
                [f"{r:.0f}" for r in demand.rates],
            )
            if now - downtrack.up_at < UP_TRIAL:
                downtrack.up_failures += 1
            hold = UP_HOLD * 2 ** min(downtrack.up_failures, 8)
            downtrack.up_hold_until = now + min(hold, UP_HOLD_MAX)
        else:
            downtrack.short_since = None
            moved_up = current is not None and index is not None and index > current
            if reason == REASON_BANDWIDTH and moved_up:
                downtrack.up_at = now
        downtrack.choose(None if index is None else layers[index], reason, now)
    return wanted


def _confirm_down(
    downtrack: SimulcastDownTrack,
    demand: LayerDemand,
    index: int | None,
    estimate: float | None,
    now: float,
) -> int | None:
    """A move down (or a pause) for bandwidth, once the shortfall is real: at once when the
    estimate is below DOWN_AT_ONCE of the current layer's rate, else after it lasted
    DOWN_AFTER (an estimate dips for a moment after a burst of keyframe packets, or when
    the subscriber's machine is busy). A pause needs PAUSE_AFTER; until then the copy
    keeps the lowest layer that is sent."""
    current = demand.current
    assert current is not None
    if downtrack.short_since is None:
        downtrack.short_since = now
    waited = now - downtrack.short_since
    rate = max(demand.rates[current], 1.0)
    severe = estimate is not None and estimate < DOWN_AT_ONCE * rate
    if not severe and waited < DOWN_AFTER:
        return current
    if index is None and waited < PAUSE_AFTER:
        sending = [i for i, on in enumerate(demand.active) if on]
        return sending[0] if sending else current
    return index


# A published track as the control plane holds it: one stream, or simulcast layers.
AnyProducer: TypeAlias = Producer | SimulcastProducer
