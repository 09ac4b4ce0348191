"""Call quality in real headless Chromium: SFU against peer to peer, and a wrong passphrase.

    .venv/bin/python bench/call_quality.py [--scenario bitrate|wrong-passphrase|all]
                                           [--seconds 24] [--json out.json]

Everything runs on 127.0.0.1: the script starts `python -m sfu serve` on free ports (dev mode,
announcing 127.0.0.1 only) and Debian's Chromium through Playwright (the flags of
tests/chromium.py; never `playwright install`). Every browser's fake camera plays a clip the
script writes with numpy: 640x480 at 30 frames/s, 3 s looped, a scrolling tileable texture
with fine detail, a moving gradient band and fresh grain in every frame, so the encoder needs
all the bit rate it is given. The demo page asks for 640x480 at 24 frames/s, and so does the
peer-to-peer page.

bitrate: two browsers, A and B, in a call on the demo page through the SFU; then the same two
browsers and the same clip connected directly (a minimal page, offer and answer passed through
Playwright, only the 127.0.0.1 host candidates kept). For each run and each sender it samples
once a second, for --seconds from the moment both send video: the sender's video
`outbound-rtp` (bytesSent, frameWidth x frameHeight, qualityLimitationReason) and its
selected `candidate-pair` availableOutgoingBitrate (the send-side estimate). Bit rates are
payload bytes over the 2 s ending at the time named. The goal: the SFU call's senders reach at
least 80 % of the peer-to-peer bit rate within 20 s.

wrong-passphrase: three browsers in a room on the demo page, twice, each time with a fresh
SFU: A and B with the same passphrase and C with the same one ("right"), then C with another
("wrong"). After both A and B decode each other and a warm-up, it measures for --seconds the
frames/s each of A and B decodes of the other (framesDecoded), the keyframes among them, and
scrapes the SFU's /metrics before and after: sfu_keyframe_requests_total (forwarded,
throttled, suppressed), sfu_keyframe_requests_received_total (pli, fir) and
sfu_transport_feedback_sent_total. The goal: A and B decode at least 90 % of the frame rate of
the right-passphrase call.

Both scenarios also record the machine's CPU use in each window (and the SFU's share), since
on a small machine the browsers' own encoders and decoders compete with the SFU.

At most three browsers run at once. It prints a table per scenario and a JSON summary (the
per-second series only with --json), and stops by itself: about 55 s for bitrate and 65 s
for wrong-passphrase with the defaults, 2 minutes for all (2 cores). See
docs/performance.md, "Call quality in real browsers".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's tests package is a sibling

from bench.sfu_process import SfuProcess, free_port  # noqa: E402
from tests.chromium import CHROMIUM_FLAGS as TEST_CHROMIUM_FLAGS  # noqa: E402

CHROMIUM = os.environ.get("BLINDFOLD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The tests' flags (docs/testing.md): loopback candidates, no mDNS, no background network.
CHROMIUM_FLAGS = list(TEST_CHROMIUM_FLAGS)

WIDTH, HEIGHT, FPS, CLIP_SECONDS = 640, 480, 30, 3
BITRATE_GOAL = 0.80
FPS_GOAL = 0.90
RATE_WINDOW = 2.0  # seconds a bit rate is averaged over
WARMUP = 4.0  # seconds between "both decode each other" and a frame-rate window
METRICS = (
    "sfu_keyframe_requests_total",
    "sfu_keyframe_requests_received_total",
    "sfu_transport_feedback_sent_total",
)

# Runs before any page script: remembers every RTCPeerConnection the page creates (the demo's
# client keeps its own), and samples their video stats. The page's CSP does not apply to it.
INIT_SCRIPT = """
(() => {
  const Original = window.RTCPeerConnection;
  if (typeof Original !== 'function' || window.__bench) return;
  const pcs = [];
  class Tracked extends Original {
    constructor(...args) { super(...args); pcs.push(this); }
  }
  window.RTCPeerConnection = Tracked;
  window.__bench = {
    pcs,
    async sample() {
      const out = { t: Date.now(), outbound: null, pair: null, inbound: [] };
      for (const pc of pcs) {
        if (pc.connectionState === 'closed') continue;
        const report = await pc.getStats();
        let video = null;
        let remote = null;
        let selected = null;
        report.forEach((s) => {
          if (s.type === 'outbound-rtp' && s.kind === 'video') video = s;
          if (s.type === 'remote-inbound-rtp' && s.kind === 'video') remote = s;
          if (s.type === 'transport' && s.selectedCandidatePairId) {
            selected = report.get(s.selectedCandidatePairId) ?? null;
          }
          if (s.type === 'inbound-rtp' && s.kind === 'video') {
            out.inbound.push({
              bytesReceived: s.bytesReceived ?? 0,
              framesDecoded: s.framesDecoded ?? 0,
              keyFramesDecoded: s.keyFramesDecoded ?? 0,
              frameWidth: s.frameWidth ?? null,
              frameHeight: s.frameHeight ?? null,
            });
          }
        });
        if (selected === null) {
          report.forEach((s) => {
            if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') selected = s;
          });
        }
        if (video !== null) {
          out.outbound = {
            timestamp: video.timestamp,
            bytesSent: video.bytesSent ?? 0,
            framesEncoded: video.framesEncoded ?? 0,
            keyFramesEncoded: video.keyFramesEncoded ?? 0,
            frameWidth: video.frameWidth ?? null,
            frameHeight: video.frameHeight ?? null,
            framesPerSecond: video.framesPerSecond ?? null,
            qualityLimitationReason: video.qualityLimitationReason ?? null,
            pliCount: video.pliCount ?? 0,
            nackCount: video.nackCount ?? 0,
            // What the receiver (the SFU or the other browser) reports back in RTCP RRs.
            fractionLost: remote?.fractionLost ?? null,
            roundTripTime: remote?.roundTripTime ?? null,
          };
          out.pair = selected === null ? null : {
            availableOutgoingBitrate: selected.availableOutgoingBitrate ?? null,
            currentRoundTripTime: selected.currentRoundTripTime ?? null,
          };
        }
      }
      return out;
    },
  };
})();
"""

# The peer-to-peer page: one connection, camera and microphone as the demo asks for them.
P2P_SCRIPT = """
(() => {
  let pc = null;
  const keep = (line) => !line.startsWith('a=candidate:')
    || (/ udp /i.test(line) && line.includes(' 127.0.0.1 '));
  const loopbackOnly = (sdp) => sdp.split('\\r\\n').filter(keep).join('\\r\\n');
  const gathered = () => new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') { resolve(); return; }
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') resolve();
    });
  });
  window.__p2p = {
    async start() {
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 24 } },
      });
      pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' });
      for (const track of stream.getTracks()) pc.addTrack(track, stream);
      pc.ontrack = (event) => {
        if (event.track.kind !== 'video') return;
        const video = document.createElement('video');
        video.autoplay = true;
        video.muted = true;
        video.playsInline = true;
        video.srcObject = new MediaStream([event.track]);
        document.body.append(video);
      };
    },
    async offer() {
      await pc.setLocalDescription(await pc.createOffer());
      await gathered();
      return loopbackOnly(pc.localDescription.sdp);
    },
    async answer(sdp) {
      await pc.setRemoteDescription({ type: 'offer', sdp });
      await pc.setLocalDescription(await pc.createAnswer());
      await gathered();
      return loopbackOnly(pc.localDescription.sdp);
    },
    async accept(sdp) { await pc.setRemoteDescription({ type: 'answer', sdp }); },
    state: () => pc?.connectionState ?? 'new',
  };
})();
"""


# --- the fake camera --------------------------------------------------------------------------


def write_clip(path: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    """A Y4M clip (I420, 30 frames/s, 3 s) that costs an encoder real bits: a tileable
    texture (1/f-filtered noise) scrolling across and slowly down, a gradient band sweeping
    across, fresh grain in every frame, and slowly shifting colour."""
    rng = np.random.default_rng(7)
    frames = FPS * CLIP_SECONDS

    def texture(h: int, w: int, power: float) -> np.ndarray:
        # Filtering white noise in the frequency domain gives a periodic (tileable) texture.
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.fft.fftfreq(w)[None, :]
        radius = np.sqrt(fx * fx + fy * fy)
        radius[0, 0] = 1.0
        spectrum = np.fft.fft2(rng.standard_normal((h, w))) / radius**power
        spectrum[0, 0] = 0
        out: np.ndarray = np.real(np.fft.ifft2(spectrum))
        normalised: np.ndarray = (out - out.mean()) / out.std()
        return normalised

    luma = texture(height, width, 0.9)
    cb = texture(height // 2, width // 2, 1.4)
    cr = texture(height // 2, width // 2, 1.4)
    xs = np.arange(width)[None, :]
    header = f"YUV4MPEG2 W{width} H{height} F{FPS}:1 Ip A1:1 C420jpeg\n".encode()
    with path.open("wb") as out:
        out.write(header)
        for i in range(frames):
            phase = i / frames  # one full cycle per loop, so the loop is seamless
            dx, dy = round(phase * width), round(phase * height)
            y = 128 + 38 * np.roll(luma, (dy, dx), axis=(0, 1))
            band = 40 * np.exp(-(((xs - phase * width) % width - width / 2) ** 2) / (2 * 60**2))
            y = y + band + rng.normal(0, 5, (height, width))
            u = 128 + 22 * np.roll(cb, (dy // 2, -dx // 2), axis=(0, 1))
            v = 128 + 22 * np.roll(cr, (-dy // 2, dx // 2), axis=(0, 1))
            u = u + 12 * np.sin(2 * np.pi * phase)
            out.write(b"FRAME\n")
            for plane in (y, u, v):
                out.write(np.clip(plane, 16, 240).astype(np.uint8).tobytes())
    return path


# --- the SFU ------------------------------------------------------------------------------------


class Sfu(SfuProcess):
    """The SFU of the call, with its counters read from /metrics."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, {"drain_timeout": "1s"}, ready_timeout=20)

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """The counters of METRICS, one entry per series (`name{labels}`)."""
        async with http.get(f"{self.base}/metrics") as response:
            text = await response.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(METRICS):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before per series, with short names: `keyframe_requests{result="forwarded"}`
    becomes `forwarded`, and so on."""
    out: dict[str, float] = {}
    for series in sorted(after):
        value = after[series] - before.get(series, 0.0)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if series.startswith("sfu_keyframe_requests_total"):
            out[labels.get("result", "?")] = value
        elif series.startswith("sfu_keyframe_requests_received_total"):
            out[f"received_{labels.get('type', '?')}"] = value
        elif series.startswith("sfu_transport_feedback_sent_total"):
            out["transport_feedback_sent"] = value
    return out


# --- browsers -----------------------------------------------------------------------------------


class Browser:
    """One Chromium (its own profile, the clip as its camera) with one page."""

    def __init__(self, context: Any, page: Any, name: str) -> None:
        self.context = context
        self.page = page
        self.name = name
        self.console: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))

    @classmethod
    async def launch(cls, playwright: Any, profile: Path, name: str, clip: Path) -> Browser:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={clip}"],
            viewport={"width": 1000, "height": 800},
        )
        await context.add_init_script(INIT_SCRIPT)
        page = context.pages[0] if context.pages else await context.new_page()
        return cls(context, page, name)

    async def eval(self, script: str, arg: Any = None) -> Any:
        return await self.page.evaluate(script, arg)

    async def join(self, base: str, room: str, passphrase: str, within: float = 25) -> str:
        """Join `room` on the demo page; returns our participant id."""
        await self.page.goto(f"{base}/#room={room}&passphrase={passphrase}")
        await self.page.fill("#name-input", self.name)
        await self.page.click("#join-button")
        try:
            await self.page.wait_for_function(
                "() => window.blindfoldTest.joined", timeout=within * 1000
            )
        except Exception as exc:
            error = await self.page.text_content("#join-error")
            raise RuntimeError(f"{self.name} did not join: {error!r}\n{self.log()}") from exc
        me = await self.eval("() => window.blindfoldTest.self")
        return str(me["id"])

    async def sample(self) -> dict[str, Any]:
        return dict(await self.eval("() => window.__bench.sample()"))

    async def inbound_from(self, participant: str) -> dict[str, Any] | None:
        """The demo client's inbound video stats of `participant` (framesDecoded, ...)."""
        stats = await self.eval("() => window.blindfoldTest.stats()")
        for entry in (stats or {}).get("inbound", []):
            if entry["participant"] == participant and entry["kind"] == "video":
                return dict(entry)
        return None

    async def blank(self) -> None:
        """Leave whatever the page was doing (the demo leaves the room on pagehide)."""
        with contextlib.suppress(Exception):
            await self.page.goto("about:blank")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.context.close()

    def log(self) -> str:
        return "\n".join(self.console[-20:])


@contextlib.asynccontextmanager
async def browsers(
    playwright: Any, workdir: Path, clip: Path, names: list[str]
) -> AsyncIterator[list[Browser]]:
    launched: list[Browser] = []
    try:
        for name in names:
            launched.append(
                await Browser.launch(playwright, workdir / f"profile-{name}", name, clip)
            )
        yield launched
    finally:
        for browser in launched:
            await browser.close()


class CpuMeter:
    """CPU used between start() and stop(): the whole machine (% of all its cores) and,
    when given, one process (% of one core)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.start()

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    def _process(self) -> int:
        if self.pid is None:
            return 0
        with contextlib.suppress(OSError):
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
        return 0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.machine0 = self._machine()
        self.process0 = self._process()

    def stop(self) -> dict[str, float]:
        total, idle = self._machine()
        busy = 1 - (idle - self.machine0[1]) / max(1, total - self.machine0[0])
        out = {"machine_busy_pct": round(100 * busy, 1)}
        if self.pid is not None:
            ticks = self._process() - self.process0
            elapsed = time.monotonic() - self.t0
            out["sfu_pct_of_core"] = round(100 * ticks / os.sysconf("SC_CLK_TCK") / elapsed, 1)
        return out


async def until(check: Any, within: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(interval)


# --- scenario 1: bit rate through the SFU and peer to peer ------------------------------------


async def sample_senders(
    senders: list[Browser], seconds: int, cpu: dict[str, float], pid: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Once both send video, sample every sender once a second for `seconds` s (t=0 first);
    the CPU used meanwhile goes into `cpu`."""

    async def sending() -> bool:
        samples = await asyncio.gather(*(b.sample() for b in senders))
        return all((s["outbound"] or {}).get("bytesSent", 0) > 0 for s in samples)

    await until(sending, 20, "both senders to send video")
    series: dict[str, list[dict[str, Any]]] = {b.name: [] for b in senders}
    meter = CpuMeter(pid)
    second = CpuMeter()
    start = time.monotonic()
    for tick in range(seconds + 1):
        await asyncio.sleep(max(0.0, start + tick - time.monotonic()))
        samples = await asyncio.gather(*(b.sample() for b in senders))
        busy = second.stop()["machine_busy_pct"]
        second.start()
        for browser, sample in zip(senders, samples, strict=True):
            sample["elapsed"] = round(time.monotonic() - start, 2)
            sample["machine_busy_pct"] = busy if tick else None
            series[browser.name].append(sample)
    cpu.update(meter.stop())
    return series


def summarise_sender(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Bit rates (2 s windows, from the stats' own timestamps), resolution and estimate."""
    points = [s for s in samples if s["outbound"] is not None]
    t0 = points[0]["outbound"]["timestamp"]
    times = [(s["outbound"]["timestamp"] - t0) / 1000 for s in points]
    per_second = []
    for i, sample in enumerate(points):
        j = max((k for k in range(i) if times[i] - times[k] >= RATE_WINDOW - 0.25), default=None)
        kbps = None
        if j is not None:
            sent = sample["outbound"]["bytesSent"] - points[j]["outbound"]["bytesSent"]
            kbps = round(sent * 8 / (times[i] - times[j]) / 1000)
        estimate = (sample["pair"] or {}).get("availableOutgoingBitrate")
        out = sample["outbound"]
        per_second.append(
            {
                "t": round(times[i], 1),
                "kbps": kbps,
                "estimate_kbps": None if estimate is None else round(estimate / 1000),
                "resolution": f"{out['frameWidth']}x{out['frameHeight']}",
                "fps": out["framesPerSecond"],
                "limited_by": out["qualityLimitationReason"],
                "rtt_ms": None
                if out["roundTripTime"] is None
                else round(1000 * out["roundTripTime"], 1),
                "fraction_lost": out["fractionLost"],
                "machine_busy_pct": sample["machine_busy_pct"],
            }
        )

    def at(t: float) -> dict[str, Any] | None:
        near = [p for p in per_second if p["kbps"] is not None and abs(p["t"] - t) <= 0.6]
        return min(near, key=lambda p: abs(p["t"] - t)) if near else None

    rates = [p["kbps"] for p in per_second if p["kbps"] is not None]
    last = per_second[-1]
    at10, at20 = at(10), at(20)
    return {
        "kbps_10s": None if at10 is None else at10["kbps"],
        "kbps_20s": None if at20 is None else at20["kbps"],
        "kbps_max": max(rates) if rates else None,
        "estimate_kbps_10s": None if at10 is None else at10["estimate_kbps"],
        "estimate_kbps_20s": None if at20 is None else at20["estimate_kbps"],
        "resolution_end": last["resolution"],
        "resolutions": sorted({p["resolution"] for p in per_second}),
        "fps_end": last["fps"],
        "limited_by_end": last["limited_by"],
        "keyframes": points[-1]["outbound"]["keyFramesEncoded"]
        - points[0]["outbound"]["keyFramesEncoded"],
        "plis_received": points[-1]["outbound"]["pliCount"] - points[0]["outbound"]["pliCount"],
        "nacks_received": points[-1]["outbound"]["nackCount"] - points[0]["outbound"]["nackCount"],
        "rtt_ms_max": max(
            (p["rtt_ms"] for p in per_second if p["rtt_ms"] is not None), default=None
        ),
        "fraction_lost_max": max(
            (p["fraction_lost"] for p in per_second if p["fraction_lost"] is not None), default=None
        ),
        "series": per_second,
    }


@contextlib.asynccontextmanager
async def blank_page_server() -> AsyncIterator[str]:
    """A page for the peer-to-peer run: getUserMedia needs a secure context, which about:blank
    is not and http://127.0.0.1 is."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>p2p</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port(socket.SOCK_STREAM)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def run_p2p(
    a: Browser, b: Browser, seconds: int, cpu: dict[str, float]
) -> dict[str, list[dict[str, Any]]]:
    async with blank_page_server() as url:
        for browser in (a, b):
            await browser.page.goto(url)
            await browser.eval(P2P_SCRIPT)
            await browser.eval("() => window.__p2p.start()")
        return await connect_p2p(a, b, seconds, cpu)


async def connect_p2p(
    a: Browser, b: Browser, seconds: int, cpu: dict[str, float]
) -> dict[str, list[dict[str, Any]]]:
    offer = await a.eval("() => window.__p2p.offer()")
    answer = await b.eval("(sdp) => window.__p2p.answer(sdp)", offer)
    await a.eval("(sdp) => window.__p2p.accept(sdp)", answer)

    async def connected() -> bool:
        states = [await x.eval("() => window.__p2p.state()") for x in (a, b)]
        if "failed" in states:
            raise RuntimeError(f"the peer-to-peer connection failed: {states}")
        return states == ["connected", "connected"]

    await until(connected, 20, "the peer-to-peer connection")
    return await sample_senders([a, b], seconds, cpu)


async def scenario_bitrate(
    playwright: Any, http: aiohttp.ClientSession, workdir: Path, clip: Path, seconds: int
) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    async with browsers(playwright, workdir, clip, ["A", "B"]) as (a, b):
        sfu = Sfu(workdir / "sfu-bitrate")
        await sfu.start(http)
        try:
            room, passphrase = f"bench-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
            for browser in (a, b):
                await browser.join(sfu.base, room, passphrase)
            before = await sfu.metrics(http)
            sfu_cpu: dict[str, float] = {}
            series = await sample_senders([a, b], seconds, sfu_cpu, sfu.pid)
            sfu_metrics = metric_delta(before, await sfu.metrics(http))
            for browser in (a, b):
                await browser.blank()
        finally:
            await sfu.stop()
        runs["sfu"] = {
            "senders": {name: summarise_sender(s) for name, s in series.items()},
            "sfu_metrics": sfu_metrics,
            "cpu": sfu_cpu,
        }
        p2p_cpu: dict[str, float] = {}
        series = await run_p2p(a, b, seconds, p2p_cpu)
        runs["p2p"] = {
            "senders": {name: summarise_sender(s) for name, s in series.items()},
            "cpu": p2p_cpu,
        }
        for browser in (a, b):
            await browser.blank()

    def mean(run: str, key: str) -> float | None:
        values = [s[key] for s in runs[run]["senders"].values()]
        return None if None in values else sum(values) / len(values)

    ratios: dict[str, float | None] = {}
    for key in ("kbps_10s", "kbps_20s", "kbps_max"):
        sfu_rate, p2p_rate = mean("sfu", key), mean("p2p", key)
        ratios[key] = None if sfu_rate is None or not p2p_rate else round(sfu_rate / p2p_rate, 3)
    return {
        "runs": runs,
        "ratio_sfu_p2p": ratios,
        "goal": f"SFU >= {BITRATE_GOAL:.0%} of peer to peer at 20 s",
        "goal_met": None if ratios["kbps_20s"] is None else ratios["kbps_20s"] >= BITRATE_GOAL,
    }


def bitrate_table(result: dict[str, Any]) -> str:
    lines = [
        "| run | sender | kbit/s at 10 s | at 20 s | max | estimate at 10 / 20 s | resolution "
        "(end) | limited by (end) | RTT max, ms | loss max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def show(value: Any) -> str:
        return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    for run, label in (("sfu", "SFU"), ("p2p", "peer to peer")):
        for name, s in result["runs"][run]["senders"].items():
            lines.append(
                f"| {label} | {name} | {show(s['kbps_10s'])} | {show(s['kbps_20s'])} | "
                f"{show(s['kbps_max'])} | {show(s['estimate_kbps_10s'])} / "
                f"{show(s['estimate_kbps_20s'])} | {s['resolution_end']} | "
                f"{s['limited_by_end']} | {show(s['rtt_ms_max'])} | "
                f"{show(s['fraction_lost_max'])} |"
            )
    r = result["ratio_sfu_p2p"]
    lines.append("")
    lines.append(
        f"SFU / peer to peer (mean of both senders): {show(r['kbps_10s'])} at 10 s, "
        f"{show(r['kbps_20s'])} at 20 s, {show(r['kbps_max'])} of the max; goal >= "
        f"{BITRATE_GOAL:.2f} at 20 s: {'met' if result['goal_met'] else 'NOT met'}"
    )
    lines.append(f"SFU counters in the window: {result['runs']['sfu']['sfu_metrics']}")
    lines.append(
        f"CPU in the window: SFU run {result['runs']['sfu']['cpu']}, "
        f"peer to peer {result['runs']['p2p']['cpu']}"
    )
    return "\n".join(lines)


# --- scenario 2: frame rate with a wrong-passphrase participant --------------------------------


async def fps_run(
    http: aiohttp.ClientSession,
    workdir: Path,
    peers: list[Browser],
    c_right: bool,
    seconds: int,
) -> dict[str, Any]:
    a, b, c = peers
    sfu = Sfu(workdir / f"sfu-{'right' if c_right else 'wrong'}")
    await sfu.start(http)
    try:
        room, passphrase = f"bench-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        ids = {}
        for browser in (a, b, c):
            wrong = browser is c and not c_right
            ids[browser.name] = await browser.join(
                sfu.base, room, secrets.token_urlsafe(16) if wrong else passphrase
            )
        pairs = [(a, ids["B"]), (b, ids["A"])]

        async def decoding() -> bool:
            entries = [await viewer.inbound_from(sender) for viewer, sender in pairs]
            return all(e is not None and (e["framesDecoded"] or 0) > 0 for e in entries)

        await until(decoding, 30, "A and B decoding each other")
        await asyncio.sleep(WARMUP)

        async def snapshot() -> dict[str, Any]:
            out: dict[str, Any] = {"t": time.monotonic()}
            for viewer, sender_id in pairs:
                out[viewer.name] = await viewer.inbound_from(sender_id) or {}
            out["C"] = await c.inbound_from(ids["A"]) or {}
            for publisher in (a, b):
                out[f"out_{publisher.name}"] = (await publisher.sample())["outbound"] or {}
            return out

        before_metrics = await sfu.metrics(http)
        meter = CpuMeter(sfu.pid)
        snaps = [await snapshot()]
        start = time.monotonic()
        for tick in range(1, seconds + 1):
            await asyncio.sleep(max(0.0, start + tick - time.monotonic()))
            snaps.append(await snapshot())
        cpu = meter.stop()
        counters = metric_delta(before_metrics, await sfu.metrics(http))
        for browser in peers:
            await browser.blank()
    finally:
        await sfu.stop()

    first, last = snaps[0], snaps[-1]
    elapsed = last["t"] - first["t"]

    def delta(snap0: dict[str, Any], snap1: dict[str, Any], who: str, key: str) -> float:
        return float((snap1[who].get(key) or 0) - (snap0[who].get(key) or 0))

    directions = {}
    for viewer, sender in (("A", "B"), ("B", "A")):
        per_second = [
            round(delta(s0, s1, viewer, "framesDecoded") / (s1["t"] - s0["t"]), 1)
            for s0, s1 in itertools.pairwise(snaps)
        ]
        directions[f"{viewer} <- {sender}"] = {
            "fps": round(delta(first, last, viewer, "framesDecoded") / elapsed, 2),
            "fps_min_1s": min(per_second),
            "keyframes": int(delta(first, last, viewer, "keyFramesDecoded")),
            "kbps": round(delta(first, last, viewer, "bytesReceived") * 8 / elapsed / 1000),
            "fps_per_second": per_second,
        }
    senders = {
        name: {
            "keyframes_encoded": int(delta(first, last, f"out_{name}", "keyFramesEncoded")),
            "plis_received": int(delta(first, last, f"out_{name}", "pliCount")),
            "resolution_end": f"{last[f'out_{name}'].get('frameWidth')}x"
            f"{last[f'out_{name}'].get('frameHeight')}",
            "limited_by_end": last[f"out_{name}"].get("qualityLimitationReason"),
        }
        for name in ("A", "B")
    }
    return {
        "c_passphrase": "right" if c_right else "wrong",
        "window_s": round(elapsed, 1),
        "directions": directions,
        "fps_mean": round(sum(d["fps"] for d in directions.values()) / len(directions), 2),
        "c_fps_of_a": round(delta(first, last, "C", "framesDecoded") / elapsed, 2),
        "senders": senders,
        "sfu_metrics": counters,
        "cpu": cpu,
    }


async def scenario_wrong_passphrase(
    playwright: Any, http: aiohttp.ClientSession, workdir: Path, clip: Path, seconds: int
) -> dict[str, Any]:
    async with browsers(playwright, workdir, clip, ["A", "B", "C"]) as peers:
        right = await fps_run(http, workdir, peers, True, seconds)
        wrong = await fps_run(http, workdir, peers, False, seconds)
    ratio = round(wrong["fps_mean"] / right["fps_mean"], 3) if right["fps_mean"] else None
    return {
        "runs": {"right": right, "wrong": wrong},
        "fps_ratio_wrong_right": ratio,
        "goal": f"A and B decode >= {FPS_GOAL:.0%} of the right-passphrase frame rate",
        "goal_met": None if ratio is None else ratio >= FPS_GOAL,
    }


def fps_table(result: dict[str, Any]) -> str:
    lines = [
        "| C's passphrase | direction | frames/s | min in 1 s | keyframes | kbit/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, run in result["runs"].items():
        for direction, d in run["directions"].items():
            lines.append(
                f"| {label} | {direction} | {d['fps']:.1f} | {d['fps_min_1s']:.0f} | "
                f"{d['keyframes']} | {d['kbps']:,} |"
            )
    lines.append("")
    lines.append(
        "| C's passphrase | C's frames/s of A | PLIs in (SFU) | forwarded | throttled | "
        "suppressed | keyframes sent by A / B | PLIs A / B received | "
        "A / B at the end (limited by) |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, run in result["runs"].items():
        m, s = run["sfu_metrics"], run["senders"]
        lines.append(
            f"| {label} | {run['c_fps_of_a']:.1f} | {m.get('received_pli', 0):.0f} | "
            f"{m.get('forwarded', 0):.0f} | {m.get('throttled', 0):.0f} | "
            f"{m.get('suppressed', 0):.0f} | {s['A']['keyframes_encoded']} / "
            f"{s['B']['keyframes_encoded']} | {s['A']['plis_received']} / "
            f"{s['B']['plis_received']} | {s['A']['resolution_end']} "
            f"({s['A']['limited_by_end']}) / {s['B']['resolution_end']} "
            f"({s['B']['limited_by_end']}) |"
        )
    for label, run in result["runs"].items():
        lines.append(f"CPU in the {label} window: {run['cpu']}")
    lines.append("")
    ratio = result["fps_ratio_wrong_right"]
    lines.append(
        f"wrong / right frame rate (mean of A<-B and B<-A): {ratio}; goal >= {FPS_GOAL:.2f}: "
        f"{'met' if result['goal_met'] else 'NOT met'}"
    )
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return None


def chromium_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            [CHROMIUM, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return CHROMIUM


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    summary: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "seconds": args.seconds,
        "clip": f"{WIDTH}x{HEIGHT} at {FPS} frames/s, {CLIP_SECONDS} s looped",
        "chromium": chromium_version(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="call-quality-"))
    try:
        clip = write_clip(workdir / "clip.y4m")
        playwright = await async_playwright().start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                if args.scenario in ("bitrate", "all"):
                    started = time.monotonic()
                    result = await scenario_bitrate(playwright, http, workdir, clip, args.seconds)
                    result["run_time_s"] = round(time.monotonic() - started, 1)
                    summary["bitrate"] = result
                    print("\nBit rate, SFU against peer to peer\n")
                    print(bitrate_table(result), flush=True)
                if args.scenario in ("wrong-passphrase", "all"):
                    started = time.monotonic()
                    result = await scenario_wrong_passphrase(
                        playwright, http, workdir, clip, args.seconds
                    )
                    result["run_time_s"] = round(time.monotonic() - started, 1)
                    summary["wrong_passphrase"] = result
                    print("\nFrame rate with a wrong-passphrase participant\n")
                    print(fps_table(result), flush=True)
        finally:
            await playwright.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summary


def without_series(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: without_series(v) for k, v in value.items() if k not in ("series", "fps_per_second")
        }
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("bitrate", "wrong-passphrase", "all"), default="all")
    parser.add_argument(
        "--seconds",
        type=int,
        default=24,
        help="sampling window of each run (>= 20 for the 20 s point)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    if not 3 <= args.seconds <= 60:
        parser.error("--seconds must be between 3 and 60")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        parser.error(f"chromium not found at {CHROMIUM} (Debian package chromium)")
    started = time.monotonic()
    # Bounded: a hung browser or SFU ends the run instead of holding the machine.
    limit = 120 + 6 * args.seconds
    try:
        summary = asyncio.run(asyncio.wait_for(main_async(args), limit))
    except TimeoutError:
        print(f"call_quality: gave up after {limit} s", file=sys.stderr)
        return 1
    summary["run_time_s"] = round(time.monotonic() - started, 1)
    # The per-second series go to --json only; the printed summary stays short.
    print("\n" + json.dumps(without_series(summary), indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
