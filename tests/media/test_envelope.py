"""Key-free envelope judging on frames made by the real SFrame implementation."""

from __future__ import annotations

import os
import random
import struct

from sfu.client.sframe import Sender, compose_kid, vp8_clear_prefix_len
from sfu.media.envelope import STATE_ENCRYPTED, STATE_PLAINTEXT, EnvelopeJudge, parse_sframe_header
from sfu.media.rtp import parse_header


def rtp(seq: int, ts: int, payload: bytes, pt: int = 96) -> tuple[bytes, object]:
    packet = struct.pack("!BBHII", 0x80, pt, seq, ts, 1234) + payload
    return packet, parse_header(packet)


def vp8_frame(rng: random.Random, key: bool) -> bytes:
    # A plausible VP8 frame: frame tag (bit 0 = 0 for keyframes), start code, then noise.
    tag = bytes([0x10 if key else 0x11, rng.randrange(256), rng.randrange(256)])
    body = b"\x9d\x01\x2a\x80\x02\xe0\x01" if key else b""
    return tag + body + rng.randbytes(rng.randrange(300, 1100))


def feed_vp8(judge: EnvelopeJudge, frames: list[bytes]) -> None:
    for i, frame in enumerate(frames):
        packet, hdr = rtp(i, i * 3000, bytes([0x10]) + frame)  # descriptor: S=1, PID=0
        judge.on_packet(packet, hdr)  # type: ignore[arg-type]
        # A second packet of the same frame is never judged again.
        packet, hdr = rtp(i + 10000, i * 3000, bytes([0x00]) + frame[:50])
        judge.on_packet(packet, hdr)  # type: ignore[arg-type]


def test_parser_matches_the_client_header_encoder() -> None:
    from sfu.client.sframe import encode_header

    for kid, ctr in [(0, 0), (7, 7), (8, 8), (300, 70000), (2**40, 2**56)]:
        header = encode_header(kid, ctr)
        assert parse_sframe_header(header + b"x", 0, len(header) + 1) == (kid, ctr, len(header))
    assert parse_sframe_header(b"\x88", 0, 1) is None  # truncated extended KID


def test_encrypted_vp8_track_is_judged_encrypted() -> None:
    rng = random.Random(1)
    sender = Sender(compose_kid(2, 0), os.urandom(16))
    frames = []
    for i in range(60):
        frame = vp8_frame(rng, key=i % 30 == 0)
        frames.append(sender.protect(frame, vp8_clear_prefix_len(frame)))
        sender.protect(b"audio frame in between", 0)  # the shared counter moves on
    judge = EnvelopeJudge("vp8")
    feed_vp8(judge, frames)
    assert judge.frames_sframe == 60
    assert judge.frames_none == 0
    assert judge.state == STATE_ENCRYPTED


def test_plaintext_vp8_track_is_suspected() -> None:
    rng = random.Random(2)
    judge = EnvelopeJudge("vp8")
    feed_vp8(judge, [vp8_frame(rng, key=i % 30 == 0) for i in range(60)])
    assert judge.frames_none > 50
    assert judge.state == STATE_PLAINTEXT


def test_key_rotation_costs_no_false_verdicts() -> None:
    rng = random.Random(3)
    frames = []
    for generation in range(3):
        sender = Sender(compose_kid(2, generation), os.urandom(16))
        for _ in range(20):
            frame = vp8_frame(rng, key=False)
            frames.append(sender.protect(frame, vp8_clear_prefix_len(frame)))
    judge = EnvelopeJudge("vp8")
    feed_vp8(judge, frames)
    assert (judge.frames_sframe, judge.frames_none) == (60, 0)


def test_opus_frames_with_and_without_envelope() -> None:
    sender = Sender(compose_kid(1, 0), os.urandom(16))
    encrypted, plain = EnvelopeJudge("opus"), EnvelopeJudge("opus")
    for i in range(40):
        opus = bytes([0x78]) + os.urandom(80)
        packet, hdr = rtp(i, i * 960, sender.protect(opus, 0), pt=111)
        encrypted.on_packet(packet, hdr)  # type: ignore[arg-type]
        packet, hdr = rtp(i, i * 960, opus, pt=111)
        plain.on_packet(packet, hdr)  # type: ignore[arg-type]
    assert encrypted.state == STATE_ENCRYPTED
    assert plain.state == STATE_PLAINTEXT


def test_totals_are_shared_and_outlive_the_judge() -> None:
    totals = [0, 0]
    rng = random.Random(4)
    feed_vp8(EnvelopeJudge("vp8", totals), [vp8_frame(rng, key=False) for _ in range(10)])
    feed_vp8(EnvelopeJudge("vp8", totals), [vp8_frame(rng, key=False) for _ in range(10)])
    assert sum(totals) >= 18
