"""Bandwidth probes toward a subscriber (probe.py) through the real engine, on both paths:
padding-only RTX packets on top of the media, judged by the subscriber's transport-cc
feedback (built with the SFU's own encoder, as a browser would send it)."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest

from sfu.media import transport as transport_module
from sfu.media.bwe import BandwidthEstimator
from sfu.media.rtp import read_transport_seq
from sfu.media.simulcast import SimulcastDownTrack
from sfu.media.twcc import TwccRecorder
from tests.engine.harness import Client, EngineHarness, header_of
from tests.engine.test_simulcast import RIDS, Call
from tests.engine.test_simulcast import TWCC_ID as TWCC

TWCC_ID = 5


@pytest.fixture(autouse=True)
def transport_clock(harness: EngineHarness) -> Iterator[None]:
    """Python-side sends read the transport module's clock: make it the harness's."""
    fake = types.SimpleNamespace(monotonic=harness.clock, perf_counter=harness.clock)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transport_module, "time", fake)
        yield


class Subscriber:
    """The receiving end: records the arrival of every numbered packet `delay` after it was
    sent (growing by `grow` per packet) and sends feedback every third tick."""

    def __init__(self, call: Call) -> None:
        self.call = call
        # The publisher's transport-cc element becomes the subscriber's, numbered by the SFU.
        self.client, self.downtrack = call.subscriber(rtx=97, ext_map={TWCC: TWCC_ID})
        self.client.transport.enable_bwe(TWCC_ID)
        self.recorder = TwccRecorder()
        self.delay = 0.04
        self.padding = 0
        self.steps = 0

    @property
    def transport(self) -> Client:
        return self.client

    def run(self, seconds: float, *, grow: float = 0.0) -> None:
        h = self.call.harness
        for _ in range(round(seconds / 0.05)):
            self.call.frame()  # 33 ms of media on every layer
            h.clock.now += 0.017
            h.tick()
            for plain in self.client.receive().rtp:
                hdr = header_of(plain)
                number = read_transport_seq(plain, hdr, TWCC_ID)
                if hdr.padding and hdr.payload_len == 0:
                    self.padding += 1
                if number >= 0:
                    self.delay += grow
                    self.recorder.record(number, h.clock() + self.delay)
            self.steps += 1
            if self.steps % 3 == 0:
                built = self.recorder.build_feedback(self.client.transport.rtcp_ssrc, 0, h.clock())
                for feedback in built or ():
                    self.client.send_rtcp(feedback)


def start(harness: EngineHarness, grow: float = 0.0) -> tuple[Call, Subscriber, BandwidthEstimator]:
    call = Call(harness, stamps=True)
    sub = Subscriber(call)
    # A path known to carry only the lowest layer's rate: a higher one needs a probe.
    bwe = BandwidthEstimator(start_bps=60_000, clock=harness.clock)
    sub.client.transport.bwe = bwe
    call.frame(keyframes=RIDS)
    sub.run(1.0, grow=grow)
    return call, sub, bwe


def test_a_probe_that_gets_through_moves_the_subscriber_up(harness: EngineHarness) -> None:
    call, sub, bwe = start(harness)
    prober = sub.client.transport.prober
    assert prober is not None
    assert isinstance(sub.downtrack, SimulcastDownTrack)
    assert sub.downtrack.layer is call.track.by_rid["q"]
    assert prober.started >= 1  # held back by bandwidth alone: a probe was asked for
    sub.run(1.0)  # the padding gets through without queueing
    assert sub.padding > 5
    assert prober.succeeded >= 1
    assert bwe.estimate_bps > 75_000  # from 60 kbit/s: enough for the middle layer
    stats = harness.engine.stats
    assert stats.probes[1] >= 1
    assert stats.probes[3] > 0
    # The next allocation rounds move it up at a keyframe of a higher layer.
    call.frame(keyframes=("h", "f"))
    sub.run(0.5)
    call.frame(keyframes=("h", "f"))
    layer = sub.downtrack.layer
    assert layer is not None
    assert layer.rid in ("h", "f")


def test_a_probe_that_builds_a_queue_stops_and_is_retried_later(harness: EngineHarness) -> None:
    # Every numbered packet waits 2 ms longer than the one before: a queue builds.
    call, sub, bwe = start(harness, grow=0.002)
    prober = sub.client.transport.prober
    assert prober is not None
    before = 60_000
    sub.run(2.0, grow=0.002)
    # The first probe may still get through (the delay trend needs about 20 packet groups
    # to show), a later one does not, and the estimate ends below what it tried.
    assert prober.failed >= 1
    assert bwe.estimate_bps < prober.target
    assert bwe.estimate_bps < 2 * before
    assert sub.downtrack.layer is call.track.by_rid["q"]
    # Failed probes back off: far fewer of them than allocation rounds.
    assert prober.started <= 3
