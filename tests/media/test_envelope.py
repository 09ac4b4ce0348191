"""Key-free envelope judging on frames made by real encoders and the real SFrame implementation.

The corpora are real encoder output: aiortc's VP8 and Opus encoders (what the Python client
sends), libvpx with GStreamer vp8enc's defaults (VBR, realtime deadline: the publisher whose
plaintext the old rule counted 10% SFrame), and Opus at a low bit rate (SILK, whose constant
TOC byte reads as a fixed KID and whose next byte drifts with the signal, like a counter).

`python -m tests.media.test_envelope` prints the counts for each corpus.
"""

from __future__ import annotations

import fractions
import functools
import math
import os
import random
import struct
from collections.abc import Callable

import numpy as np
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder
from av import AudioFrame, CodecContext, VideoFrame

from sfu.client.sframe import Sender, compose_kid, vp8_clear_prefix_len
from sfu.media import codecs
from sfu.media.envelope import (
    ESTABLISH_RUN,
    STATE_ENCRYPTED,
    STATE_PLAINTEXT,
    EnvelopeJudge,
    parse_sframe_header,
)
from sfu.media.rtp import RtpHeader, parse_header

CORPUS_FRAMES = 1000
WIDTH, HEIGHT = 240, 176


def look(judge: EnvelopeJudge, packet: bytes | bytearray, hdr: RtpHeader) -> None:
    """Hand the judge a packet with its flags, as a producer does (codecs.py, once)."""
    kind = "audio" if judge.codec == "opus" else "video"
    judge.on_packet(packet, hdr, codecs.inspector(judge.codec, kind)(packet, hdr))  # type: ignore[arg-type]


def rtp(seq: int, ts: int, payload: bytes, pt: int = 96) -> tuple[bytes, object]:
    packet = struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, 1234) + payload
    return packet, parse_header(packet)


# --- real encoder output ---------------------------------------------------------------------


def video_input(count: int) -> list[VideoFrame]:
    """Varied content: moving gradients, noise, a still scene with a moving object, colour fades."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = []
    for i in range(count):
        scene = (i // 125) % 4
        if scene == 0:
            img = np.stack([(x + 3 * i) % 256, (y + 2 * i) % 256, ((x + y + i) // 2) % 256], -1)
        elif scene == 1:
            img = rng.integers(0, 256, (HEIGHT, WIDTH, 3))
        elif scene == 2:
            img = np.full((HEIGHT, WIDTH, 3), 128)
            cx = int(WIDTH / 2 + WIDTH / 3 * math.sin(i / 10))
            img[70:100, max(0, cx - 15) : cx + 15] = (255, 0, 0)
        else:
            img = np.stack(
                [
                    np.full((HEIGHT, WIDTH), i * 5 % 256),
                    (x * y // 64 + i) % 256,
                    np.full_like(x, 60),
                ],
                -1,
            )
        frame = VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90000)
        frames.append(frame)
    return frames


@functools.cache
def aiortc_vp8() -> tuple[bytes, ...]:
    """Encoded frames of aiortc's VP8 encoder (CBR, realtime), captured before packetizing."""
    encoder = Vp8Encoder()
    frames: list[bytes] = []
    packetize = encoder._packetize

    def capture(buffer: bytes, picture_id: int) -> list[bytes]:
        frames.append(bytes(buffer))
        return packetize(buffer, picture_id)

    encoder._packetize = capture  # type: ignore[method-assign]
    for i, frame in enumerate(video_input(CORPUS_FRAMES)):
        if i == CORPUS_FRAMES // 2:
            encoder.target_bitrate = 150_000  # as after a REMB: the encoder is rebuilt
        encoder.encode(frame, force_keyframe=i % 250 == 0 and i > 0)
    return tuple(frames)


@functools.cache
def vp8enc_vp8() -> tuple[bytes, ...]:
    """libvpx with GStreamer vp8enc's defaults: VBR at 256 kb/s, realtime deadline, cpu-used 0."""
    codec = CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = WIDTH, HEIGHT, "yuv420p"  # type: ignore[attr-defined]
    codec.bit_rate = 256_000
    codec.time_base = fractions.Fraction(1, 30)
    codec.gop_size = 128  # type: ignore[attr-defined]
    codec.options = {"deadline": "realtime", "cpu-used": "0", "lag-in-frames": "0"}
    frames = []
    for i, frame in enumerate(video_input(CORPUS_FRAMES)):
        frame = frame.reformat(format="yuv420p")
        frame.pts, frame.time_base = i, fractions.Fraction(1, 30)
        frames += [bytes(p) for p in codec.encode(frame)]  # type: ignore[attr-defined]
    frames += [bytes(p) for p in codec.encode(None)]  # type: ignore[attr-defined]
    return tuple(frames)


def audio_input(count: int) -> list[AudioFrame]:
    """Silence, a tone, noise, a glide and a voiced, syllable-like signal, 20 ms at a time."""
    rng = np.random.default_rng(8)
    frames = []
    for i in range(count):
        t = np.arange(960 * i, 960 * (i + 1)) / 48000
        segment = (i // 100) % 5
        if segment == 0:
            samples = np.zeros(960)
        elif segment == 1:
            samples = 8000 * np.sin(2 * np.pi * 440 * t)
        elif segment == 2:
            samples = 3000 * rng.standard_normal(960)
        elif segment == 3:
            samples = 8000 * np.sin(2 * np.pi * (900 * t - 100 * t**2))
        else:
            pitch = 120 + 20 * np.sin(2 * np.pi * 2 * t)
            voiced = sum(3000 * np.sin(2 * np.pi * k * pitch * t) / k for k in range(1, 15))
            samples = voiced * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        frame = AudioFrame.from_ndarray(
            samples.astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = 48000, 960 * i
        frame.time_base = fractions.Fraction(1, 48000)
        frames.append(frame)
    return frames


@functools.cache
def aiortc_opus(bit_rate: int) -> tuple[bytes, ...]:
    """aiortc's Opus encoder: 96 kb/s is its default (CELT); 16 kb/s makes it use SILK."""
    encoder = OpusEncoder()
    encoder.codec.bit_rate = bit_rate
    frames: list[bytes] = []
    for frame in audio_input(CORPUS_FRAMES):
        frames += encoder.encode(frame)[0]
    return tuple(frames)


PLAINTEXT: dict[str, tuple[str, Callable[[], tuple[bytes, ...]]]] = {
    "vp8 (aiortc)": ("vp8", aiortc_vp8),
    "vp8 (libvpx, vp8enc defaults)": ("vp8", vp8enc_vp8),
    "opus (aiortc, 96 kb/s)": ("opus", lambda: aiortc_opus(96_000)),
    "opus (aiortc, 16 kb/s)": ("opus", lambda: aiortc_opus(16_000)),
}


def encrypt_call(
    video: tuple[bytes, ...], audio: tuple[bytes, ...]
) -> tuple[list[bytes], list[bytes]]:
    """Protect a call's video (30 fps) and audio (50 fps) as the client does: one Sender, so
    one counter, in capture order; VP8 keeps its 10- or 3-byte clear prefix."""
    sender = Sender(compose_kid(3, 0), os.urandom(16))
    events = sorted(
        [(i / 30, 0, i) for i in range(len(video))] + [(j / 50, 1, j) for j in range(len(audio))]
    )
    sealed_video, sealed_audio = [b""] * len(video), [b""] * len(audio)
    for _, is_audio, index in events:
        if is_audio:
            sealed_audio[index] = sender.protect(audio[index], 0)
        else:
            frame = video[index]
            sealed_video[index] = sender.protect(frame, vp8_clear_prefix_len(frame))
    return sealed_video, sealed_audio


def judge(codec: str, frames: list[bytes] | tuple[bytes, ...]) -> EnvelopeJudge:
    """Feed frames as a publisher sends them: VP8 split by aiortc's packetizer (descriptor with
    S = 1 on the first packet), Opus one frame per packet."""
    result = EnvelopeJudge(codec)
    seq = 0
    for i, frame in enumerate(frames):
        if codec == "vp8":
            payloads, ts = Vp8Encoder._packetize(frame, i & 0x7FFF), i * 3000
        else:
            payloads, ts = [frame], i * 960
        for payload in payloads:
            packet, hdr = rtp(seq, ts, payload)
            look(result, packet, hdr)
            seq += 1
    return result


def test_real_plaintext_encoder_output_is_never_counted_as_sframe() -> None:
    for name, (codec, corpus) in PLAINTEXT.items():
        frames = corpus()
        assert len(frames) >= CORPUS_FRAMES, name
        result = judge(codec, frames)
        assert result.frames_sframe == 0, name
        assert result.frames_judged >= len(frames) - ESTABLISH_RUN, name
        assert result.state == STATE_PLAINTEXT, name


def test_the_same_frames_encrypted_are_counted_as_sframe() -> None:
    for video_source, bit_rate in [(aiortc_vp8, 96_000), (vp8enc_vp8, 16_000)]:
        video, audio = encrypt_call(video_source(), aiortc_opus(bit_rate))
        for codec, frames in (("vp8", video), ("opus", audio)):
            result = judge(codec, frames)
            # The first ESTABLISH_RUN frames establish the KID and are not counted.
            assert result.frames_sframe == len(frames) - ESTABLISH_RUN, codec
            assert result.frames_none == 0, codec
            assert result.state == STATE_ENCRYPTED, codec


def test_random_bytes_are_never_counted_as_sframe() -> None:
    rng = random.Random(9)
    vp8 = [rng.randbytes(rng.randrange(20, 1200)) for _ in range(2000)]
    opus = [rng.randbytes(rng.randrange(10, 200)) for _ in range(2000)]
    for codec, frames in (("vp8", vp8), ("opus", opus)):
        result = judge(codec, frames)
        assert result.frames_sframe == 0, codec
        assert result.state == STATE_PLAINTEXT, codec


def test_a_counter_that_drifts_up_for_a_while_establishes_nothing() -> None:
    """Plaintext Opus whose second byte climbs for a few frames, like a gain field during a
    syllable: a "header" with a fixed KID and a counter a small step ahead, again and again."""
    rng = random.Random(10)
    frames, value = [], 130
    for i in range(1000):
        value = 130 if i % (ESTABLISH_RUN - 1) == 0 else value + rng.randrange(1, 4)
        frames.append(bytes([0x78, value]) + rng.randbytes(60))
    result = judge("opus", frames)
    assert result.frames_sframe == 0
    assert result.state == STATE_PLAINTEXT


# --- the rule, on synthetic frames protected by the real client ------------------------------


def vp8_frame(rng: random.Random, key: bool) -> bytes:
    # A plausible VP8 frame: frame tag (bit 0 = 0 for keyframes), start code, then noise.
    tag = bytes([0x10 if key else 0x11, rng.randrange(256), rng.randrange(256)])
    body = b"\x9d\x01\x2a\x80\x02\xe0\x01" if key else b""
    return tag + body + rng.randbytes(rng.randrange(300, 1100))


def feed_vp8(judge: EnvelopeJudge, frames: list[bytes]) -> None:
    for i, frame in enumerate(frames):
        packet, hdr = rtp(i, i * 3000, bytes([0x10]) + frame)  # descriptor: S=1, PID=0
        look(judge, packet, hdr)
        # A second packet of the same frame is never judged again.
        packet, hdr = rtp(i + 10000, i * 3000, bytes([0x00]) + frame[:50])
        look(judge, packet, hdr)


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
    assert judge.frames_sframe == 60 - ESTABLISH_RUN
    assert judge.frames_none == 0
    assert judge.state == STATE_ENCRYPTED


def test_plaintext_vp8_track_is_suspected() -> None:
    rng = random.Random(2)
    judge = EnvelopeJudge("vp8")
    feed_vp8(judge, [vp8_frame(rng, key=i % 30 == 0) for i in range(60)])
    assert judge.frames_sframe == 0
    assert judge.frames_none >= 59
    assert judge.state == STATE_PLAINTEXT


def test_key_rotation_costs_no_false_verdicts() -> None:
    rng = random.Random(3)
    frames = []
    for generation in range(3):
        sender = Sender(compose_kid(2, generation), os.urandom(16))
        for _ in range(40):
            frame = vp8_frame(rng, key=False)
            frames.append(sender.protect(frame, vp8_clear_prefix_len(frame)))
    judge = EnvelopeJudge("vp8")
    feed_vp8(judge, frames)
    # Each new KID is established again; its first frames are counted neither way.
    assert (judge.frames_sframe, judge.frames_none) == (3 * (40 - ESTABLISH_RUN), 0)
    assert judge.state == STATE_ENCRYPTED


def test_a_reordered_frame_costs_one_and_a_counter_jump_none() -> None:
    rng = random.Random(5)
    sender = Sender(compose_kid(2, 0), os.urandom(16))
    frames = []
    for i in range(80):
        if i == 50:
            for _ in range(500):  # the video was paused while the audio went on
                sender.protect(b"audio frame in between", 0)
        frame = vp8_frame(rng, key=False)
        frames.append(sender.protect(frame, vp8_clear_prefix_len(frame)))
    frames[30], frames[31] = frames[31], frames[30]
    judge = EnvelopeJudge("vp8")
    feed_vp8(judge, frames)
    # Frame 30 (CTR behind) is the one reordered frame; after the jump at 50 the chain is
    # established again from scratch.
    assert judge.frames_none == 1
    assert judge.frames_sframe == 80 - 2 * ESTABLISH_RUN - 1
    assert judge.state == STATE_ENCRYPTED


def test_opus_frames_with_and_without_envelope() -> None:
    sender = Sender(compose_kid(1, 0), os.urandom(16))
    encrypted, plain = EnvelopeJudge("opus"), EnvelopeJudge("opus")
    for i in range(60):
        opus = bytes([0x78]) + os.urandom(80)
        packet, hdr = rtp(i, i * 960, sender.protect(opus, 0), pt=111)
        look(encrypted, packet, hdr)
        packet, hdr = rtp(i, i * 960, opus, pt=111)
        look(plain, packet, hdr)
    assert encrypted.state == STATE_ENCRYPTED
    assert plain.state == STATE_PLAINTEXT
    assert plain.frames_sframe == 0


def test_totals_are_shared_and_outlive_the_judge() -> None:
    totals = [0, 0]
    rng = random.Random(4)
    feed_vp8(EnvelopeJudge("vp8", totals), [vp8_frame(rng, key=False) for _ in range(10)])
    feed_vp8(EnvelopeJudge("vp8", totals), [vp8_frame(rng, key=False) for _ in range(10)])
    assert sum(totals) >= 18


def main() -> None:
    rows = [(name, codec, corpus()) for name, (codec, corpus) in PLAINTEXT.items()]
    calls = [
        ("aiortc vp8 + opus 96 kb/s", encrypt_call(aiortc_vp8(), aiortc_opus(96_000))),
        ("vp8enc vp8 + opus 16 kb/s", encrypt_call(vp8enc_vp8(), aiortc_opus(16_000))),
    ]
    for name, (video, audio) in calls:
        rows += [
            (f"encrypted vp8 ({name})", "vp8", video),
            (f"encrypted opus ({name})", "opus", audio),
        ]
    for name, codec, frames in rows:
        result = judge(codec, frames)
        print(
            f"{name}: sframe {result.frames_sframe}, none {result.frames_none}, "
            f"frames {len(frames)}, verdict {result.state}"
        )


if __name__ == "__main__":
    main()
