"""Soak: a real SFU process under churn, junk and one steady E2EE call, for --minutes.

    nice -n 10 .venv/bin/python bench/soak.py --minutes 60 --out /tmp/soak

It starts `python -m sfu serve` on free loopback ports and, for --minutes, at the same time:

- room churn: every second a fresh room that two room-protocol participants (WebSocket,
  docs/protocol.md) join, publish in and leave (bench/churn.py's room_cycle_once);
- WHIP/WHEP churn: every second one WHIP session in a fresh room and one WHEP session on the
  call's stream, canned offers whose ICE never starts, every other one DELETEd at once and
  the rest abandoned for the server to time out; and every --live-every seconds a real
  aiortc subscriber on the call for 3 s;
- optionally (--pause-every), the server process stopped for --pause-ms now and then, as a
  descheduled host would stop it (its socket buffers keep filling meanwhile);
- a UDP flood at the media port, --flood-rate datagrams/s of random bytes and of junk that
  looks like STUN, DTLS and RTP, from several source ports (its own process);
- one steady call (its own process): an aiortc publisher sending SFrame-protected VP8 video
  and Opus audio over WHIP (sfu/client/) and an aiortc WHEP subscriber holding the key.

Every --sample-every seconds it records the server's RSS and fd count (/proc/PID), CPU, the
event-loop lag histogram's share of that interval (sfu_event_loop_lag_seconds), every gauge
of /metrics and the call's frame ledger; it rewrites soak.csv as it goes and draws soak.png
at the end (matplotlib, the `bench` extra). When the load stops it closes the call, waits up
to --settle seconds for the server to come back to idle, takes a last sample and writes
summary.json.

Targets (exit status 1 when one is missed, 2 when the run itself broke):

- frames kept: every frame the publisher sealed from the first frame of that kind the
  subscriber decrypted until the load stopped was decrypted by the subscriber within
  KEEP_HORIZON seconds of being sealed (matched by SFrame CTR), for audio and video, and the
  subscriber rejected no frame (no authentication failure, unknown KID or malformed frame);
- RSS: over the second half of the load, the least-squares RSS trend grows by at most
  --max-rss-growth-mib;
- fds: after the settle, the server holds no more file descriptors than at the baseline
  sample taken before any load;
- gauges: after the settle, every sfu_* gauge except sfu_ready, sfu_build_info and the
  *_limit ones (configured caps) is 0;
- churn: no cycle failed or was refused.

See docs/reliability.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import datetime
import fractions
import json
import math
import multiprocessing
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.churn import (  # noqa: E402
    SDP_HEADERS,
    ChurnError,
    generous_limits,
    room_cycle_once,
    whip_churn_once,
)
from bench.loadgen_peer import build_offer, random_ice  # noqa: E402
from bench.sfu_process import SfuProcess  # noqa: E402
from sfu.client.sframe import compose_kid  # noqa: E402
from sfu.config import Config, load_config  # noqa: E402
from sfu.control.auth import mint_token  # noqa: E402
from sfu.media.dtls import Fingerprint  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A frame decrypted later than this after it was sealed is useless to a call: it counts lost.
KEEP_HORIZON = 5.0
CALL_ROOM = "soak-call"
CALL_STREAM = "cam"
LOOP_LAG = "sfu_event_loop_lag_seconds"
# Gauges that are not 0 on an idle server by design: state flags, and configured caps.
IDLE_NONZERO = (
    "sfu_ready",
    "sfu_build_info",
    "sfu_media_fastpath_enabled",
    "sfu_media_workers",
    "sfu_media_worker_info",
)
CAP_SUFFIX = "_limit"
# Counters worth a column of their own (the flood shows up in the first two).
COUNTERS = (
    "sfu_udp_datagrams_dropped_total",
    "sfu_ice_checks_total",
    "sfu_dtls_handshakes_total",
    "sfu_srtp_failures_total",
    "sfu_forward_errors_total",
    "sfu_ice_consent_expiries_total",
    "sfu_handshake_timeouts_total",
    "sfu_admission_refusals_total",
    "sfu_http_malformed_requests_total",
)
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")
_LE = re.compile(r'le="([^"]+)"')


def _loopback_only(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    # aioice leaves 127.0.0.1 out of the host candidates it gathers; all traffic must stay
    # on loopback (docs/testing.md).
    return ["127.0.0.1"]


class Sfu(SfuProcess):
    """The SFU under soak: limits that let the soak's churn in, and its tokens."""

    def __init__(self, workdir: Path, consent_timeout: float) -> None:
        super().__init__(
            workdir,
            {
                "rtc": {"consent_timeout": f"{consent_timeout:g}s"},
                # Every session-count and creation-rate limit far above what the churn needs
                # (all of it comes from 127.0.0.1): the soak measures the server, not refusals.
                "limits": generous_limits(),
            },
        )
        self.config: Config = load_config(self.config_path, env={})

    def token(self, room: str, identity: str, *, publish: bool, ttl: float) -> str:
        return mint_token(
            self.config,
            room=room,
            identity=identity,
            publish=publish,
            subscribe=not publish,
            ttl=ttl,
        )


# -- /proc and /metrics ------------------------------------------------------------------------


def proc_status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> dict[str, str]:
    """What each open fd is: a path, a pipe, or for TCP sockets their addresses and state."""
    tcp: dict[str, str] = {}
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                tcp[f"socket:[{inode}]"] = (
                    f"tcp :{int(local.rsplit(':')[1], 16)} -> :{int(remote.rsplit(':')[1], 16)} "
                    f"{states.get(state, state)}"
                )
    out: dict[str, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            out[fd] = tcp.get(target, target)
    return out


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after its closing parenthesis do not.
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


@dataclass
class Scrape:
    """One /metrics exposition: every gauge series, the counters of COUNTERS, loop-lag buckets."""

    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    lag_buckets: list[tuple[float, float]] = field(default_factory=list)
    lag_sum: float = 0.0
    lag_count: float = 0.0


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = _SERIES.match(line)
        if match is None:
            continue
        name, labels, raw = match.group(1), match.group(2) or "", match.group(3)
        value = float(raw)
        if name.endswith("_created"):
            continue  # prometheus_client's creation timestamps, typed as gauges
        if types.get(name) == "gauge":
            scrape.gauges[name + labels] = value
        elif name.startswith(COUNTERS):
            scrape.counters[name + labels] = value
        elif name == f"{LOOP_LAG}_bucket":
            le = _LE.search(labels)
            if le is not None:
                scrape.lag_buckets.append((float(le.group(1)), value))
        elif name == f"{LOOP_LAG}_sum":
            scrape.lag_sum = value
        elif name == f"{LOOP_LAG}_count":
            scrape.lag_count = value
    scrape.lag_buckets.sort()
    return scrape


@dataclass(frozen=True)
class LagStats:
    """Loop lag over an interval, read off the histogram: p50 and max are bucket upper bounds
    (the lag was at most that), mean is exact (sum / count)."""

    count: int
    p50: float
    max: float
    mean: float


def lag_between(before: Scrape, after: Scrape) -> LagStats:
    count = after.lag_count - before.lag_count
    if count <= 0 or len(before.lag_buckets) != len(after.lag_buckets):
        return LagStats(0, math.nan, math.nan, math.nan)
    deltas = [
        (le, a - b) for (le, a), (_, b) in zip(after.lag_buckets, before.lag_buckets, strict=True)
    ]
    p50 = next(le for le, cumulative in deltas if cumulative >= count / 2)
    top = next(le for le, cumulative in deltas if cumulative >= count)
    return LagStats(int(count), p50, top, (after.lag_sum - before.lag_sum) / count)


# -- the UDP flood (its own process) -----------------------------------------------------------

STUN_COOKIE = 0x2112A442


def junk_datagram(rng: random.Random) -> tuple[str, bytes]:
    """One datagram of junk: what kind, and the bytes. Each kind passes the SFU's first-byte
    demultiplexing (RFC 7983) into a different handler, which must reject it."""
    kind = rng.choice(("random", "stun", "dtls", "rtp"))
    if kind == "stun":
        # A Binding request with a USERNAME of made-up ufrags and a garbage tail: it reaches
        # the ICE agent, which must find no such session.
        username = f"{rng.getrandbits(32):08x}:{rng.getrandbits(32):08x}".encode()
        padded = username + b"\0" * (-len(username) % 4)
        tail = rng.randbytes(rng.choice((0, 8, 24)))
        attrs = struct.pack("!HH", 0x0006, len(username)) + padded + tail
        header = struct.pack("!HHI", 0x0001, len(attrs), STUN_COOKIE) + rng.randbytes(12)
        return kind, header + attrs
    if kind == "dtls":
        # A record header (handshake content type, DTLS 1.2, epoch 0) over random bytes.
        body = rng.randbytes(rng.randint(0, 200))
        return kind, struct.pack("!BHH6sH", 22, 0xFEFD, 0, rng.randbytes(6), len(body)) + body
    if kind == "rtp":
        # Version 2, a dynamic payload type, and a random SSRC and payload.
        return kind, bytes([0x80, rng.choice((96, 97, 111, 0xE0))]) + rng.randbytes(
            rng.randint(10, 1200)
        )
    return kind, rng.randbytes(rng.randint(1, 1400))


def flood_entry(port: int, rate: float, sources: int, stop: Any, conn: Connection) -> None:
    """Process target: send junk to 127.0.0.1:port at `rate` datagrams/s until `stop` is set,
    then send back how many of each kind went out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rng = random.Random(0x50A4)
    socks = []
    for _ in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    sent: collections.Counter[str] = collections.Counter()
    refused = 0
    tick = 0.01
    start = time.monotonic()
    try:
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate) - sum(sent.values()) - refused
            # A paused process must not burst: at most one second's worth at once.
            for _ in range(min(due, int(rate))):
                kind, data = junk_datagram(rng)
                try:
                    rng.choice(socks).sendto(data, ("127.0.0.1", port))
                    sent[kind] += 1
                except (BlockingIOError, ConnectionRefusedError):
                    refused += 1
            time.sleep(tick)
    finally:
        for sock in socks:
            sock.close()
        conn.send({"sent": dict(sent), "total": sum(sent.values()), "not_sent": refused})


# -- the steady call (its own process) ---------------------------------------------------------


@dataclass(frozen=True)
class CallPlan:
    whip_url: str
    whep_url: str
    publish_token: str
    subscribe_token: str
    kid: int
    key: bytes
    width: int = 320
    height: int = 240


class FrameLedger:
    """Matches the frames the publisher sealed with the ones the subscriber received, by
    SFrame CTR (unique per frame under one KID), settling each frame KEEP_HORIZON s after it
    was sealed so memory stays bounded over an hour."""

    def __init__(self) -> None:
        self.sent: collections.deque[tuple[float, str, int]] = collections.deque()
        self.received: dict[str, set[int]] = {"audio": set(), "video": set()}
        self.first: dict[str, int | None] = {"audio": None, "video": None}
        self.cut: float | None = None
        self.kept = {"audio": 0, "video": 0}
        self.lost = {"audio": 0, "video": 0}
        self.before_window = 0
        self.after_window = 0
        self.unparsed = 0
        self.lost_examples: list[tuple[str, int]] = []

    def on_send(self, frame: Any) -> None:
        if frame.ctr is None:
            self.unparsed += 1
            return
        self.sent.append((time.monotonic(), frame.kind, frame.ctr))

    def on_receive(self, frame: Any) -> None:
        if frame.ctr is None or frame.kind not in self.received:
            self.unparsed += 1
            return
        if self.first[frame.kind] is None:
            self.first[frame.kind] = frame.ctr
        self.received[frame.kind].add(frame.ctr)

    def settle(self, now: float) -> None:
        while self.sent and self.sent[0][0] <= now - KEEP_HORIZON:
            sealed_at, kind, ctr = self.sent.popleft()
            got = ctr in self.received[kind]
            self.received[kind].discard(ctr)
            first = self.first[kind]
            if first is None or ctr < first:
                self.before_window += 1
            elif self.cut is not None and sealed_at > self.cut:
                self.after_window += 1
            elif got:
                self.kept[kind] += 1
            else:
                self.lost[kind] += 1
                if len(self.lost_examples) < 20:
                    self.lost_examples.append((kind, ctr))

    def snapshot(self) -> dict[str, Any]:
        return {
            "kept": dict(self.kept),
            "lost": dict(self.lost),
            "before_window": self.before_window,
            "after_window": self.after_window,
            "unparsed": self.unparsed,
            "lost_examples": list(self.lost_examples),
        }


async def _run_call(plan: CallPlan, conn: Connection) -> None:
    import aioice.ice
    import numpy as np
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack, VideoStreamTrack
    from av import AudioFrame, VideoFrame

    from sfu.client.e2ee import E2eeConfig
    from sfu.client.whip import publish, subscribe

    aioice.ice.get_host_addresses = _loopback_only

    class BarTrack(VideoStreamTrack):
        """A bar sweeping across a flat background: real inter-frame change, cheap to make
        (30 frames made once, then cycled)."""

        def __init__(self) -> None:
            super().__init__()
            self.frames = []
            for i in range(30):
                image = np.full((plan.height, plan.width, 3), (40, 90, 160), dtype=np.uint8)
                x = i * plan.width // 30
                image[:, x : x + plan.width // 10] = (230, 200, 40)
                self.frames.append(VideoFrame.from_ndarray(image, format="rgb24"))
            self.index = 0

        async def recv(self) -> VideoFrame:
            pts, time_base = await self.next_timestamp()
            frame = self.frames[self.index % len(self.frames)]
            self.index += 1
            frame.pts, frame.time_base = pts, time_base
            return frame

    class ToneTrack(AudioStreamTrack):
        """A 440 Hz tone (aiortc's default is silence, which Opus squeezes to almost nothing)."""

        def __init__(self) -> None:
            super().__init__()
            t = np.arange(960) / 48000
            self.pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1)

        async def recv(self) -> AudioFrame:
            frame = await super().recv()
            out = AudioFrame.from_ndarray(self.pcm, format="s16", layout="mono")
            out.sample_rate, out.pts = 48000, frame.pts
            out.time_base = fractions.Fraction(1, 48000)
            return out

    ledger = FrameLedger()
    decoded = {"audio": 0, "video": 0}
    consumers: list[asyncio.Task[None]] = []

    def on_track(track: MediaStreamTrack) -> None:
        async def consume() -> None:
            while True:
                try:
                    await track.recv()
                except Exception:
                    return
                decoded[track.kind] += 1

        consumers.append(asyncio.ensure_future(consume()))

    publication = await publish(
        plan.whip_url,
        plan.publish_token,
        [BarTrack(), ToneTrack()],
        E2eeConfig(send_kid=plan.kid, send_key=plan.key, on_frame=ledger.on_send),
    )
    subscription = await subscribe(
        plan.whep_url,
        plan.subscribe_token,
        E2eeConfig(receive_keys={plan.kid: plan.key}, on_frame=ledger.on_receive),
        on_track=on_track,
    )
    loop = asyncio.get_running_loop()

    def report() -> dict[str, Any]:
        e2ee = subscription.e2ee
        assert e2ee is not None
        return {
            **ledger.snapshot(),
            "decoded": dict(decoded),
            "rejected": e2ee.counters.dropped,
            "decrypted": e2ee.counters.frames_unprotected,
            "publisher_state": publication.pc.connectionState,
            "subscriber_state": subscription.pc.connectionState,
        }

    deadline = loop.time() + 30
    while ledger.first["audio"] is None or ledger.first["video"] is None:
        if loop.time() > deadline:
            raise RuntimeError(f"the subscriber decrypted nothing in 30 s: {report()}")
        await asyncio.sleep(0.1)
    conn.send(("ready", report()))
    while True:
        await asyncio.sleep(0.5)
        ledger.settle(time.monotonic())
        if not conn.poll():
            continue
        command = conn.recv()
        if command == "snapshot":
            conn.send(("snapshot", report()))
        elif command == "stop":
            break
    # Frames sealed up to now count; the call goes on until each has had its KEEP_HORIZON.
    ledger.cut = time.monotonic()
    await asyncio.sleep(KEEP_HORIZON + 0.5)
    ledger.settle(time.monotonic())
    result = report()
    for session in (subscription, publication):
        try:
            await session.close()
        except Exception as exc:  # the DELETE failing is worth reporting, not a crash
            result.setdefault("close_errors", []).append(repr(exc))
    for task in consumers:
        task.cancel()
    conn.send(("result", result))


def call_entry(plan: CallPlan, conn: Connection) -> None:
    """Process target: the steady call, on its own event loop and core."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_run_call(plan, conn))
    except Exception:
        conn.send(("error", traceback.format_exc()))


async def call_request(conn: Connection, command: str | None, within: float) -> tuple[str, Any]:
    """Send `command` (if any) to the call process and wait for its next message."""
    if command is not None:
        conn.send(command)
    if not await asyncio.to_thread(conn.poll, within):
        raise RuntimeError(f"the call process did not answer {command!r} in {within:g} s")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"the call process failed:\n{payload}")
    return str(kind), payload


# -- churn (the drivers are bench/churn.py's) --------------------------------------------------


def canned_subscriber_offer() -> str:
    """A WHEP offer whose ICE never starts: the session lives until DELETE or consent expiry."""
    return build_offer(
        send=False,
        ufrag=random_ice(8),
        pwd=random_ice(24),
        fingerprint=Fingerprint("sha-256", secrets.token_bytes(32).hex(":")),
        ssrcs=None,
    )


async def whep_churn_once(
    http: aiohttp.ClientSession, base_url: str, token: str, *, delete: bool
) -> None:
    """One WHEP session on the steady call's stream that never connects (a down-track the
    call's producer must carry and then drop); DELETEd at once if `delete`."""
    auth = {"Authorization": f"Bearer {token}"}
    async with http.post(
        f"{base_url}/whep/{CALL_ROOM}/{CALL_STREAM}",
        data=canned_subscriber_offer(),
        headers={**SDP_HEADERS, **auth},
    ) as response:
        body = await response.text()
        if response.status != 201:
            raise ChurnError(
                f"POST /whep/{CALL_ROOM}/{CALL_STREAM}: {response.status} {body[:200]}"
            )
        location = response.headers["Location"]
    if delete:
        async with http.delete(f"{base_url}{location}", headers=auth) as response:
            if response.status != 200:
                raise ChurnError(f"DELETE {location}: {response.status}")


async def live_subscriber_once(
    sfu: Sfu, token: str, kid: int, key: bytes, *, seconds: float, delete: bool
) -> dict[str, int]:
    """A real aiortc WHEP subscriber on the steady call for `seconds` (ICE, DTLS, SRTP, a
    keyframe request), then DELETE and close, or just close as a crashed client would."""
    import aioice.ice

    from sfu.client.e2ee import E2eeConfig
    from sfu.client.whip import subscribe

    aioice.ice.get_host_addresses = _loopback_only
    subscription = await subscribe(
        f"{sfu.base}/whep/{CALL_ROOM}/{CALL_STREAM}",
        token,
        E2eeConfig(receive_keys={kid: key}),
        http_timeout=15,
    )
    try:
        await asyncio.sleep(seconds)
    finally:
        counters = subscription.e2ee.counters if subscription.e2ee else None
        if delete:
            await subscription.close()
        else:
            # No DELETE: the server learns only from DTLS close_notify or consent expiry.
            await subscription.pc.close()
            await subscription._http.close()
    if counters is None:
        return {}
    return {"decrypted": counters.frames_unprotected, "rejected": counters.dropped}


@dataclass
class ChurnCounts:
    whip_created: int = 0
    whip_deleted: int = 0
    whep_created: int = 0
    whep_deleted: int = 0
    room_cycles: int = 0
    room_participants: int = 0
    live_subscribers: int = 0
    live_decrypted: int = 0
    live_rejected: int = 0
    skipped: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)


class Churn:
    """Starts one WHIP, one WHEP and one room cycle every second, and a real subscriber every
    --live-every seconds; at most MAX_IN_FLIGHT cycles of a kind run at once (a cycle that
    would exceed it is skipped and counted, so a slow server is not buried)."""

    MAX_IN_FLIGHT = 8

    def __init__(self, sfu: Sfu, http: aiohttp.ClientSession, args: argparse.Namespace) -> None:
        self.sfu = sfu
        self.http = http
        self.args = args
        self.counts = ChurnCounts()
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.ttl = args.minutes * 60 + 3600

    def _spawn(self, kind: str, work: Callable[[], Awaitable[None]]) -> None:
        if self.in_flight[kind] >= self.MAX_IN_FLIGHT:
            self.counts.skipped += 1
            return
        self.in_flight[kind] += 1

        async def run() -> None:
            try:
                await work()
            except Exception as exc:
                self.counts.errors += 1
                if len(self.counts.error_examples) < 10:
                    self.counts.error_examples.append(f"{kind}: {exc!r}"[:300])
            finally:
                self.in_flight[kind] -= 1

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def tick(self, n: int) -> None:
        sfu, http, counts = self.sfu, self.http, self.counts
        delete = n % 2 == 0

        async def whip() -> None:
            token = sfu.token(f"soak-w{n}", f"w{n}", publish=True, ttl=self.ttl)
            await whip_churn_once(
                http, sfu.base, token, room=f"soak-w{n}", stream="s", delete=delete
            )
            counts.whip_created += 1
            counts.whip_deleted += delete

        async def whep() -> None:
            token = sfu.token(CALL_ROOM, f"watcher{n}", publish=False, ttl=self.ttl)
            await whep_churn_once(http, sfu.base, token, delete=delete)
            counts.whep_created += 1
            counts.whep_deleted += delete

        async def room() -> None:
            name = f"soak-r{n}"
            tokens = [
                mint_token(
                    sfu.config,
                    room=name,
                    identity=f"p{n}-{k}",
                    publish=True,
                    subscribe=True,
                    ttl=self.ttl,
                )
                for k in range(2)
            ]
            await room_cycle_once(http, sfu.base, tokens)
            counts.room_cycles += 1
            counts.room_participants += len(tokens)

        self._spawn("whip", whip)
        self._spawn("whep", whep)
        self._spawn("room", room)
        if self.args.live_every > 0 and n % self.args.live_every == 0:

            async def live() -> None:
                token = sfu.token(CALL_ROOM, f"live{n}", publish=False, ttl=self.ttl)
                got = await live_subscriber_once(
                    sfu, token, self.args.kid, self.args.key, seconds=3.0, delete=delete
                )
                counts.live_subscribers += 1
                counts.live_decrypted += got.get("decrypted", 0)
                counts.live_rejected += got.get("rejected", 0)

            self._spawn("live", live)

    async def drain(self, within: float) -> None:
        """Let the cycles under way finish (each closes what it opened)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=within)
        for task in list(self.tasks):
            task.cancel()


# -- sampling ----------------------------------------------------------------------------------


class Sampler:
    """Rows of the CSV: /proc of the server, /metrics, and whatever the caller adds."""

    def __init__(self, sfu: Sfu, http: aiohttp.ClientSession) -> None:
        self.sfu = sfu
        self.http = http
        self.started = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.first: Scrape | None = None
        self.last: Scrape | None = None
        self.ticks = cpu_ticks(sfu.pid)
        self.ticks_at = time.monotonic()

    async def scrape(self) -> Scrape:
        async with self.http.get(f"{self.sfu.base}/metrics") as response:
            return parse_metrics(await response.text())

    async def sample(self, phase: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        scrape = await self.scrape()
        pid = self.sfu.pid
        status = proc_status_kib(pid)
        now, ticks = time.monotonic(), cpu_ticks(pid)
        cpu = 100 * (ticks - self.ticks) / CLK_TCK / max(now - self.ticks_at, 1e-6)
        self.ticks, self.ticks_at = ticks, now
        lag = lag_between(self.last, scrape) if self.last is not None else None
        self.first = self.first or scrape
        self.last = scrape
        row: dict[str, Any] = {
            "t_s": round(now - self.started, 1),
            "phase": phase,
            "rss_kib": status["VmRSS"],
            "hwm_kib": status["VmHWM"],
            "fds": fd_count(pid),
            # The first row has no earlier sample to measure an interval from.
            "cpu_pct": round(cpu, 1) if self.rows else "",
            "loop_lag_samples": lag.count if lag else "",
            "loop_lag_p50_le_s": lag.p50 if lag else "",
            "loop_lag_max_le_s": lag.max if lag else "",
            "loop_lag_mean_s": f"{lag.mean:.6f}" if lag and lag.count else "",
        }
        row.update(extra or {})
        row.update(scrape.counters)
        row.update(scrape.gauges)
        self.rows.append(row)
        return row


def busy_gauges(row: dict[str, Any]) -> dict[str, float]:
    """The sfu_* gauges of a row that are not 0 and should be on an idle server."""
    return {
        key: value
        for key, value in row.items()
        if key.startswith("sfu_")
        and not key.startswith(IDLE_NONZERO)
        and not key.partition("{")[0].endswith(CAP_SUFFIX)
        and not key.startswith(COUNTERS)
        and isinstance(value, float)
        and value != 0
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [row["t_s"] / 60 for row in rows]

    def column(name: str) -> list[float]:
        return [float(row[name]) if row.get(name, "") != "" else math.nan for row in rows]

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    axes[0].plot(minutes, [v / 1024 for v in column("rss_kib")], label="RSS")
    axes[0].set_ylabel("MiB")
    axes[1].plot(minutes, column("fds"), label="open fds", color="tab:orange")
    axes[1].set_ylabel("fds")
    axes[2].plot(minutes, [v * 1000 for v in column("loop_lag_mean_s")], label="mean")
    axes[2].step(
        minutes, [v * 1000 for v in column("loop_lag_p50_le_s")], where="post", label="p50 (≤)"
    )
    axes[2].step(
        minutes, [v * 1000 for v in column("loop_lag_max_le_s")], where="post", label="max (≤)"
    )
    axes[2].set_ylabel("loop lag, ms")
    axes[2].set_yscale("log")
    shown = (
        'sfu_media_sessions{kind="whip"}',
        'sfu_media_sessions{kind="whep"}',
        "sfu_rooms",
        "sfu_participants",
        "sfu_subscriptions",
    )
    for name in shown:
        axes[3].plot(minutes, column(name), label=name)
    axes[3].set_ylabel("count")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the verdict -------------------------------------------------------------------------------


def rss_trend_kib(rows: list[dict[str, Any]]) -> float:
    """Least-squares RSS growth over the second half of the load phase (KiB)."""
    load = [row for row in rows if row["phase"] in ("load", "load-end")]
    if len(load) < 4:
        return 0.0
    half = load[-1]["t_s"] / 2
    points = [(float(row["t_s"]), float(row["rss_kib"])) for row in load if row["t_s"] >= half]
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / var if var else 0.0
    return slope * (points[-1][0] - points[0][0])


def verdict(summary: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What missed a target (empty: all met)."""
    failures = []
    call = summary["call"]
    for kind in ("audio", "video"):
        kept, lost = call["kept"][kind], call["lost"][kind]
        if kept == 0:
            failures.append(f"the call counted no {kind} frame in its window")
        if lost:
            failures.append(f"{lost} of {kept + lost} {kind} frames lost")
    if call["rejected"]:
        failures.append(f"the subscriber rejected {call['rejected']} frames")
    if summary["rss_growth_last_half_kib"] > args.max_rss_growth_mib * 1024:
        failures.append(
            f"RSS grew {summary['rss_growth_last_half_kib'] / 1024:.1f} MiB over the second "
            f"half of the load (limit {args.max_rss_growth_mib:g} MiB)"
        )
    if summary["fds"]["end"] > summary["fds"]["baseline"]:
        failures.append(
            f"{summary['fds']['end']} fds at the end, {summary['fds']['baseline']} at the start"
        )
    if summary["busy_gauges_at_end"]:
        failures.append(f"gauges not back to 0: {summary['busy_gauges_at_end']}")
    if summary["churn"]["errors"]:
        failures.append(
            f"{summary['churn']['errors']} churn cycles failed, e.g. "
            f"{summary['churn']['error_examples'][:3]}"
        )
    if summary["sfu_exit"] not in (0, None):
        failures.append(f"the SFU exited with {summary['sfu_exit']}")
    return failures


# -- the run -----------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _say(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


async def wait_idle(
    sampler: Sampler, baseline_fds: int, within: float
) -> tuple[dict[str, float], int]:
    """Poll until no count gauge is busy and the fds are back to the baseline, or `within`
    seconds have passed; what is still busy, and the fd count."""
    deadline = time.monotonic() + within
    while True:
        scrape = await sampler.scrape()
        busy = busy_gauges(dict(scrape.gauges))
        fds = fd_count(sampler.sfu.pid)
        if (not busy and fds <= baseline_fds) or time.monotonic() > deadline:
            return busy, fds
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    csv_path, png_path = out / "soak.csv", out / "soak.png"
    sfu = Sfu(out, args.consent_timeout)
    spawn = multiprocessing.get_context("spawn")
    flood_stop = spawn.Event()
    flood: Any = None
    call: Any = None
    flood_conn: Connection | None = None
    call_conn: Connection | None = None
    # Scrapes reuse one keep-alive connection (at the baseline too), so they hold the same
    # single fd in the server throughout; churn gets its own pool.
    scrape_http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=20)
    )
    churn_http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    summary: dict[str, Any] = {
        "commit": _git_commit(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("key",)
        },
        "csv": str(csv_path),
        "png": str(png_path),
    }
    try:
        await sfu.start(scrape_http)
        sampler = Sampler(sfu, scrape_http)
        await sampler.scrape()  # opens the keep-alive connection before the baseline
        baseline = await sampler.sample("baseline")
        baseline_fds = fd_targets(sfu.pid)
        _say(f"SFU pid {sfu.pid} on {sfu.base}, udp {sfu.udp_port}; baseline {baseline['fds']} fds")

        ttl = args.minutes * 60 + 3600
        plan = CallPlan(
            whip_url=f"{sfu.base}/whip/{CALL_ROOM}/{CALL_STREAM}",
            whep_url=f"{sfu.base}/whep/{CALL_ROOM}/{CALL_STREAM}",
            publish_token=sfu.token(CALL_ROOM, "caller", publish=True, ttl=ttl),
            subscribe_token=sfu.token(CALL_ROOM, "callee", publish=False, ttl=ttl),
            kid=args.kid,
            key=args.key,
        )
        call_conn, child = spawn.Pipe()
        call = spawn.Process(target=call_entry, args=(plan, child), name="soak-call")
        call.start()
        _, ready = await call_request(call_conn, None, 60)
        _say(f"call up: {ready['decoded']} decoded so far")

        flood_conn, flood_child = spawn.Pipe()
        if args.flood_rate > 0:
            flood = spawn.Process(
                target=flood_entry,
                args=(sfu.udp_port, args.flood_rate, args.flood_sources, flood_stop, flood_child),
                name="soak-flood",
            )
            flood.start()

        churn = Churn(sfu, churn_http, args)
        load_for = args.minutes * 60
        started = time.monotonic()
        next_sample = started + args.sample_every
        n = pauses = 0
        while (elapsed := time.monotonic() - started) < load_for:
            if not sfu.alive():
                raise RuntimeError(f"the SFU died during the load:\n{sfu.log_tail()}")
            churn.tick(n)
            n += 1
            if args.pause_every > 0 and n % args.pause_every == 0:
                await pause(sfu.pid, args.pause_ms / 1000)
                pauses += 1
            if time.monotonic() >= next_sample:
                _, snap = await call_request(call_conn, "snapshot", 30)
                row = await sampler.sample("load", _extra(churn.counts, snap))
                write_csv(csv_path, sampler.rows)
                _say(
                    f"{elapsed / 60:5.1f} min  RSS {row['rss_kib'] / 1024:.1f} MiB  "
                    f"fds {row['fds']}  lag p50≤{row['loop_lag_p50_le_s']} "
                    f"max≤{row['loop_lag_max_le_s']}  kept {snap['kept']} lost {snap['lost']}"
                )
                next_sample += args.sample_every
            # Paced on the wall clock: a slow tick does not push the next ones later.
            await asyncio.sleep(max(0.0, started + n - time.monotonic()))

        load_seconds = time.monotonic() - started
        _say("load done: stopping churn, flood and call")
        await churn.drain(30)
        # Its pooled keep-alive connections are the client's, not something the server holds.
        await churn_http.close()
        flood_stop.set()
        flood_result: dict[str, Any] = {"total": 0, "sent": {}}
        if flood is not None and await asyncio.to_thread(flood_conn.poll, 30):
            flood_result = flood_conn.recv()
        _, call_result = await call_request(call_conn, "stop", KEEP_HORIZON + 40)
        last_load = await sampler.sample("load-end", _extra(churn.counts, call_result))
        busy, fds = await wait_idle(sampler, baseline["fds"], args.settle)
        end_fds = fd_targets(sfu.pid)
        end = await sampler.sample("end", _extra(churn.counts, call_result))
        write_csv(csv_path, sampler.rows)

        rows = sampler.rows
        load_rows = [r for r in rows if r["phase"] in ("load", "load-end")]
        lag = lag_between(sampler.first, sampler.last) if sampler.first and sampler.last else None
        lag_maxes = [r["loop_lag_max_le_s"] for r in load_rows if r["loop_lag_max_le_s"] != ""]
        summary.update(
            {
                "load_seconds": round(load_seconds, 1),
                "call": call_result,
                "flood": flood_result,
                "churn": asdict(churn.counts),
                "ticks": n,
                "pauses": pauses,
                "rss_kib": {
                    "baseline": baseline["rss_kib"],
                    "after_warmup": _after_warmup(load_rows, args.warmup)["rss_kib"],
                    "mid_load": _at_half(load_rows)["rss_kib"],
                    "load_end": last_load["rss_kib"],
                    "end": end["rss_kib"],
                    "max": max(r["rss_kib"] for r in rows),
                },
                "rss_growth_last_half_kib": round(rss_trend_kib(rows), 1),
                "fds": {
                    "baseline": baseline["fds"],
                    "max": max(r["fds"] for r in rows),
                    "end": end["fds"],
                },
                "loop_lag": {
                    "samples": lag.count if lag else 0,
                    "p50_le_s": lag.p50 if lag else None,
                    "max_le_s": lag.max if lag else None,
                    "mean_s": round(lag.mean, 6) if lag else None,
                    "worst_interval_max_le_s": max(lag_maxes) if lag_maxes else None,
                },
                "busy_gauges_at_end": busy_gauges(end),
                "settle_waited_for": busy or None,
                "settle_fds": fds,
                "fds_not_at_baseline": {
                    fd: target for fd, target in end_fds.items() if baseline_fds.get(fd) != target
                },
                "cpu_pct_mean_load": round(
                    sum(r["cpu_pct"] for r in load_rows) / max(1, len(load_rows)), 1
                ),
            }
        )
        write_plot(
            png_path,
            rows,
            f"Blindfold soak {args.minutes:g} min ({summary['commit'] or 'uncommitted'})",
        )
    finally:
        flood_stop.set()
        await churn_http.close()
        for process in (flood, call):
            if process is not None:
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join()
        summary["sfu_exit"] = await sfu.stop()
        await scrape_http.close()
    return summary


async def pause(pid: int, seconds: float) -> None:
    """Stop the server process for `seconds`, as a descheduled or swapping host would: its
    sockets keep receiving into their kernel buffers meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _extra(counts: ChurnCounts, call: dict[str, Any]) -> dict[str, Any]:
    return {
        "frames_kept": call["kept"]["audio"] + call["kept"]["video"],
        "frames_lost": call["lost"]["audio"] + call["lost"]["video"],
        "frames_decoded_video": call["decoded"]["video"],
        "whip_created": counts.whip_created,
        "whep_created": counts.whep_created,
        "room_cycles": counts.room_cycles,
        "live_subscribers": counts.live_subscribers,
        "churn_errors": counts.errors,
        "churn_skipped": counts.skipped,
    }


# t_s counts from the baseline sample, taken a second or two before the load starts.


def _after_warmup(rows: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    return next((r for r in rows if r["t_s"] >= warmup), rows[-1])


def _at_half(rows: list[dict[str, Any]]) -> dict[str, Any]:
    half = rows[-1]["t_s"] / 2
    return next(r for r in rows if r["t_s"] >= half)


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="load duration")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=Path("/tmp/blindfold-soak"), help="output dir")
    parser.add_argument(
        "--flood-rate", type=float, default=2000.0, help="junk datagrams/s (0: no flood)"
    )
    parser.add_argument("--flood-sources", type=int, default=16, help="flood source ports")
    parser.add_argument(
        "--live-every",
        type=int,
        default=15,
        help="a real aiortc WHEP subscriber joins the call every N seconds (0: never)",
    )
    parser.add_argument(
        "--pause-every",
        type=int,
        default=0,
        help="stop the server (SIGSTOP) every N seconds of load (0: never)",
    )
    parser.add_argument("--pause-ms", type=float, default=400.0, help="how long each pause lasts")
    parser.add_argument(
        "--consent-timeout", type=float, default=30.0, help="the SFU's rtc.consent_timeout, s"
    )
    parser.add_argument(
        "--settle", type=float, default=90.0, help="seconds to wait for idle after the load"
    )
    parser.add_argument(
        "--warmup", type=float, default=300.0, help="seconds after which RSS counts as warm"
    )
    parser.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=8.0,
        help="RSS trend allowed over the second half of the load",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.minutes <= 0 or args.sample_every <= 0:
        parser.error("--minutes and --sample-every must be positive")
    args.kid = compose_kid(7, 0)
    args.key = secrets.token_bytes(16)
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        summary = asyncio.run(run(args))
    except Exception:
        traceback.print_exc()
        return 2
    failures = verdict(summary, args)
    summary["failures"] = failures
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}, indent=1, default=str))
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("PASS: every frame kept; RSS, fds and gauges within the targets")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
