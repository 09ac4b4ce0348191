"""Transport-cc toward subscribers through the real engine, on both forwarding paths: the
SFU stamps its own transport-wide numbers, the subscriber answers with real RTPFB FMT 15
feedback (built by the SFU's own encoder, as a browser would send it), and the transport's
estimate follows what the feedback says about the path. aiortc subscribers never send
transport-cc feedback (they do not negotiate it), so the reacting subscriber is simulated
here; Chromium sends it (tests/browser)."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest

from sfu.media import transport as transport_module
from sfu.media.bwe import OVERUSE, START_BPS
from sfu.media.rtp import read_transport_seq
from sfu.media.twcc import TwccRecorder
from tests.engine.harness import Client, EngineHarness, header_of, vp8_packet

MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
TWCC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"


@pytest.fixture(autouse=True)
def transport_clock(harness: EngineHarness) -> Iterator[None]:
    """Python-side sends read the transport module's clock: make it the harness's, which
    the native core's batches are stamped with too."""
    fake = types.SimpleNamespace(monotonic=harness.clock, perf_counter=harness.clock)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transport_module, "time", fake)
        yield


class Path:
    """One publisher, one subscriber with transport-cc, and the subscriber's receive side:
    it records arrivals `delay` seconds after the SFU sent each packet."""

    def __init__(self, h: EngineHarness, *, publisher_stamps: bool = True) -> None:
        self.h = h
        self.pub = h.client("whip")
        ext_ids = {MID: 1, TWCC: 3} if publisher_stamps else {MID: 1}
        self.producer = h.add_producer(self.pub, ext_ids=ext_ids)
        self.sub: Client = h.client("whep")
        self.downtrack = h.add_downtrack(self.sub, self.producer, ext_map={3: 5})
        self.sub.transport.enable_bwe(5)
        self.stamps = publisher_stamps
        self.recorder = TwccRecorder()
        self.seq = 0
        self.delay = 0.04
        self.numbers: list[int] = []

    def run(self, seconds: float, *, grow: float = 0.0) -> None:
        """100 packets a second; feedback every 100 ms; the queue grows by `grow` s per
        packet."""
        h = self.h
        for step in range(round(seconds * 100)):
            self.seq += 1
            ext = bytes([0x10]) + b"0"
            if self.stamps:
                ext += bytes([0x31]) + (self.seq & 0xFFFF).to_bytes(2)
            packet = vp8_packet(
                self.seq, 3000 * self.seq, keyframe=self.seq == 1, size=400, extensions=ext
            )
            self.pub.send_rtp(packet)
            self.delay += grow
            for plain in self.sub.receive().rtp:
                number = read_transport_seq(plain, header_of(plain), 5)
                if number >= 0:
                    self.numbers.append(number)
                    self.recorder.record(number, h.clock() + self.delay)
            h.clock.now += 0.01
            if step % 10 == 9:
                built = self.recorder.build_feedback(self.sub.rtcp_ssrc, 0, h.clock())
                for feedback in built or ():
                    self.sub.send_rtcp(feedback)


def test_the_estimate_follows_the_subscribers_feedback(harness: EngineHarness) -> None:
    path = Path(harness)
    bwe = path.sub.transport.bwe
    assert bwe is not None
    assert bwe.estimate_bps == START_BPS
    path.run(3.0)
    # The SFU's own numbers, one per packet sent, in order from 0: not the publisher's.
    assert path.numbers == list(range(len(path.numbers)))
    assert len(path.numbers) > 250
    steady = bwe.estimate_bps
    assert steady > START_BPS * 1.15  # no congestion: up about 8 % a second
    path.run(1.0, grow=0.003)  # a queue builds on the subscriber's path
    assert bwe.signal == OVERUSE
    assert bwe.estimate_bps < 0.85 * steady
    stats = harness.engine.stats
    assert stats.twcc_feedback_received >= 30
    assert stats.twcc_reported[0] >= len(path.numbers) - 10
    assert stats.twcc_reported[1] == 0
    assert sum(stats.bwe_estimates.counts) >= 3


def test_without_the_publishers_slot_nothing_is_stamped(harness: EngineHarness) -> None:
    """An aiortc publisher sends no transport-cc element: its copies go out unstamped, the
    subscriber has nothing to report, and the estimate stays at its start value."""
    path = Path(harness, publisher_stamps=False)
    path.run(1.0)
    assert path.downtrack.packets_sent > 50
    assert path.numbers == []
    log = path.sub.transport.send_log
    assert log is not None
    assert log.twcc_stamped == 0
    bwe = path.sub.transport.bwe
    assert bwe is not None
    assert bwe.estimate_bps == START_BPS
