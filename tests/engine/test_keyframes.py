"""Keyframe requests (PLI, FIR) from subscribers, through SRTCP, to the publisher.

Two limits apply, both on the injected clock: each subscriber's own budget (its first
request, then one per `subscriber_keyframe_interval`, none while the keyframe it asked for is
on its way) and the per-track throttle toward the publisher (one per `keyframe_interval`).
"""

from __future__ import annotations

from sfu.media.rtcp import Pli, build_fir, build_pli
from tests.engine.harness import (
    AUDIO_SSRC,
    OPUS,
    VIDEO_SSRC,
    Client,
    EngineHarness,
    opus_packet,
    vp8_packet,
)


class Stream:
    """A publisher sending VP8 with the harness's clock: 30 frames a second."""

    def __init__(self, harness: EngineHarness, publisher: Client) -> None:
        self.harness = harness
        self.publisher = publisher
        self.seq = 0

    def send(self, *, keyframe: bool = False) -> None:
        self.publisher.send_rtp(vp8_packet(self.seq, 3000 * self.seq, keyframe=keyframe))
        self.seq += 1


def plis_at(client: Client) -> list[Pli]:
    return [p for p in client.receive().rtcp if isinstance(p, Pli)]


def test_a_subscribers_requests_reach_the_publisher_within_its_budget(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer)
    video = Stream(harness, publisher)
    video.send(keyframe=True)
    harness.clock.now += 5.0

    subscriber.send_rtcp(build_pli(subscriber.rtcp_ssrc, downtrack.ssrc))
    assert plis_at(publisher) == [Pli(publisher.transport.rtcp_ssrc, VIDEO_SSRC)]
    # A receiver that cannot decrypt asks about three times a second: all dropped here.
    for _ in range(5):
        harness.clock.now += 0.3
        subscriber.send_rtcp(build_pli(subscriber.rtcp_ssrc, downtrack.ssrc))
    assert plis_at(publisher) == []
    assert downtrack.keyframe_requests_suppressed == 5
    assert harness.engine.stats.keyframe_requests == [1, 0, 5]
    assert harness.engine.stats.pli_received == 6

    # Past its interval but before the keyframe it asked for reached it: still nothing.
    harness.clock.now += 1.0
    subscriber.send_rtcp(build_pli(subscriber.rtcp_ssrc, downtrack.ssrc))
    assert plis_at(publisher) == []
    # Once a keyframe reached it, the next request after the interval goes through; FIR
    # counts as a keyframe request like PLI.
    video.send(keyframe=True)
    harness.clock.now += 0.1
    subscriber.send_rtcp(build_fir(subscriber.rtcp_ssrc, downtrack.ssrc, 1))
    assert plis_at(publisher) == [Pli(publisher.transport.rtcp_ssrc, VIDEO_SSRC)]
    assert harness.engine.stats.fir_received == 1


def test_requests_of_several_subscribers_are_throttled_per_track(
    harness: EngineHarness,
) -> None:
    publisher, producer = harness.publisher()
    first, first_track = harness.subscriber(producer)
    second, second_track = harness.subscriber(producer)
    video = Stream(harness, publisher)
    video.send(keyframe=True)
    harness.clock.now += 5.0

    first.send_rtcp(build_pli(first.rtcp_ssrc, first_track.ssrc))
    harness.clock.now += producer.keyframe_interval / 2
    # The keyframe asked for is already on its way to everyone.
    second.send_rtcp(build_pli(second.rtcp_ssrc, second_track.ssrc))
    assert len(plis_at(publisher)) == 1
    assert producer.keyframe_requests_throttled == 1
    assert harness.engine.stats.keyframe_requests == [1, 1, 0]

    # A throttle interval later, a newly joined subscriber's request goes through.
    harness.clock.now += producer.keyframe_interval
    third, third_track = harness.subscriber(producer)
    video.send(keyframe=True)
    assert len(third.receive().rtp) == 1
    third.send_rtcp(build_pli(third.rtcp_ssrc, third_track.ssrc))
    assert len(plis_at(publisher)) == 1
    assert harness.engine.stats.keyframe_requests == [2, 1, 0]


def test_requests_for_unknown_streams_and_audio_ask_nothing(harness: EngineHarness) -> None:
    publisher, video = harness.publisher()
    audio = harness.add_producer(publisher, codec=OPUS, kind="audio", mid="1", ssrc=AUDIO_SSRC)
    subscriber, _ = harness.subscriber(video)
    audio_track = harness.add_downtrack(subscriber, audio)
    publisher.send_rtp(opus_packet(0, 0))
    publisher.send_rtp(vp8_packet(0, 0, keyframe=True))

    subscriber.send_rtcp(build_pli(subscriber.rtcp_ssrc, audio_track.ssrc))
    subscriber.send_rtcp(build_pli(subscriber.rtcp_ssrc, 0xDEADBEEF))
    assert plis_at(publisher) == []
    assert harness.engine.stats.pli_received == 2


def test_a_request_the_track_throttle_swallowed_after_its_keyframe_came_is_not_held(
    harness: EngineHarness,
) -> None:
    """A subscriber that joined and cannot decode yet (its E2EE key comes later) asks right
    after someone else's keyframe went by: the throttle refuses it, and nothing is on its way
    for it, so its next request must go once the throttle allows, not two intervals later."""
    publisher, producer = harness.publisher()
    first, first_track = harness.subscriber(producer)
    video = Stream(harness, publisher)
    video.send(keyframe=True)
    harness.clock.now += 5.0
    first.send_rtcp(build_pli(first.rtcp_ssrc, first_track.ssrc))
    assert len(plis_at(publisher)) == 1
    assert producer.keyframe_outstanding
    harness.clock.now += 0.05
    video.send(keyframe=True)  # the answer
    assert not producer.keyframe_outstanding

    late, late_track = harness.subscriber(producer)
    video.send()
    harness.clock.now += 0.1
    late.send_rtcp(build_pli(late.rtcp_ssrc, late_track.ssrc))
    assert plis_at(publisher) == []
    assert producer.keyframe_requests_throttled == 1
    harness.clock.now += producer.keyframe_interval
    late.send_rtcp(build_pli(late.rtcp_ssrc, late_track.ssrc))
    assert plis_at(publisher) == [Pli(publisher.transport.rtcp_ssrc, VIDEO_SSRC)]
    assert late_track.keyframe_requests_suppressed == 0
