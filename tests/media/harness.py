"""Real SFU and real aiortc peers, all on 127.0.0.1, for media-plane tests."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aioice.ice
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from av import AudioFrame, VideoFrame
from multidict import CIMultiDict

from sfu.app import Server
from sfu.config import Config, load_config
from sfu.control.auth import mint_token
from tests.conftest import free_port

# aioice leaves 127.0.0.1 out of the host candidates it gathers; the tests must use only it
# (docs/testing.md), so every aiortc peer gathers loopback alone.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]

SDP = {"Content-Type": "application/sdp"}


def make_config(**env: str) -> Config:
    return load_config(
        None,
        env={
            "SFU_HTTP__PORT": str(free_port()),
            "SFU_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM)),
            **env,
        },
    )


@pytest.fixture
async def sfu() -> AsyncIterator[Server]:
    async with running_server() as server:
        yield server


@contextlib.asynccontextmanager
async def running_server(**env: str) -> AsyncIterator[Server]:
    """A started SFU on the test config with `env` overrides (SFU_SECTION__KEY=value)."""
    server = Server(make_config(**env))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def metrics_text(server: Server) -> str:
    """The server's /metrics page."""
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        assert r.status == 200
        return await r.text()


def metric_value(text: str, name: str) -> float:
    """`name`'s samples in a /metrics page, summed over their labels (0 if absent); `name`
    may include a label set, e.g. 'sfu_rtp_packets_total{direction="out",kind="video"}'."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def token(server: Server, room: str = "room1", identity: str = "alice", **grants: bool) -> str:
    return mint_token(
        server.config,
        room=room,
        identity=identity,
        publish=grants.get("publish", False),
        subscribe=grants.get("subscribe", False),
        ttl=300,
    )


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


class ColourTrack(VideoStreamTrack):
    """Small frames of one known colour, so decoded output can be checked cheaply."""

    def __init__(
        self, rgb: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (160, 120)
    ):
        super().__init__()
        self.frame = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        self.frame[:, :] = rgb
        self.sent = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(self.frame, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone: audible audio, unlike aiortc's default silence."""

    def __init__(self) -> None:
        super().__init__()
        self._t = 0

    async def recv(self) -> AudioFrame:
        # The parent paces 20 ms frames at its own rate (8 kHz); the tone fills the same
        # 20 ms at 48 kHz, so the encoder sends 50 Opus packets a second, as a real sender.
        frame = await super().recv()
        samples = frame.samples * 48000 // frame.sample_rate
        t = (np.arange(samples) + self._t) / 48000
        data = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1)
        out = AudioFrame.from_ndarray(data, format="s16", layout="mono")
        out.sample_rate, out.pts, out.time_base = 48000, self._t, fractions.Fraction(1, 48000)
        self._t += samples
        return out


async def post_offer(
    url: str, sdp: str, headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], str, CIMultiDict[str]]:
    """POST an offer: (status, headers, body, headers) — headers twice for tuple unpacking
    convenience; they are case-insensitive and keep repeated fields (Link)."""
    async with aiohttp.ClientSession() as http, http.post(url, data=sdp, headers=headers) as r:
        copy = CIMultiDict(r.headers)
        return r.status, copy, await r.text(), copy


async def publish(
    server: Server, stream: str = "cam", room: str = "room1", tracks: list[Any] | None = None
) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    for track in tracks if tracks is not None else [ColourTrack(), ToneTrack()]:
        pc.addTransceiver(track, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    status, headers, body, _ = await post_offer(
        f"{server.url}/whip/{room}/{stream}",
        pc.localDescription.sdp,
        {**SDP, **bearer(token(server, room, "pub-" + stream, publish=True))},
    )
    assert status == 201, body
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, headers["Location"]


class Counter:
    """Decoded frames per kind of every track handed to `on_track`; `on_video` also sees
    each video frame."""

    def __init__(self, on_video: Callable[[VideoFrame], None] | None = None) -> None:
        self.frames: dict[str, int] = {"audio": 0, "video": 0}
        self.last_video: VideoFrame | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.on_video = on_video

    def on_track(self, track: Any, *_transceiver: Any) -> None:
        """aiortc's "track" event handler; the room client also passes the transceiver."""
        self.tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return
            self.frames[track.kind] += 1
            if track.kind == "video":
                self.last_video = frame
                if self.on_video is not None:
                    self.on_video(frame)


_viewers = itertools.count(1)


async def subscribe(
    server: Server,
    stream: str = "cam",
    room: str = "room1",
    kinds: tuple[str, ...] = ("video", "audio"),
) -> tuple[RTCPeerConnection, Counter]:
    pc = RTCPeerConnection()
    counter = Counter()
    pc.on("track", counter.on_track)
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    status, _, body, _ = await post_offer(
        f"{server.url}/whep/{room}/{stream}",
        pc.localDescription.sdp,
        # One identity per viewer, as limits.max_sessions_per_identity expects of real ones.
        {**SDP, **bearer(token(server, room, f"sub-{next(_viewers)}", subscribe=True))},
    )
    assert status == 201, body
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, counter


async def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
