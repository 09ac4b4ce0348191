"""One subscriber on a slow link: what the SFU sends it, and whether the others suffer.

    .venv/bin/python bench/slow_subscriber.py [--seconds 20] [--link-kbps 350] [--json out.json]

Everything runs in this process and on 127.0.0.1: the SFU (`sfu.app.Server`), one aiortc WHIP
publisher sending 640x480 video with detail and motion at 30 frames/s (a scrolling random
texture plus fresh grain; aiortc's VP8 encoder targets 500 kbit/s and sends about 1 Mbit/s
of it, 0.5-2 Mbit/s in any one second; `--pattern noise` sends incompressible noise, about
23 Mbit/s), and two aiortc WHEP subscribers, each behind its own UDP relay:

- "limited": the relay paces the SFU->client direction through a token bucket at --link-kbps
  (bucket depth 2 x 1500 bytes) with a drop-tail queue of --queue-ms at that rate; the
  client->SFU direction (ICE checks, RTCP: NACK, PLI, receiver reports) passes untouched;
- "other": the relay passes both directions untouched; it only counts.

Two phases of the same length, each with a fresh SFU and fresh peers: a baseline where neither
relay limits, then the run with the limit. Every second of each window it records what the
SFU sent toward each subscriber (counted at the relay's SFU-facing socket, before any
limiter; SRTP/SRTCP/STUN datagram payload bytes, no IP/UDP headers), what got through the
limiter, what it dropped, frames/s decoded by each subscriber (`track.recv()`), frames/s the
publisher produced and the video bit rate the SFU received from it. `/metrics` is scraped
before and after each window for `sfu_nacks_total`, `sfu_rtx_packets_sent_total`,
`sfu_keyframe_requests_total` and `sfu_keyframe_requests_received_total`.

It prints a table per phase and a JSON summary: the SFU->limited rate against the link rate
(goal: at most about 2x once the media alone fits the link; without simulcast the SFU cannot
send less than the media, so the output says when the media alone exceeds the link) and the
other subscriber's decoded frame rate against the baseline (goal: at least 90 %).
A run takes 2 x (--seconds + --warmup) plus a second or two (45 s with the defaults), and
stops by itself.
See docs/performance.md, "A subscriber on a slow link".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import logging
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import aioice.ice  # noqa: E402
import numpy as np  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamTrack, VideoStreamTrack  # noqa: E402
from av import VideoFrame  # noqa: E402

from sfu.app import Server  # noqa: E402
from sfu.config import Config, load_config  # noqa: E402
from sfu.control.auth import mint_token  # noqa: E402


# aioice leaves 127.0.0.1 out of the host candidates it gathers; all traffic must stay on
# loopback, so every aiortc peer gathers loopback alone.
def _loopback_only(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    return ["127.0.0.1"]


aioice.ice.get_host_addresses = _loopback_only

ROOM = "slow"
STREAM = "cam"
SDP = {"Content-Type": "application/sdp"}
WIDTH, HEIGHT = 640, 480
MTU = 1500
BUCKET_BYTES = 2 * MTU
METRICS = (
    "sfu_nacks_total",
    "sfu_rtx_packets_sent_total",
    "sfu_keyframe_requests_total",
    "sfu_keyframe_requests_received_total",
)
DOWNTRACK_FIELDS = (
    "packets_sent",
    "octets_sent",
    "nacks_received",
    "nacks_served",
    "nack_misses",
    "rtx_sent",
    "keyframe_requests_suppressed",
)
FPS_GOAL = 0.9
RATIO_GOAL = 2.0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config() -> Config:
    return load_config(
        None,
        env={
            "SFU_HTTP__PORT": str(free_port()),
            "SFU_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM)),
        },
    )


def bearer(server: Server, identity: str, *, publish: bool) -> dict[str, str]:
    token = mint_token(
        server.config,
        room=ROOM,
        identity=identity,
        publish=publish,
        subscribe=not publish,
        ttl=300,
    )
    return {"Authorization": f"Bearer {token}"}


class MovingTrack(VideoStreamTrack):
    """640x480 video with detail and motion at 30 frames/s.

    `texture` (the default): a random texture of 2x2-pixel blocks scrolling by (3, 2) pixels a
    frame, plus fresh film grain of +-12 on every pixel, so the encoder has both motion to
    track and new detail in every frame; aiortc's VP8 encoder (CBR, 500 kbit/s target) sends
    about 1 Mbit/s of it (0.5-2 Mbit/s in any one second). `noise`: fresh random noise in
    every plane, which VP8 cannot compress at all (about 23 Mbit/s whatever the target).
    """

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.rng = np.random.default_rng(7)
        coarse = self.rng.integers(0, 256, size=(HEIGHT // 2 + 64, WIDTH // 2 + 64), dtype=np.uint8)
        self.texture = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
        self.sent = 0

    def image(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        rng = self.rng
        if self.pattern == "noise":
            return rng.integers(0, 256, size=(HEIGHT * 3 // 2, WIDTH), dtype=np.uint8)
        x, y = (3 * self.sent) % 128, (2 * self.sent) % 128
        luma = self.texture[y : y + HEIGHT, x : x + WIDTH].astype(np.int16)
        luma += rng.integers(-12, 13, size=(HEIGHT, WIDTH), dtype=np.int16)
        # Chroma: the same texture at half resolution and low contrast (full contrast makes it
        # about 4 Mbit/s), also moving, packed as U then V rows.
        chroma = self.texture[y : y + HEIGHT : 2, x : x + WIDTH : 2] // 8 + 112
        uv = chroma.reshape(HEIGHT // 4, WIDTH)
        return np.vstack([np.clip(luma, 0, 255).astype(np.uint8), uv, uv[::-1]])

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(self.image(), format="yuv420p")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


class FrameCounter:
    """Consumes a subscriber's track: frames decoded so far."""

    def __init__(self) -> None:
        self.frames = 0
        self.tasks: list[asyncio.Task[None]] = []

    def on_track(self, track: MediaStreamTrack) -> None:
        self.tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except Exception:
                return
            self.frames += 1


def _is_rtcp(data: bytes) -> bool:
    return len(data) > 1 and 127 < data[0] < 192 and 192 <= data[1] <= 223


class Relay(asyncio.DatagramProtocol):
    """UDP relay between one client (front socket) and the SFU (back socket).

    Client->SFU passes untouched. SFU->client is counted as it arrives on the back socket,
    then, with a rate, paced through a token bucket (depth BUCKET_BYTES, refilled at the link
    rate) behind a drop-tail queue of `queue_bytes`; a timer (`loop.call_later`) wakes the
    sender when the head packet's tokens will be there. Without a rate it only counts.
    """

    def __init__(self, target: tuple[str, int], link_kbps: float | None, queue_ms: float) -> None:
        self.target = target
        self.rate = link_kbps * 1000 / 8 if link_kbps else None  # bytes per second
        self.queue_bytes = max(MTU, int(self.rate * queue_ms / 1000)) if self.rate else 0
        self.client: tuple[str, int] | None = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.tokens = float(BUCKET_BYTES)
        self.refilled_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Cumulative counters, sampled by the caller.
        self.in_packets = 0  # from the SFU, before the limiter
        self.in_bytes = 0
        self.in_rtcp_packets = 0
        self.out_packets = 0  # delivered to the client
        self.out_bytes = 0
        self.dropped_packets = 0
        self.dropped_bytes = 0
        self.up_packets = 0  # client->SFU
        self.up_bytes = 0
        self.max_queued = 0

    async def start(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        self.refilled_at = loop.time()
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay.from_sfu(data)

        self.front, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.back, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
        return int(self.front.get_extra_info("sockname")[1])

    @property
    def back_port(self) -> int:
        assert self.back is not None
        return int(self.back.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        if self.back is not None:
            self.up_packets += 1
            self.up_bytes += len(data)
            self.back.sendto(data, self.target)

    def from_sfu(self, data: bytes) -> None:
        self.in_packets += 1
        self.in_bytes += len(data)
        if _is_rtcp(data):
            self.in_rtcp_packets += 1
        if self.rate is None:
            self._deliver(data)
            return
        if self.queued + len(data) > self.queue_bytes:
            self.dropped_packets += 1
            self.dropped_bytes += len(data)
            return
        self.queue.append(data)
        self.queued += len(data)
        self.max_queued = max(self.max_queued, self.queued)
        if self.timer is None:
            self._drain()

    def _drain(self) -> None:
        self.timer = None
        assert self.loop is not None
        assert self.rate is not None
        now = self.loop.time()
        self.tokens = min(BUCKET_BYTES, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        queue = self.queue
        while queue and self.tokens >= len(queue[0]):
            data = queue.popleft()
            self.queued -= len(data)
            self.tokens -= len(data)
            self._deliver(data)
        if queue:
            wait = (len(queue[0]) - self.tokens) / self.rate
            self.timer = self.loop.call_later(wait, self._drain)

    def _deliver(self, data: bytes) -> None:
        if self.client is not None and self.front is not None:
            self.out_packets += 1
            self.out_bytes += len(data)
            self.front.sendto(data, self.client)

    def snapshot(self) -> dict[str, int]:
        return {
            "in_packets": self.in_packets,
            "in_bytes": self.in_bytes,
            "out_packets": self.out_packets,
            "out_bytes": self.out_bytes,
            "dropped_packets": self.dropped_packets,
            "up_packets": self.up_packets,
        }

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for transport in (self.front, self.back):
            if transport is not None:
                transport.close()


async def post_offer(url: str, sdp: str, headers: dict[str, str]) -> str:
    async with aiohttp.ClientSession() as http, http.post(url, data=sdp, headers=headers) as r:
        body = await r.text()
        if r.status != 201:
            raise RuntimeError(f"{url}: {r.status} {body}")
        return body


async def publish(server: Server, track: MovingTrack) -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.addTransceiver(track, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    body = await post_offer(
        f"{server.url}/whip/{ROOM}/{STREAM}",
        pc.localDescription.sdp,
        {**SDP, **bearer(server, "pub", publish=True)},
    )
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc


async def subscribe_via(
    server: Server, relay_port: int, identity: str
) -> tuple[RTCPeerConnection, FrameCounter]:
    pc = RTCPeerConnection()
    counter = FrameCounter()
    pc.on("track", counter.on_track)
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    body = await post_offer(
        f"{server.url}/whep/{ROOM}/{STREAM}",
        pc.localDescription.sdp,
        {**SDP, **bearer(server, identity, publish=False)},
    )
    sfu_candidate = f"127.0.0.1 {server.config.rtc.udp_port} typ host"
    if sfu_candidate not in body:
        raise RuntimeError("the WHEP answer has no 127.0.0.1 host candidate to redirect")
    answer = body.replace(sfu_candidate, f"127.0.0.1 {relay_port} typ host")
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, counter


async def scrape(server: Server) -> dict[str, float]:
    """The counters of METRICS from /metrics, keyed `name{labels}`."""
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if match and match.group(1) in METRICS:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def downtrack_stats(server: Server, back_port: int) -> dict[str, float]:
    """The SFU's own counters for the video copy it sends to the relay at `back_port`."""
    for session in server.rooms.all_sessions():
        for producer in session.producers:
            for downtrack in producer.downtracks:
                addr = getattr(downtrack.sink, "addr", None)
                if addr is not None and addr[1] == back_port:
                    stats: dict[str, float] = {
                        name: float(getattr(downtrack, name)) for name in DOWNTRACK_FIELDS
                    }
                    stats["rtt_ms"] = round(downtrack.rtt * 1000, 1)
                    return stats
    return {}


async def wait_for(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Phase:
    name: str
    link_kbps: float | None
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def kbps(octets: float, seconds: float) -> float:
    return octets * 8 / 1000 / seconds if seconds > 0 else 0.0


async def run_phase(phase: Phase, args: argparse.Namespace) -> None:
    server = Server(make_config())
    await server.start()
    target = ("127.0.0.1", server.config.rtc.udp_port)
    limited = Relay(target, phase.link_kbps, args.queue_ms)
    other = Relay(target, None, args.queue_ms)
    peers: list[RTCPeerConnection] = []
    counters: list[FrameCounter] = []
    try:
        limited_port, other_port = await limited.start(), await other.start()
        track = MovingTrack(args.pattern)
        peers.append(await publish(server, track))
        video = server.engine.stats.by_kind["video"]
        await wait_for(lambda: video[0] > 0, 20, "video from the publisher at the SFU")
        lim_pc, lim = await subscribe_via(server, limited_port, "sub-limited")
        oth_pc, oth = await subscribe_via(server, other_port, "sub-other")
        peers += [lim_pc, oth_pc]
        counters += [lim, oth]
        await wait_for(lambda: oth.frames >= 10, 30, "the other subscriber decoding video")
        await wait_for(
            lambda: lim_pc.connectionState == "connected", 30, "the limited subscriber connected"
        )
        await asyncio.sleep(args.warmup)

        relays = {"limited": limited, "other": other}
        metrics_before = await scrape(server)
        dts_before = {k: downtrack_stats(server, r.back_port) for k, r in relays.items()}
        start = time.monotonic()
        base = {
            "t": start,
            "pub_frames": track.sent,
            "pub_packets": video[0],
            "pub_bytes": video[1],
            "lim_frames": lim.frames,
            "oth_frames": oth.frames,
            **{f"lim_{k}": v for k, v in limited.snapshot().items()},
            **{f"oth_{k}": v for k, v in other.snapshot().items()},
        }
        first = dict(base)
        for second in range(1, args.seconds + 1):
            await asyncio.sleep(max(0.0, start + second - time.monotonic()))
            now = {
                "t": time.monotonic(),
                "pub_frames": track.sent,
                "pub_packets": video[0],
                "pub_bytes": video[1],
                "lim_frames": lim.frames,
                "oth_frames": oth.frames,
                **{f"lim_{k}": v for k, v in limited.snapshot().items()},
                **{f"oth_{k}": v for k, v in other.snapshot().items()},
            }
            phase.rows.append(rates(base, now))
            base = now
        metrics_after = await scrape(server)
        dts_after = {k: downtrack_stats(server, r.back_port) for k, r in relays.items()}
        total = rates(first, base)
        phase.summary = {
            "window_s": round(total["seconds"], 2),
            "mean": {k: round(v, 1) for k, v in total.items() if k != "t"},
            "metrics_delta": {
                k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0)
                for k in sorted(set(metrics_after) | set(metrics_before))
            },
            "downtrack_delta": {
                who: {
                    k: round(dts_after[who].get(k, 0.0) - dts_before[who].get(k, 0.0), 1)
                    for k in DOWNTRACK_FIELDS
                }
                | {"rtt_ms_end": dts_after[who].get("rtt_ms", 0.0)}
                for who in relays
            },
            "limited_relay": {
                "queue_limit_bytes": limited.queue_bytes,
                "max_queued_bytes": limited.max_queued,
            },
        }
    finally:
        for pc in peers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5)
        for counter in counters:
            for task in counter.tasks:
                task.cancel()
        limited.close()
        other.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.close(), 10)


def rates(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    dt = b["t"] - a["t"]

    def per_s(key: str) -> float:
        return (b[key] - a[key]) / dt if dt > 0 else 0.0

    return {
        "seconds": dt,
        "pub_fps": per_s("pub_frames"),
        "pub_kbps": kbps(b["pub_bytes"] - a["pub_bytes"], dt),
        "lim_sfu_pps": per_s("lim_in_packets"),
        "lim_sfu_kbps": kbps(b["lim_in_bytes"] - a["lim_in_bytes"], dt),
        "lim_link_pps": per_s("lim_out_packets"),
        "lim_link_kbps": kbps(b["lim_out_bytes"] - a["lim_out_bytes"], dt),
        "lim_dropped_pps": per_s("lim_dropped_packets"),
        "lim_up_pps": per_s("lim_up_packets"),
        "lim_fps": per_s("lim_frames"),
        "oth_sfu_pps": per_s("oth_in_packets"),
        "oth_sfu_kbps": kbps(b["oth_in_bytes"] - a["oth_in_bytes"], dt),
        "oth_fps": per_s("oth_frames"),
    }


COLUMNS = (
    ("pub_fps", "pub f/s", "{:.0f}"),
    ("pub_kbps", "pub kb/s", "{:.0f}"),
    ("lim_sfu_pps", "→lim p/s", "{:.0f}"),
    ("lim_sfu_kbps", "→lim kb/s", "{:.0f}"),
    ("lim_link_kbps", "link kb/s", "{:.0f}"),
    ("lim_dropped_pps", "drop p/s", "{:.0f}"),
    ("lim_up_pps", "lim↑ p/s", "{:.0f}"),
    ("lim_fps", "lim f/s", "{:.1f}"),
    ("oth_sfu_pps", "→oth p/s", "{:.0f}"),
    ("oth_sfu_kbps", "→oth kb/s", "{:.0f}"),
    ("oth_fps", "oth f/s", "{:.1f}"),
)


def print_table(phase: Phase) -> None:
    limit = f"{phase.link_kbps:g} kbit/s" if phase.link_kbps else "no limit"
    print(f"\n== {phase.name} (limited subscriber's link: {limit}) ==")
    print(" ".join(["  s"] + [f"{title:>9}" for _, title, _ in COLUMNS]))
    for index, row in enumerate(phase.rows, 1):
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        print(" ".join([f"{index:>3}"] + [f"{c:>9}" for c in cells]))
    mean = phase.summary["mean"]
    cells = [fmt.format(mean[key]) for key, _, fmt in COLUMNS]
    print(" ".join(["avg"] + [f"{c:>9}" for c in cells]))
    for name, value in phase.summary["metrics_delta"].items():
        print(f"    {name}: +{value:g}")
    for who, stats in phase.summary["downtrack_delta"].items():
        print(f"    SFU down-track to {who}: " + ", ".join(f"{k} {v:g}" for k, v in stats.items()))


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def summarise(baseline: Phase, limited: Phase, args: argparse.Namespace) -> dict[str, Any]:
    lim, base = limited.summary["mean"], baseline.summary["mean"]
    link = float(args.link_kbps)
    # The media alone: what the SFU sends the unconstrained subscriber in the same run.
    media = lim["oth_sfu_kbps"]
    to_limited = lim["lim_sfu_kbps"]
    media_exceeds = media > link
    fps_ratio = lim["oth_fps"] / base["oth_fps"] if base["oth_fps"] else 0.0
    ratio = to_limited / link
    notes = []
    if media_exceeds:
        notes.append(
            f"the publisher's media alone ({media:.0f} kbit/s as sent to the other "
            f"subscriber) exceeds the link ({link:g} kbit/s): without simulcast the SFU cannot "
            f"send less than the media, so the <= {RATIO_GOAL:g}x goal does not apply; "
            "compare the SFU->limited rate with the media rate instead"
        )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "link_kbps": link,
        "queue_ms": args.queue_ms,
        "pattern": args.pattern,
        "publisher": {
            "frames_per_s": lim["pub_fps"],
            "video_kbps_at_sfu": lim["pub_kbps"],
            "baseline_frames_per_s": base["pub_fps"],
            "baseline_video_kbps_at_sfu": base["pub_kbps"],
        },
        "media_kbps": media,
        "media_exceeds_link": media_exceeds,
        "sfu_to_limited_kbps": to_limited,
        "sfu_to_limited_pps": lim["lim_sfu_pps"],
        "through_link_kbps": lim["lim_link_kbps"],
        "dropped_by_link_pps": lim["lim_dropped_pps"],
        "ratio_to_link": round(ratio, 2),
        "ratio_to_media": round(to_limited / media, 2) if media else None,
        "ratio_goal_met": None if media_exceeds else ratio <= RATIO_GOAL,
        "limited_fps": lim["lim_fps"],
        "other_fps": lim["oth_fps"],
        "other_fps_baseline": base["oth_fps"],
        "other_fps_ratio": round(fps_ratio, 3),
        "other_fps_goal_met": fps_ratio >= FPS_GOAL,
        "notes": notes,
        "baseline": baseline.summary,
        "limited": limited.summary,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    baseline = Phase("baseline", None)
    limited = Phase("limited", float(args.link_kbps))
    budget = args.seconds + args.warmup + 90
    for phase in (baseline, limited):
        started = time.monotonic()
        print(f"running {phase.name} ({args.warmup:g} s warm-up + {args.seconds} s) ...")
        await asyncio.wait_for(run_phase(phase, args), budget)
        print_table(phase)
        print(f"    phase took {time.monotonic() - started:.1f} s")
    return summarise(baseline, limited, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="measurement window per phase")
    parser.add_argument("--link-kbps", type=float, default=350, help="the slow link's rate")
    parser.add_argument(
        "--queue-ms", type=float, default=100, help="the slow link's drop-tail queue, in ms"
    )
    parser.add_argument(
        "--pattern",
        choices=("texture", "noise"),
        default="texture",
        help="the publisher's video: moving texture with grain, or incompressible noise",
    )
    parser.add_argument("--warmup", type=float, default=2, help="seconds before each window")
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    if args.seconds < 1 or args.link_kbps <= 0:
        parser.error("--seconds must be >= 1 and --link-kbps > 0")
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()
    summary = asyncio.run(main_async(args))
    summary["run_time_s"] = round(time.monotonic() - started, 1)
    print("\n" + json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\nSFU -> limited subscriber: {summary['sfu_to_limited_kbps']:.0f} kbit/s = "
        f"{summary['ratio_to_link']:.2f}x the {args.link_kbps:g} kbit/s link "
        f"({summary['ratio_to_media']}x the media, {summary['media_kbps']:.0f} kbit/s)"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    print(
        f"other subscriber: {summary['other_fps']:.1f} frames/s vs "
        f"{summary['other_fps_baseline']:.1f} in the baseline "
        f"({summary['other_fps_ratio']:.0%}, goal >= {FPS_GOAL:.0%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
