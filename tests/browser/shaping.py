"""Real Chromium behind a rate-limited link: two throwaway network namespaces, a veth pair
between them, a `tc` token bucket on the SFU's end, and a driver for the browser client.

    core (bf-shape-<pid>-<hex>-c)                  edge (bf-shape-<pid>-<hex>-e)
      lo, veth 10.203.0.1/30  ==== tbf ====>  veth 10.203.0.2/30, lo
      the SFU, unshaped browsers                     browsers behind the limit

Everything the calls send stays inside these two namespaces, which have no route anywhere
else: the host's own interfaces and the rest of the suite never see it, and deleting the
namespaces (also on failure) removes the veth pair and its qdisc with them.

Why two namespaces and not the host's: the SFU binds one address (`rtc.bind_host`) and dev
mode insists on loopback, which the edge namespace cannot reach. In the core namespace the
SFU binds 0.0.0.0 and announces 10.203.0.1 only, which browsers on either side reach (the
core ones over the namespace's own loopback, unshaped; the edge ones through the veth, shaped).
Off loopback dev mode is refused, so the SFU runs with an API key of its own and the tests
mint the tokens (`Sfu.token`); the pages call the client's `joinRoom` directly.

The limit is `tbf` on the egress of the core side's veth, i.e. SFU -> edge subscriber, the
direction a subscriber's downlink limits (the edge browsers' own sending is not limited). The
kernel on the test machines has no `netem` (docs/testing.md), so there is no added delay: the
token bucket's queue (`latency`) is all the queueing there is. `limit` and `lift` change it
while a call runs.

Chromium runs in a namespace through a wrapper script (`ip netns exec NS chromium "$@"`)
given to Playwright as its executable: Playwright drives the browser over inherited pipes, so
it works across namespaces. An origin other than localhost is not a secure context (no
WebCrypto, no getUserMedia), so each browser is told to treat the SFU's origin as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tests.browser.support import PageDriver
from tests.chromium import CHROMIUM_FLAGS

ROOT = Path(__file__).resolve().parent.parent.parent
CHROMIUM = os.environ.get("BLINDFOLD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

SFU_ADDRESS = "10.203.0.1"
EDGE_ADDRESS = "10.203.0.2"
PREFIX_LEN = 30
# Interface names are per namespace, so fixed names cannot clash between runs.
CORE_DEV = "bfshape0"
EDGE_DEV = "bfshape1"

# A 400 kbit/s downlink: a bucket of about three full packets (a video frame's packets go out
# back to back, so a smaller one drops from every frame) and 400 ms of queue (20 KB: room for
# a keyframe of the lowest layer of busy content, 10-20 KB, arriving at once), within what
# DSL lines and mobile cells buffer (often more).
DEFAULT_RATE = "400kbit"
DEFAULT_BURST = "4kb"
DEFAULT_LATENCY = "400ms"


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=15)


def unavailable_reason() -> str | None:
    """Why a shaped network cannot be made here, or None. Root, `ip` and `tc` are needed,
    and are tried for real: a probe pair of namespaces with a veth and a tbf qdisc."""
    if os.geteuid() != 0:
        return "needs root (ip netns add, tc qdisc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package iproute2)"
    try:
        with ShapedNetwork.create("bf-probe") as network:
            network.limit()
            network.lift()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", "") or ""
        return f"cannot build a shaped veth between namespaces: {exc} {output}".strip()
    return None


class ShapedNetwork:
    """The two namespaces and the veth between them; see the module docstring."""

    def __init__(self, prefix: str) -> None:
        stem = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.core = f"{stem}-c"
        self.edge = f"{stem}-e"
        self.rate: str | None = None
        self._wrappers = Path(tempfile.mkdtemp(prefix="bf-shape-"))

    @classmethod
    @contextlib.contextmanager
    def create(cls, prefix: str = "bf-shape") -> Iterator[ShapedNetwork]:
        network = cls(prefix)
        try:
            network._build()
            yield network
        finally:
            network._destroy()

    def _build(self) -> None:
        for name in (self.core, self.edge):
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        _run(
            "ip", "-n", self.core, "link", "add", CORE_DEV, "type", "veth",
            "peer", "name", EDGE_DEV, "netns", self.edge,
        )  # fmt: skip
        for name, dev, address in (
            (self.core, CORE_DEV, SFU_ADDRESS),
            (self.edge, EDGE_DEV, EDGE_ADDRESS),
        ):
            _run("ip", "-n", name, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", dev)
            _run("ip", "-n", name, "link", "set", dev, "up")

    def _destroy(self) -> None:
        for name in (self.core, self.edge):
            # A namespace outlives its name while a process is in it: end what we started
            # there (a browser or server a failed test left behind), then drop the name.
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _run("ip", "netns", "delete", name, check=False)
        shutil.rmtree(self._wrappers, ignore_errors=True)

    # -- the limit ------------------------------------------------------------------------

    def limit(
        self, rate: str = DEFAULT_RATE, burst: str = DEFAULT_BURST, latency: str = DEFAULT_LATENCY
    ) -> None:
        """Shape SFU -> edge to `rate` (`replace`: adds the qdisc or changes a running one)."""
        _run(
            "tc", "-n", self.core, "qdisc", "replace", "dev", CORE_DEV, "root",
            "tbf", "rate", rate, "burst", burst, "latency", latency,
        )  # fmt: skip
        self.rate = rate

    def lift(self) -> None:
        """Back to the veth's default (no queue, no limit)."""
        _run("tc", "-n", self.core, "qdisc", "del", "dev", CORE_DEV, "root", check=False)
        self.rate = None

    def qdisc_stats(self) -> dict[str, int]:
        """Bytes and packets the bucket sent and dropped so far (empty when lifted)."""
        out = _run("tc", "-s", "-j", "-n", self.core, "qdisc", "show", "dev", CORE_DEV).stdout
        for entry in json.loads(out or "[]"):
            if entry.get("kind") == "tbf":
                return {
                    key: int(entry.get(key, 0))
                    for key in ("bytes", "packets", "drops", "overlimits", "backlog")
                }
        return {}

    # -- processes in the namespaces ------------------------------------------------------

    def exec_prefix(self, namespace: str) -> list[str]:
        return ["ip", "netns", "exec", namespace]

    def chromium(self, namespace: str) -> str:
        """An executable that starts Chromium inside `namespace`, for Playwright."""
        path = self._wrappers / f"chromium-{namespace}"
        if not path.exists():
            path.write_text(f'#!/bin/sh\nexec ip netns exec {namespace} {CHROMIUM} "$@"\n')
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return str(path)


# ---------------------------------------------------------------------------------------------
# The SFU in the core namespace


class Sfu:
    """`python -m sfu serve` inside the core namespace: HTTP and media on every address there
    (lo and the veth), ICE candidate 10.203.0.1 only, an API key of its own (not dev mode)."""

    def __init__(
        self,
        network: ShapedNetwork,
        overrides: dict[str, Any] | None = None,
        http_port: int = 7880,
        udp_port: int = 7882,
        root: Path = ROOT,
    ) -> None:
        """`root`: the source tree to run (`python -m sfu` from there), e.g. another
        checkout to compare against."""
        from tests.conftest import _deep_merge, clean_env

        # Ports are free by construction: the namespace is new and only this server is in it.
        self.network = network
        self.base = f"http://{SFU_ADDRESS}:{http_port}"
        self.http_port = http_port
        self.dir = Path(tempfile.mkdtemp(prefix="sfu-shaped-"))
        config: dict[str, Any] = {
            "dev_mode": False,
            "auth": {"keys": {"shaping": secrets.token_urlsafe(32)}},
            "http": {"host": "0.0.0.0", "port": http_port},
            "rtc": {
                "bind_host": "0.0.0.0",
                "udp_port": udp_port,
                "announced_ips": [SFU_ADDRESS],
            },
            "drain_timeout": "1s",
            # Layer switches, pauses and probe results land in server.log (see `log`).
            "logging": {"level": "debug"},
        }
        _deep_merge(config, overrides or {})
        self.config_path = self.dir / "sfu.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        from sfu.config import load_config

        self.config = load_config(self.config_path, env={})
        self.log_path = self.dir / "server.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "sfu", "serve", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            [*network.exec_prefix(network.core), *command],
            cwd=root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )

    def wait_listening(self, timeout: float = 20.0) -> None:
        # The test process is in another namespace: the probe has to run in the core one.
        probe = (
            "import socket, sys, time\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while time.monotonic() < deadline:\n"
            "    try:\n"
            f"        socket.create_connection(('127.0.0.1', {self.http_port}), 0.5).close()\n"
            "        sys.exit(0)\n"
            "    except OSError:\n"
            "        time.sleep(0.05)\n"
            "sys.exit(1)\n"
        )
        done = subprocess.run(
            [*self.network.exec_prefix(self.network.core), sys.executable, "-c", probe],
            timeout=timeout + 10,
            check=False,
        )
        if done.returncode != 0 or self.proc.poll() is not None:
            raise AssertionError(f"the SFU did not listen within {timeout}s:\n{self.log()}")

    def token(self, room: str, identity: str, *, publish: bool, subscribe: bool = True) -> str:
        from sfu.control.auth import mint_token

        return mint_token(
            self.config, room=room, identity=identity, publish=publish, subscribe=subscribe,
            ttl=3600, name=identity,
        )  # fmt: skip

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


# ---------------------------------------------------------------------------------------------
# The fake camera


def write_busy_clip(
    path: Path, width: int = 960, height: int = 540, fps: int = 15, frames: int = 30
) -> Path:
    """A Y4M clip whose every layer costs the encoder all the bit rate it is allowed: a
    tileable texture scrolling diagonally (motion search keeps up, so the encoder drops no
    frames) with fresh grain each frame. Flat colours would need a few kbit/s per layer, and
    the 400 kbit/s link would then carry the middle layer too."""
    rng = np.random.default_rng(11)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((height, width))) / radius**0.9
    spectrum[0, 0] = 0
    texture = np.real(np.fft.ifft2(spectrum))
    texture = (texture - texture.mean()) / texture.std()
    chroma = np.full((height // 2, width // 2), 128, dtype=np.uint8).tobytes()
    header = f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode()
    with path.open("wb") as out:
        out.write(header)
        for i in range(frames):
            # One cycle per loop, so the loop has no seam.
            dx, dy = round(i * width / frames), round(i * height / frames)
            luma = 128 + 40 * np.roll(texture, (dy, dx), axis=(0, 1))
            luma += rng.normal(0, 4, (height, width))
            out.write(b"FRAME\n")
            out.write(np.clip(luma, 16, 235).astype(np.uint8).tobytes())
            out.write(chroma)
            out.write(chroma)
    return path


# ---------------------------------------------------------------------------------------------
# A browser running the client


# Runs in the page (any same-origin document; the SFU's /healthz has no CSP): imports the
# client the SFU serves, joins, and keeps what the tests read on window.shaped.
_JOIN = """
async ({token, passphrase, publish, simulcast}) => {
  const client = await import('/client/client/blindfold.js');
  const state = {
    events: [], videos: {}, errors: [], room: null, client, joinStartedAt: performance.now(),
  };
  window.shaped = state;
  let media;
  if (publish) {
    media = await navigator.mediaDevices.getUserMedia({audio: true, video: true});
  }
  const options = {
    url: location.origin, token, passphrase, media,
    onEvent: (event) => {
      const {track, stream, ...rest} = event;
      state.events.push({at: performance.now(), ...rest});
      if (event.type === 'error') state.errors.push(rest);
      if (event.type === 'track' && event.kind === 'video') {
        // A sink for the decoder, as an app would have; its size tells the SFU nothing
        // unless the app calls observeVideoSize, which these pages never do.
        const video = document.createElement('video');
        video.muted = true;
        video.autoplay = true;
        video.playsInline = true;
        video.srcObject = new MediaStream([track]);
        document.body.append(video);
        state.videos[event.trackId] = {participant: event.participant, mediaId: track.id};
      }
    },
  };
  if (simulcast !== null) options.simulcast = simulcast;
  state.room = await client.joinRoom(options);
  const settings = media?.getVideoTracks()[0]?.getSettings() ?? null;
  const camera = settings && {width: settings.width, height: settings.height};
  return {self: state.room.self, camera};
}
"""

# Per received video: getStats' inbound-rtp, keyed by the SFU track id. Read from the
# subscriber connection's own report (the client's getStats summary may leave out frameWidth).
_VIDEO_STATS = """
async () => {
  const state = window.shaped;
  const pc = state.room.subscriber;
  const out = {};
  if (!pc) return out;
  const byMedia = {};
  for (const [trackId, v] of Object.entries(state.videos)) byMedia[v.mediaId] = trackId;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== 'inbound-rtp' || s.kind !== 'video') return;
    const trackId = byMedia[s.trackIdentifier];
    if (trackId === undefined) return;
    out[trackId] = {
      participant: state.videos[trackId].participant,
      at: s.timestamp,
      bytesReceived: s.bytesReceived ?? 0,
      packetsReceived: s.packetsReceived ?? 0,
      packetsLost: s.packetsLost ?? 0,
      nackCount: s.nackCount ?? 0,
      pliCount: s.pliCount ?? 0,
      framesReceived: s.framesReceived ?? 0,
      framesDecoded: s.framesDecoded ?? 0,
      framesDropped: s.framesDropped ?? 0,
      keyFramesDecoded: s.keyFramesDecoded ?? 0,
      freezeCount: s.freezeCount ?? 0,
      frameWidth: s.frameWidth ?? null,
      frameHeight: s.frameHeight ?? null,
    };
  });
  return out;
}
"""

_FIRST_FRAME = """
async ([participant, timeoutMs]) => {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    // May start before join does (run alongside it): window.shaped appears with the join.
    const state = window.shaped;
    const pc = state?.room?.subscriber;
    const mine = Object.values(state?.videos ?? {}).filter((v) => v.participant === participant);
    if (pc && mine.length > 0) {
      const ids = new Set(mine.map((v) => v.mediaId));
      let decoded = 0;
      (await pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && ids.has(s.trackIdentifier)) decoded += s.framesDecoded ?? 0;
      });
      if (decoded > 0) return performance.now() - state.joinStartedAt;
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return null;
}
"""

_OUTBOUND_STATS = """
async () => {
  const pc = window.shaped.room.publisher;
  const out = [];
  if (!pc) return out;
  (await pc.getStats()).forEach((s) => {
    if (s.type !== 'outbound-rtp' || s.kind !== 'video') return;
    out.push({rid: s.rid ?? null, bytesSent: s.bytesSent ?? 0, framesEncoded: s.framesEncoded ?? 0,
      frameWidth: s.frameWidth ?? null, frameHeight: s.frameHeight ?? null,
      targetBitrate: s.targetBitrate ?? null,
      qualityLimitationReason: s.qualityLimitationReason ?? null, at: s.timestamp});
  });
  return out.sort((a, b) => (a.frameWidth ?? 0) - (b.frameWidth ?? 0));
}
"""


@dataclass
class Joined:
    id: str
    camera: dict[str, int] | None


class ClientPage(PageDriver):
    """One Chromium in a namespace with the client joined to a room (see _JOIN)."""

    @classmethod
    async def launch(
        cls,
        playwright: Any,
        network: ShapedNetwork,
        namespace: str,
        profile: Path,
        name: str,
        sfu: Sfu,
        *,
        video: Path | None = None,
    ) -> ClientPage:
        args = [
            *CHROMIUM_FLAGS,
            f"--unsafely-treat-insecure-origin-as-secure={sfu.base}",
        ]
        if video is not None:
            args.append(f"--use-file-for-fake-video-capture={video}")
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=network.chromium(namespace),
            headless=True,
            args=args,
            viewport={"width": 640, "height": 480},
        )
        page = context.pages[0] if context.pages else await context.new_page()
        await _open(page, f"{sfu.base}/healthz")
        return cls(context, page, name)

    async def join(
        self,
        token: str,
        passphrase: str,
        *,
        publish: bool = False,
        simulcast: bool | None = None,
    ) -> Joined:
        """Join with `token`; a publisher sends its fake camera and microphone. `simulcast`
        None leaves the client's default (three layers)."""
        try:
            joined = await self.page.evaluate(
                _JOIN,
                {
                    "token": token,
                    "passphrase": passphrase,
                    "publish": publish,
                    "simulcast": simulcast,
                },
            )
        except Exception as exc:
            raise AssertionError(f"{self.name} did not join: {exc}\n{self.log()}") from exc
        return Joined(id=joined["self"]["id"], camera=joined["camera"])

    async def video_stats(self) -> dict[str, dict[str, Any]]:
        return dict(await self.page.evaluate(_VIDEO_STATS))

    async def video_of(self, participant: str) -> dict[str, Any] | None:
        """Inbound video stats of `participant`'s (first) video track, with its `trackId`."""
        for track_id, entry in (await self.video_stats()).items():
            if entry["participant"] == participant:
                return {"trackId": track_id, **entry}
        return None

    async def first_frame(self, participant: str, timeout: float = 20.0) -> float | None:
        """Milliseconds from the start of `join` to the first decoded frame of `participant`'s
        video, polled in the page every 20 ms (no round trip to the test per poll); None if
        none came within `timeout`. Run it alongside `join`: join resolves only once the
        client has published, and the first frame may come before that."""
        return await self.page.evaluate(_FIRST_FRAME, [participant, timeout * 1000])

    async def reopen(self, sfu: Sfu) -> ClientPage:
        """A fresh page in the same browser (closing this one leaves the room): a new
        participant without the cost of a browser start."""
        page = await self.context.new_page()
        await self.page.close()
        await _open(page, f"{sfu.base}/healthz")
        return ClientPage(self.context, page, self.name)

    async def outbound(self) -> list[dict[str, Any]]:
        return list(await self.page.evaluate(_OUTBOUND_STATS))

    async def set_video_size(self, track_id: str, width: int, height: int) -> None:
        await self.page.evaluate(
            "([t, w, h]) => window.shaped.room.setVideoSize(t, w, h)", [track_id, width, height]
        )

    async def layer(self, track_id: str) -> Any:
        """The SFU's last `video_layer` report for the track (the client's videoLayer)."""
        return await self.page.evaluate(
            "(t) => window.shaped.room.videoLayer?.(t) ?? null", track_id
        )

    async def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        events = await self.page.evaluate("() => window.shaped?.events ?? []")
        return [e for e in events if kind is None or e.get("type") == kind]

    async def peers(self) -> dict[str, Any]:
        return dict(await self.page.evaluate("() => window.shaped.room.peerStatus()"))

    async def close(self) -> None:
        await self.context.close()

    def log(self) -> str:
        return "\n".join(self.console[-30:])


def now() -> float:
    return time.monotonic()


async def _open(page: Any, url: str) -> None:
    """Navigate, once more if Chromium reports ERR_NETWORK_CHANGED: a browser started in a
    fresh namespace can see its interfaces settle just as it loads the first page (seen once
    in about 20 runs), which says nothing about the SFU."""
    try:
        await page.goto(url)
    except Exception as exc:
        if "ERR_NETWORK_CHANGED" not in str(exc):
            raise
        await asyncio.sleep(0.5)
        await page.goto(url)
