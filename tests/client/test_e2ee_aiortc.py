"""E2EE hooks on real aiortc peers: two RTCPeerConnections on 127.0.0.1, in process, no SFU.

A publisher sends a 440 Hz Opus tone and a four-colour VP8 pattern, SFrame-protected per
frame. A receiver with the key decodes both (the colours and the tone survive), sees exactly
the protected bytes the publisher produced, frame by frame (matched by SFrame CTR), and the
publisher's wire carries none of the plaintext. Receivers with a wrong key or none decode
nothing and count why.
"""

from __future__ import annotations

import asyncio
import fractions
import gc
import itertools
import math
import subprocess
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable

import aioice.ice
import aiortc
import pytest
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    VideoStreamTrack,
)
from aiortc.codecs.vpx import vp8_depayload
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtp import RtpPacket, is_rtcp
from av import AudioFrame, VideoFrame
from av.frame import Frame

from sfu.client import sframe as sf
from sfu.client.e2ee import (
    E2eeConfig,
    E2eeContext,
    E2eeUnsupportedError,
    EncryptedFrame,
    check_aiortc_version,
)
from sfu.client.whip import prefer_offered_codecs
from tests.conftest import ROOT

KID = sf.compose_kid(1, 0)
KEY = bytes(range(16))
OTHER_KEY = bytes(range(100, 116))

WIDTH, HEIGHT = 320, 240
# (Y, U, V) of the four quadrants: top-left, top-right, bottom-left, bottom-right.
QUADRANTS = ((81, 90, 240), (145, 54, 34), (41, 240, 110), (210, 16, 146))
TONE_HZ = 440
SAMPLE_RATE = 48000


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice drops 127.0.0.1 when gathering; the peers here must use it and nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda *a, **k: ["127.0.0.1"])


# --- media sources ------------------------------------------------------------------------


class ToneTrack(AudioStreamTrack):
    """A 440 Hz sine, 48 kHz mono s16, in 20 ms frames paced in real time."""

    def __init__(self) -> None:
        super().__init__()
        self._samples = 0
        self._t0: float | None = None

    async def recv(self) -> Frame:
        if self.readyState != "live":
            raise MediaStreamError
        n = SAMPLE_RATE // 50
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            await asyncio.sleep(self._t0 + self._samples / SAMPLE_RATE - time.monotonic())
        pcm = array(
            "h",
            (
                int(8000 * math.sin(2 * math.pi * TONE_HZ * (self._samples + i) / SAMPLE_RATE))
                for i in range(n)
            ),
        )
        frame = AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(pcm.tobytes())
        frame.pts = self._samples
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._samples += n
        return frame


def _plane(width: int, height: int, line_size: int, channel: int, scale: int) -> bytes:
    rows = []
    for y in range(height):
        row = bytearray(line_size)
        for x in range(width):
            quadrant = (2 if y * scale >= HEIGHT // 2 else 0) + (x * scale >= WIDTH // 2)
            row[x] = QUADRANTS[quadrant][channel]
        rows.append(bytes(row))
    return b"".join(rows)


class PatternTrack(VideoStreamTrack):
    """Four flat colour quadrants at 30 fps."""

    def __init__(self) -> None:
        super().__init__()
        template = VideoFrame(width=WIDTH, height=HEIGHT, format="yuv420p")
        self._planes = [
            _plane(WIDTH // s, HEIGHT // s, p.line_size, i, s)
            for i, (p, s) in enumerate(zip(template.planes, (1, 2, 2), strict=True))
        ]

    async def recv(self) -> Frame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=WIDTH, height=HEIGHT, format="yuv420p")
        for plane, data in zip(frame.planes, self._planes, strict=True):
            plane.update(data)
        frame.pts = pts
        frame.time_base = time_base
        return frame


def quadrant_means(frame: VideoFrame) -> list[tuple[float, float, float]]:
    """Mean (Y, U, V) of the middle half of each quadrant of a decoded yuv420p frame."""
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    w, h = frame.width, frame.height
    out = []
    for qy in (0, 1):
        for qx in (0, 1):
            channels = []
            for plane, scale in zip(frame.planes, (1, 2, 2), strict=True):
                data = bytes(plane)
                pw, ph = w // scale, h // scale
                x0, x1 = qx * pw // 2 + pw // 8, qx * pw // 2 + 3 * pw // 8
                y0, y1 = qy * ph // 2 + ph // 8, qy * ph // 2 + 3 * ph // 8
                total = sum(
                    sum(data[y * plane.line_size + x0 : y * plane.line_size + x1])
                    for y in range(y0, y1)
                )
                channels.append(total / ((x1 - x0) * (y1 - y0)))
            out.append((channels[0], channels[1], channels[2]))
    return out


def tone_zero_crossings(frame: AudioFrame) -> tuple[int, float]:
    """Zero crossings and RMS of the first channel of a decoded s16 frame."""
    samples = array("h", bytes(frame.planes[0]))
    channels = len(frame.layout.channels)
    first = samples[: frame.samples * channels : channels]
    crossings = sum(1 for a, b in itertools.pairwise(first) if (a < 0) != (b < 0))
    rms = math.sqrt(sum(s * s for s in first) / max(1, len(first)))
    return crossings, rms


# --- peers ---------------------------------------------------------------------------------


class Peer:
    """One side of a direct aiortc call, with its decoded frames collected per kind."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.decoded: dict[str, list[Frame]] = {"audio": [], "video": []}
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        sink = self.decoded[track.kind]
        try:
            while True:
                frame = await track.recv()
                assert isinstance(frame, Frame)
                sink.append(frame)
        except MediaStreamError:
            pass

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def negotiate(
    publisher: Peer, subscriber: Peer, before_answer: Callable[[], None] | None = None
) -> None:
    await publisher.pc.setLocalDescription(await publisher.pc.createOffer())
    await subscriber.pc.setRemoteDescription(publisher.pc.localDescription)
    if before_answer is not None:
        before_answer()
    await subscriber.pc.setLocalDescription(await subscriber.pc.createAnswer())
    await publisher.pc.setRemoteDescription(subscriber.pc.localDescription)


def add_media(peer: Peer) -> None:
    for track in (ToneTrack(), PatternTrack()):
        prefer_offered_codecs(peer.pc.addTransceiver(track, direction="sendonly"))


def capture_wire(pc: RTCPeerConnection) -> list[bytes]:
    """Record every RTP/RTCP packet the peer hands to SRTP, i.e. what goes on the wire."""
    sent: list[bytes] = []
    transports: dict[int, RTCDtlsTransport] = {}
    for transceiver in pc.getTransceivers():
        transports[id(transceiver.sender.transport)] = transceiver.sender.transport
    for transport in transports.values():
        original: Callable[[bytes], Awaitable[None]] = transport._send_rtp

        async def send_rtp(
            data: bytes, _original: Callable[[bytes], Awaitable[None]] = original
        ) -> None:
            sent.append(bytes(data))
            await _original(data)

        setattr(transport, "_send_rtp", send_rtp)  # noqa: B010
    return sent


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def wire_frames(wire: list[bytes], codec_pts: dict[str, int]) -> dict[str, list[bytes]]:
    """Reassemble the frames on the wire per codec: depayload, join packets per timestamp."""
    by_pt = {pt: name for name, pt in codec_pts.items()}
    packets: dict[str, list[RtpPacket]] = {name: [] for name in codec_pts}
    for data in wire:
        if is_rtcp(data):
            continue
        packet = RtpPacket.parse(data)
        if packet.payload_type in by_pt:
            packets[by_pt[packet.payload_type]].append(packet)
    frames: dict[str, list[bytes]] = {}
    for name, plist in packets.items():
        joined: dict[int, bytes] = {}
        for packet in plist:  # sent in order, no retransmissions among these payload types
            body = vp8_depayload(packet.payload) if name == "VP8" else packet.payload
            joined[packet.timestamp] = joined.get(packet.timestamp, b"") + body
        frames[name] = list(joined.values())
    return frames


def negotiated_pts(pc: RTCPeerConnection) -> dict[str, int]:
    sdp = pc.remoteDescription.sdp
    pts = {}
    for line in sdp.splitlines():
        if line.startswith("a=rtpmap:"):
            pt, name = line[len("a=rtpmap:") :].split(" ", 1)
            pts[name.split("/")[0]] = int(pt)
    return {name: pts[name] for name in ("opus", "VP8")}


# --- tests ---------------------------------------------------------------------------------


async def test_keyed_receiver_decodes_and_sees_the_publishers_exact_frames() -> None:
    sent: list[EncryptedFrame] = []
    received: list[EncryptedFrame] = []
    publisher, subscriber = Peer(), Peer()
    pub_ctx = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY, on_frame=sent.append))
    sub_ctx = E2eeContext(E2eeConfig(receive_keys={KID: KEY}, on_frame=received.append))
    add_media(publisher)
    for transceiver in publisher.pc.getTransceivers():
        pub_ctx.attach_sender(transceiver.sender)

    def hook_receivers() -> None:
        for transceiver in subscriber.pc.getTransceivers():
            sub_ctx.attach_receiver(transceiver.receiver)

    try:
        await negotiate(publisher, subscriber, hook_receivers)
        wire = capture_wire(publisher.pc)
        pts = negotiated_pts(publisher.pc)
        await wait_for(
            lambda: (
                len(subscriber.decoded["audio"]) >= 40 and len(subscriber.decoded["video"]) >= 20
            ),
            timeout=8,
        )
    finally:
        await publisher.close()
        await subscriber.close()
    await asyncio.sleep(0.05)  # callbacks from encoder threads arrive via the loop

    # Decoded, and correctly: the colours and the tone survive the round trip.
    assert len(subscriber.decoded["audio"]) >= 40
    assert len(subscriber.decoded["video"]) >= 20
    video = subscriber.decoded["video"][-1]
    assert isinstance(video, VideoFrame)
    assert (video.width, video.height) == (WIDTH, HEIGHT)
    for means, want in zip(quadrant_means(video), QUADRANTS, strict=True):
        assert all(abs(g - w) <= 6 for g, w in zip(means, want, strict=True)), (means, want)
    audio = subscriber.decoded["audio"][-1]
    assert isinstance(audio, AudioFrame)
    crossings, rms = tone_zero_crossings(audio)
    assert 14 <= crossings <= 22, crossings  # 440 Hz over 20 ms: about 17.6
    assert rms > 1000

    counters = sub_ctx.counters
    assert counters.frames_unprotected >= 60
    assert (counters.auth_failures, counters.unknown_kid, counters.malformed) == (0, 0, 0)
    assert pub_ctx.counters.frames_protected >= counters.frames_unprotected

    # Frame by frame, the receiver saw exactly what the publisher produced.
    by_ctr = {f.ctr: f for f in sent}
    assert len(by_ctr) == len(sent)
    assert all(f.kid == KID for f in sent + received)
    last_ctr = max(f.ctr for f in received if f.ctr is not None)
    delivered = [f for f in sent if f.ctr is not None and f.ctr <= last_ctr]
    for kind in ("audio", "video"):
        seen = [f for f in received if f.kind == kind]
        ctrs = [f.ctr or 0 for f in seen]
        assert ctrs == sorted(ctrs)
        for event in seen:
            assert event.data == by_ctr[event.ctr].data
        expected = [f for f in delivered if f.kind == kind]
        assert len(seen) >= 0.9 * len(expected) - 2, (kind, len(seen), len(expected))

    # On the wire: payload descriptors outside, protected frames inside, exactly.
    on_wire = wire_frames(wire, pts)
    assert {f.data for f in delivered if f.kind == "audio"} <= set(on_wire["opus"])
    assert {f.data for f in delivered if f.kind == "video"} <= set(on_wire["VP8"])
    keyframes = [f.data for f in sent if f.kind == "video" and not f.data[0] & 1]
    assert keyframes
    assert keyframes[0][3:6] == b"\x9d\x01\x2a"  # VP8 start code: in the clear prefix

    # ...and none of the plaintext appears anywhere in what the publisher sent.
    blob = b"".join(wire)
    opener = sf.Receiver()
    opener.add_key(KID, KEY)
    windows = 0
    for event in sent:
        prefix = sf.clear_prefix_len_for(event.codec, event.data)
        body = opener.unprotect(event.data, prefix)[prefix:]
        for start in range(0, max(0, len(body) - 12), max(12, len(body) // 4)):
            window = body[start : start + 12]
            if len(set(window)) >= 6:  # skip runs that could occur by chance
                windows += 1
                assert window not in blob, (event.kind, event.ctr, start)
    assert windows >= 100


async def _run_keyless(config: E2eeConfig) -> tuple[Peer, E2eeContext, list[EncryptedFrame]]:
    received: list[EncryptedFrame] = []
    cfg = E2eeConfig(receive_keys=config.receive_keys, on_frame=received.append)
    publisher, subscriber = Peer(), Peer()
    pub_ctx = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY))
    sub_ctx = E2eeContext(cfg)
    add_media(publisher)
    for transceiver in publisher.pc.getTransceivers():
        pub_ctx.attach_sender(transceiver.sender)

    def hook_receivers() -> None:
        for transceiver in subscriber.pc.getTransceivers():
            sub_ctx.attach_receiver(transceiver.receiver)

    try:
        await negotiate(publisher, subscriber, hook_receivers)
        await wait_for(lambda: sub_ctx.counters.dropped >= 60, timeout=8)
    finally:
        await publisher.close()
        await subscriber.close()
    return subscriber, sub_ctx, received


async def test_receivers_without_the_key_decode_nothing_and_count_why() -> None:
    (wrong, wrong_ctx, wrong_seen), (none, none_ctx, none_seen) = await asyncio.gather(
        _run_keyless(E2eeConfig(receive_keys={KID: OTHER_KEY})),
        _run_keyless(E2eeConfig()),
    )
    for peer in (wrong, none):
        assert peer.decoded == {"audio": [], "video": []}
    assert wrong_ctx.counters.auth_failures >= 60
    assert none_ctx.counters.unknown_kid >= 60
    for ctx in (wrong_ctx, none_ctx):
        assert ctx.counters.frames_unprotected == 0
    for seen in (wrong_seen, none_seen):
        kinds = {f.kind for f in seen}
        assert kinds == {"audio", "video"}
        assert all(f.kid == KID and f.ctr is not None for f in seen)


# --- the hooks themselves --------------------------------------------------------------------


@pytest.fixture
async def pc() -> AsyncIterator[RTCPeerConnection]:
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    yield peer
    await peer.close()


async def test_zero_length_frames_pass_through_both_ways(pc: RTCPeerConnection) -> None:
    ctx = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY, receive_keys={KID: KEY}))
    send = ctx.attach_sender(pc.addTransceiver("audio").sender)
    recv = ctx.attach_receiver(pc.addTransceiver("video").receiver)
    assert send.seal("opus", b"") == b""
    assert send.seal("VP8", b"") == b""
    assert recv.open("opus", b"") == b""
    assert recv.open("VP8", b"") == b""
    assert send.counters.empty_frames == 2
    assert recv.counters.empty_frames == 2
    assert send.counters.frames_protected == recv.counters.frames_unprotected == 0


async def test_seal_and_open_agree_and_failures_are_dropped(pc: RTCPeerConnection) -> None:
    ctx = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY, receive_keys={KID: KEY}))
    send = ctx.attach_sender(pc.addTransceiver("video").sender)
    recv = ctx.attach_receiver(pc.addTransceiver("video").receiver)
    keyframe = bytes.fromhex("5003009d012a4001f000") + b"picture data" * 4
    sealed = send.seal("VP8", keyframe)
    assert sealed is not None
    assert sealed[:10] == keyframe[:10]
    assert recv.open("VP8", sealed) == keyframe
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert recv.open("VP8", tampered) is None
    assert recv.open("H264", sealed) is None  # no clear-prefix rule: dropped, not guessed
    assert recv.open("opus", b"\x01") is None
    assert send.seal("VP8", keyframe[:5]) is None  # too short for its prefix: never sent
    c = recv.counters
    assert (c.frames_unprotected, c.auth_failures, c.malformed) == (1, 1, 2)
    assert send.counters.malformed == 1

    # Rotation: a new generation's KID and key; receivers without it count unknown KIDs.
    new_kid = sf.compose_kid(1, 1)
    ctx.set_send_key(new_kid, OTHER_KEY)
    rotated = send.seal("VP8", keyframe)
    assert rotated is not None
    assert sf.parse_envelope(rotated, 10)[0] == sf.SFrameHeader(new_kid, 0)
    assert recv.open("VP8", rotated) is None
    assert recv.counters.unknown_kid == 1
    ctx.add_receive_key(new_kid, OTHER_KEY)
    assert recv.open("VP8", rotated) == keyframe


async def test_one_counter_per_key_across_contexts(pc: RTCPeerConnection) -> None:
    # Two contexts sending under the same KID and key must never reuse a CTR (nonce).
    a = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY)).attach_sender(
        pc.addTransceiver("audio").sender
    )
    b = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY)).attach_sender(
        pc.addTransceiver("audio").sender
    )
    ctrs = []
    for hook in (a, b, a, b):
        sealed = hook.seal("opus", b"\xfc opus frame")
        assert sealed is not None
        ctrs.append(sf.decode_header(sealed)[0].ctr)
    assert len(set(ctrs)) == 4
    assert ctrs == sorted(ctrs)


def test_counter_survives_the_last_context_for_a_key() -> None:
    kid, key = sf.compose_kid(9, 3), bytes(range(200, 216))
    first = E2eeContext(E2eeConfig(send_kid=kid, send_key=key))
    assert first._send is not None
    first._send.sender.protect(b"frame one, twenty bytes")
    del first
    gc.collect()
    again = E2eeContext(E2eeConfig(send_kid=kid, send_key=key))
    assert again._send is not None
    assert again._send.sender.counter == 1


async def test_hooks_refuse_misuse(pc: RTCPeerConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = E2eeContext(E2eeConfig(send_kid=KID, send_key=KEY))
    sender = pc.addTransceiver("audio").sender
    ctx.attach_sender(sender)
    with pytest.raises(ValueError, match="already"):
        ctx.attach_sender(sender)
    with pytest.raises(ValueError, match="no send_kid"):
        E2eeContext(E2eeConfig()).attach_sender(pc.addTransceiver("audio").sender)
    with pytest.raises(ValueError, match="together"):
        E2eeConfig(send_kid=KID)
    assert KEY.hex() not in repr(E2eeConfig(send_kid=KID, send_key=KEY, receive_keys={KID: KEY}))

    monkeypatch.setattr(aiortc, "__version__", "1.17.0")
    with pytest.raises(E2eeUnsupportedError, match=r"1\.16\.x"):
        check_aiortc_version()
    with pytest.raises(E2eeUnsupportedError):
        ctx.attach_sender(pc.addTransceiver("video").sender)
    with pytest.raises(E2eeUnsupportedError):
        ctx.attach_receiver(pc.addTransceiver("video").receiver)


def test_importing_the_client_package_stays_cheap() -> None:
    code = (
        "import sys\n"
        "import sfu.client\n"
        "from sfu.client import E2eeConfig, E2eeContext\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('aiortc', 'av'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""
