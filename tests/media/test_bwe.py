"""The subscriber-side estimator (sfu/media/bwe.py) on synthetic traces, the send log and
feedback matching (sfu/media/twcc.py), and the native Peer's log against the Python one."""

from __future__ import annotations

import itertools
import struct

import pytest

from sfu.media.bwe import (
    ACKED_CAP,
    BETA,
    MAX_BPS,
    MIN_BPS,
    NORMAL,
    OVERUSE,
    START_BPS,
    UNDERUSE,
    BandwidthEstimator,
)
from sfu.media.fastpath import probe
from sfu.media.twcc import (
    LOG_SLOTS,
    FeedbackMatcher,
    SendLog,
    TransportSeqLog,
    TwccRecorder,
    parse_transport_feedback,
    transport_seq_slot,
)

PACKET = 1200  # bytes
INTERVAL = 0.1  # feedback every 100 ms


class Trace:
    """A sender forwarding `rate_pps` packets per second, with feedback every INTERVAL; the
    path adds `extra` seconds of queueing delay per packet (0: none) and loses a share."""

    def __init__(self, estimator: BandwidthEstimator) -> None:
        self.bwe = estimator
        self.now = 0.0
        self.delay = 0.05
        self.count = 0

    def run(
        self, seconds: float, *, rate_pps: int = 100, extra: float = 0.0, loss: float = 0.0
    ) -> list[float]:
        estimates = []
        per_feedback = round(rate_pps * INTERVAL)
        lost_every = round(1 / loss) if loss else 0
        for _ in range(round(seconds / INTERVAL)):
            packets: list[tuple[float, float | None, int]] = []
            for i in range(per_feedback):
                send = self.now + i / rate_pps
                self.delay = max(0.05, self.delay + extra)
                self.count += 1
                lost = lost_every and self.count % lost_every == 0
                packets.append((send, None if lost else send + self.delay, PACKET))
            self.now += INTERVAL
            estimates.append(self.bwe.on_feedback(packets, self.now))
        return estimates


def test_steady_path_ramps_up_about_8_percent_a_second_up_to_the_cap() -> None:
    trace = Trace(BandwidthEstimator())
    estimates = trace.run(10.0)
    assert all(b >= a for a, b in itertools.pairwise(estimates))
    assert 0.6e6 < estimates[-1] < 0.7e6  # 300 kbit/s x 1.08 ** 10 = 648 kbit/s
    assert trace.bwe.signal == NORMAL
    assert trace.bwe.loss == 0.0
    # No further than 1.5 x what was acknowledged (about 1 Mbit/s): more needs a probe.
    estimates = trace.run(20.0)
    acked = trace.bwe.acked_bps
    assert acked is not None
    assert acked < 1.1e6
    assert estimates[-1] == pytest.approx(ACKED_CAP * acked, rel=0.02)


def test_a_probe_that_got_through_lifts_the_estimate_past_the_cap() -> None:
    trace = Trace(BandwidthEstimator())
    trace.run(30.0)
    capped = trace.bwe.estimate_bps
    assert trace.bwe.on_probe(3e6) == 3e6
    estimates = trace.run(2.0)  # no overuse, no loss: kept
    assert min(estimates) >= 3e6 > capped


def test_growing_delay_steps_down_to_beta_times_what_got_through() -> None:
    trace = Trace(BandwidthEstimator(start_bps=1e6))
    trace.run(5.0)
    before = trace.bwe.estimate_bps
    assert before > START_BPS
    # A queue builds: every packet waits 2 ms longer than the one before.
    estimates = trace.run(1.0, extra=0.002)
    assert trace.bwe.signal == OVERUSE
    acked = trace.bwe.acked_bps
    assert acked is not None
    assert estimates[-1] <= BETA * 1.05e6
    assert min(estimates) < 0.85 * before


def test_recovers_after_the_queue_drains() -> None:
    trace = Trace(BandwidthEstimator())
    trace.run(3.0)
    trace.run(1.0, extra=0.002)
    low = trace.bwe.estimate_bps
    trace.run(0.4, extra=-0.004)  # the queue drains: hold, no increase
    assert trace.bwe.signal == UNDERUSE
    assert trace.bwe.estimate_bps <= low * 1.02
    estimates = trace.run(10.0)  # stable again
    assert trace.bwe.signal == NORMAL
    assert estimates[-1] > 1.2 * low


def test_twenty_percent_loss_drops_the_estimate_and_it_recovers() -> None:
    trace = Trace(BandwidthEstimator(start_bps=1e6))
    trace.run(2.0)
    before = trace.bwe.estimate_bps
    estimates = trace.run(2.0, loss=0.2)
    assert trace.bwe.loss == pytest.approx(0.2)
    # From the first window that is all lossy on, each cut multiplies the estimate by
    # (1 - 0.5 x 0.2), at most once per round trip + LOSS_DECREASE_HOLD, and nothing
    # increases it meanwhile.
    steps = [b / a for a, b in itertools.pairwise([before, *estimates]) if b != a]
    first_drop = next(i for i, step in enumerate(steps) if step < 1.0)
    assert first_drop <= 2
    assert len(steps) - first_drop >= 4
    assert all(step == pytest.approx(0.9) for step in steps[first_drop:])
    lowest = trace.bwe.estimate_bps
    assert lowest < 0.65 * before  # 0.9 ** 4-5
    trace.run(5.0)
    assert trace.bwe.loss == 0.0
    assert trace.bwe.estimate_bps > 1.5 * lowest


def test_moderate_loss_holds() -> None:
    trace = Trace(BandwidthEstimator())
    trace.run(1.0)
    held = trace.bwe.loss_bps
    trace.run(1.0, loss=0.05)
    assert trace.bwe.loss_bps == held
    assert trace.bwe.loss == pytest.approx(0.05)


def test_bounds_and_injectable_clock() -> None:
    now = [0.0]
    bwe = BandwidthEstimator(clock=lambda: now[0])
    bwe.on_probe(1e9)
    assert bwe.estimate_bps == MAX_BPS  # even a probe stops there
    for _ in range(600):  # a minute without congestion: still MAX_BPS
        now[0] += 0.1
        bwe.on_feedback([(now[0], now[0] + 0.05, PACKET)])
    assert bwe.estimate_bps == MAX_BPS
    low = BandwidthEstimator(start_bps=1.0)
    assert low.estimate_bps == MIN_BPS
    for _ in range(50):  # everything lost
        now[0] += 0.1
        low.on_feedback([(now[0], None, PACKET)] * 10, now[0])
    assert low.estimate_bps == MIN_BPS


# -- the send log and matching ----------------------------------------------------------------


def packet(ssrc: int, seq: int, ext_id: int = 3, two_byte: bool = False) -> bytearray:
    """An RTP packet with a MID element and a transport-cc slot under `ext_id`."""
    if two_byte:
        block = bytes([1, 1]) + b"0" + bytes([ext_id, 2, 0xAA, 0xBB])
        profile = 0x1000
    else:
        block = bytes([0x10]) + b"0" + bytes([ext_id << 4 | 1, 0xAA, 0xBB])
        profile = 0xBEDE
    block += bytes(-len(block) % 4)
    header = struct.pack("!BBHII", 0x90, 96, seq, 1234, ssrc)
    return bytearray(header + struct.pack("!HH", profile, len(block) // 4) + block + b"payload")


def logs() -> list[TransportSeqLog]:
    out: list[TransportSeqLog] = [SendLog()]
    module = probe()[0]
    if module is not None:
        out.append(module.Peer())
    return out


@pytest.mark.parametrize("log", logs(), ids=lambda log: type(log).__name__)
def test_stamping_counts_on_and_a_resend_keeps_its_number(log: TransportSeqLog) -> None:
    log.enable_twcc(3)
    first = packet(0xAAAA, 10)
    assert log.stamp(first, 1.0, True) == 0
    at = transport_seq_slot(first, 3)
    assert first[at : at + 2] == b"\x00\x00"
    assert log.stamp(packet(0xAAAA, 11, two_byte=True), 1.001, True) == 1
    assert log.stamp(packet(0xBBBB, 10), 1.002, True) == 2
    assert log.stamp(packet(0xAAAA, 12, ext_id=5), 1.003, True) == -1  # no slot: unstamped
    # A resend (not newer than the stream's last) goes out as it did the first time.
    again = packet(0xAAAA, 10)
    assert log.stamp(again, 2.0, False) == 0
    assert again == first
    # A late packet never sent before gets a number of its own.
    assert log.stamp(packet(0xAAAA, 9), 2.1, False) == 3
    assert log.twcc_stamped == 4
    assert log.sent(0, 5) == [(1.0, 31), (1.001, 31), (1.002, 31), (2.1, 31), None]
    assert log.sent(65535, 1) == [None]


@pytest.mark.parametrize("log", logs(), ids=lambda log: type(log).__name__)
def test_the_log_keeps_the_newest_numbers_across_the_wrap(log: TransportSeqLog) -> None:
    log.enable_twcc(3)
    for i in range(70_000):
        buf = packet(0xCCCC, i & 0xFFFF)
        log.stamp(buf, float(i), True)
    newest = (70_000 - 1) & 0xFFFF
    assert log.sent(newest, 2) == [(69_999.0, 31), None]
    oldest = (70_000 - LOG_SLOTS) & 0xFFFF
    assert log.sent(oldest - 1, 2) == [None, (float(70_000 - LOG_SLOTS), 31)]


def test_feedback_is_matched_once_per_number() -> None:
    log = SendLog()
    log.enable_twcc(3)
    for i in range(10):
        log.stamp(packet(1, i), 10.0 + i * 0.01, True)
    recorder = TwccRecorder()
    for i in range(10):
        if i != 4:  # lost
            recorder.record(i, 20.0 + i * 0.01)
    built = recorder.build_feedback(1, 2, 21.0)
    assert built is not None
    feedback = parse_transport_feedback(b"junk" + built[0], 4)
    assert feedback is not None
    matcher = FeedbackMatcher()
    results = matcher.match(feedback, log)
    assert len(results) == 10
    assert results[4] == (10.04, None, 31)
    send, arrival, size = results[5]
    assert (send, size) == (10.05, 31)
    assert arrival is not None
    assert arrival == pytest.approx(20.05, abs=0.00025)
    assert (matcher.received, matcher.lost) == (9, 1)
    # The same numbers reported again (a late arrival, a duplicate feedback): left out.
    assert matcher.match(feedback, log) == []
