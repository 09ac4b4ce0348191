"""The `e2ee: required` room policy as the engine's timer applies it: a publisher whose
frames carry no SFrame envelope is reported once the grace period is over; one whose frames
do is left alone. Both are judged on what actually arrived over SRTP."""

from __future__ import annotations

from sfu.client.sframe import Sender, compose_kid, vp8_clear_prefix_len
from sfu.media.envelope import STATE_ENCRYPTED, STATE_PLAINTEXT
from sfu.media.producer import Producer
from tests.engine.harness import VIDEO_SSRC, EngineHarness, rtp_packet, vp8_payload

GRACE = 5.0
FRAMES = 40  # enough to establish an SFrame chain (16) and then judge 20 frames after it


def required(producer: Producer) -> list[str]:
    violations: list[str] = []
    producer.e2ee_required = True
    producer.on_policy_violation = lambda _producer, why: violations.append(why)
    return violations


def send_frames(harness: EngineHarness, *, encrypted: bool) -> Producer:
    publisher, producer = harness.publisher()
    sender = Sender(compose_kid(2, 0), bytes(range(16)))
    for seq in range(FRAMES):
        # One packet per frame: the VP8 payload descriptor, then the (protected) frame.
        payload = vp8_payload(seq, keyframe=seq % 10 == 0)
        descriptor, frame = payload[:1], payload[1:]
        if encrypted:
            frame = sender.protect(frame, vp8_clear_prefix_len(frame))
        publisher.send_rtp(rtp_packet(seq, 3000 * seq, VIDEO_SSRC, descriptor + frame))
    return producer


def test_a_plaintext_publisher_is_reported_once_the_grace_period_is_over() -> None:
    harness = EngineHarness(e2ee_grace_period=GRACE)
    producer = send_frames(harness, encrypted=False)
    violations = required(producer)
    assert producer.envelope.state == STATE_PLAINTEXT

    harness.advance(GRACE - 0.5)
    assert violations == []
    harness.advance(1.0)
    assert len(violations) == 1
    assert "without an SFrame envelope" in violations[0]


def test_an_encrypting_publisher_is_left_alone() -> None:
    harness = EngineHarness(e2ee_grace_period=GRACE)
    producer = send_frames(harness, encrypted=True)
    violations = required(producer)
    assert producer.envelope.state == STATE_ENCRYPTED

    harness.advance(GRACE + 2.0)
    assert violations == []
