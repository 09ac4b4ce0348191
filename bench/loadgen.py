"""Load generator: P publishers and S subscribers through a real SFU over ICE/DTLS/SRTP.

    python bench/loadgen.py --publishers 4 --subscribers 4 --seconds 20 [--json out.json]
    python bench/loadgen.py --capacity --publishers 3 --subscribers 20 --step 20 --seconds 8

It starts `python -m sfu serve` on free loopback ports, publishes P streams over WHIP (VP8-like
video at ~1 Mbit/s (--video-kbps) plus Opus-like audio at 48 kbit/s, all pre-encrypted
SFrame-shaped frames), subscribes each of S subscribers to every stream over WHEP (P x S
sessions), waits until every subscriber receives video and audio, warms up, then measures for
--seconds:

- SFU CPU (utime+stime from /proc/<pid>/stat, summed over the server process and its
  descendants, i.e. its media workers with rtc.workers > 1) per forwarded packet, and as % of
  one core;
- forwarded packets/s: the SFU's own `sfu_rtp_packets_total{direction="out"}` counter when
  /metrics exports it, else the packets the subscribers received (the output says which); the
  CPU per packet the subscribers received is reported as well (what bench/compare.py compares);
- loss: 1 - received / (sent x subscribers), over packets *sent* inside the window;
- added latency: the kernel's receive timestamp minus the send time carried inside the
  encrypted payload (one clock, one machine): both loopback hops plus everything the SFU does,
  but not the time the generator takes to get to the packet;
- SFU RSS (VmRSS, VmHWM, summed over the same processes), the generator's achieved send rate
  and CPU, and the CPU the rest of the machine used meanwhile (the numbers are only as quiet
  as the machine).

--rooms R spreads the publishers round-robin over rooms bench-0 .. bench-(R-1); every
subscriber still subscribes to every stream, each subscription a session in its publisher's
room (P x S sessions whatever R), so with `--sfu-set rtc.workers=N` the rooms can be placed on
different media workers. A media worker sends its counters to /metrics once a second, so a
scrape may lag by up to 1 s: with workers the forwarded packets are the ones the subscribers
received (the counter's rate is printed alongside).

The clients are `bench.loadgen_peer` (our STUN codec, a pyOpenSSL DTLS client, our SRTP), in
one worker process (--procs 1) or with publishers in one and subscribers over the rest
(--procs N). By default every subscriber decrypts every packet to read the send time inside.
--count-only receivers instead count packets straight off the socket by SSRC and sequence
number from the clear RTP header (loss from sequence gaps) and decrypt 1 packet in
--sample-every for latency, so that one generator core can take well over 100k packets/s.

--capacity steps the subscribers up (from --subscribers, by --step, --seconds per step, one SFU
and one set of sessions throughout) until a step fails -- it loses >= --max-loss % (0.1), fewer
than 99 % of the packets sent in the window arrive in it (a growing backlog), or its sampled
latency p99 exceeds --max-p99-ms (50) -- or the SFU (its busiest process, with media workers)
uses --max-cpu % of one core, new sessions cannot connect, or the generator saturates; it
reports the highest passing step's forwarded packets/s.

--profile runs the SFU under cProfile, --perf records it with `perf record` for the window;
--pin puts the SFU (all its processes) on CPU 0 and the generator on CPU 1. bench/compare.py
runs the same load against Janus. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from bench.janus_api import JanusSignaling  # noqa: E402
from bench.janus_server import die_with_parent  # noqa: E402
from bench.loadgen_media import (  # noqa: E402
    AUDIO_PPS,
    FPS,
    CountingStream,
    Publisher,
    SubscriberStream,
    Window,
    packets_per_second,
)
from bench.loadgen_peer import (  # noqa: E402
    Peer,
    PeerError,
    Ssrcs,
    client_context,
    parse_answer,
)
from bench.sfu_process import merge, wait_ready_blocking  # noqa: E402
from sfu.media.dtls import DtlsCertificate  # noqa: E402

ROOM = "bench"
SDP_HEADERS = {"Content-Type": "application/sdp"}
# The SFU's own packet counter, summed over any other labels it carries (e.g. kind).
RTP_COUNTER = "sfu_rtp_packets_total"
FORWARDED_METRIC = f'{RTP_COUNTER}{{direction="out"}}'
RECEIVED_METRIC = f'{RTP_COUNTER}{{direction="in"}}'
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_CATCH_UP = 5  # ticks a late pacer may send back to back before it skips instead
PACER_TOLERANCE = 0.001


# -- worker process (the clients) --------------------------------------------------------------


@dataclass
class WorkerPlan:
    backend: str  # "blindfold" (WHIP/WHEP) or "janus" (its HTTP API, VideoRoom plugin)
    base_url: str
    room: str
    rooms: int = 1  # publisher p publishes in room_of(room, rooms, p)
    publishers: list[int] = field(default_factory=list)
    pub_tokens: dict[int, str] = field(default_factory=dict)
    count_only: bool = False  # CountingStream receivers instead of decrypting every packet
    sample_every: int = 16  # count_only: decrypt 1 packet in this many, for latency
    video_kbps: int = 1000
    concurrency: int = 8


class Pacer:
    """Calls `tick` at start + n * interval on the loop clock (absolute times, so no drift).

    A loop that ran late catches up by up to MAX_CATCH_UP ticks and skips the rest: skipped
    ticks lower the achieved send rate, which the report shows, instead of hiding overload.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        start: float,
        interval: float,
        tick: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.start = start
        self.interval = interval
        self.tick = tick
        self.n = 0
        self.skipped = 0
        self.max_late = 0.0
        self.stopped = False
        self.handle = loop.call_at(start, self._fire)

    def _fire(self) -> None:
        if self.stopped:
            return
        now = self.loop.time()
        due = self.start + self.n * self.interval
        self.max_late = max(self.max_late, now - due)
        burst = 0
        # Timers may fire up to the loop's clock resolution (1 ms on uvloop) early; without the
        # tolerance the pacer would re-arm for the same instant and spin until it passes.
        while due <= now + PACER_TOLERANCE:
            if burst < MAX_CATCH_UP:
                self.tick()
                burst += 1
            else:
                self.skipped += 1
            self.n += 1
            due = self.start + self.n * self.interval
        self.handle = self.loop.call_at(due, self._fire)

    def stop(self) -> None:
        self.stopped = True
        self.handle.cancel()


async def _post(http: aiohttp.ClientSession, url: str, offer: str, token: str) -> tuple[str, str]:
    headers = {**SDP_HEADERS, "Authorization": f"Bearer {token}"}
    async with http.post(url, data=offer, headers=headers) as response:
        body = await response.text()
        if response.status != 201:
            raise PeerError(f"POST {url}: {response.status} {body[:300]}")
        return body, urljoin(url, response.headers["Location"])


class BlindfoldSignaling:
    """WHIP for publishers, WHEP for subscribers (we offer; the SFU is ICE-lite)."""

    subscriber_controlling = True

    def __init__(self, http: aiohttp.ClientSession, plan: WorkerPlan) -> None:
        self.http = http
        self.plan = plan
        self.sessions: list[tuple[str, str]] = []  # (url, token) to DELETE at the end

    async def start(self) -> None:
        pass

    async def publish(self, index: int, peer: Peer, ssrcs: Ssrcs) -> str:
        offer = peer.offer(send=True, ssrcs=ssrcs)
        token = self.plan.pub_tokens[index]
        room = room_of(self.plan.room, self.plan.rooms, index)
        url = f"{self.plan.base_url}/whip/{room}/p{index}"
        answer, location = await _post(self.http, url, offer, token)
        self.sessions.append((location, token))
        return answer

    async def subscribe(self, _subscriber: int, publisher: int, peer: Peer, token: str) -> str:
        offer = peer.offer(send=False, ssrcs=None)
        room = room_of(self.plan.room, self.plan.rooms, publisher)
        url = f"{self.plan.base_url}/whep/{room}/p{publisher}"
        answer, location = await _post(self.http, url, offer, token)
        self.sessions.append((location, token))
        return answer

    async def close(self) -> None:
        # DELETE lets the SFU drop the sessions at once instead of draining them at SIGTERM.
        timeout = aiohttp.ClientTimeout(total=5)

        async def delete(url: str, token: str) -> None:
            try:
                async with self.http.delete(
                    url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
                ):
                    pass
            except (aiohttp.ClientError, TimeoutError):
                pass

        await asyncio.gather(*(delete(url, token) for url, token in self.sessions))

    def stats(self) -> dict[str, Any]:
        return {}


Signaling = BlindfoldSignaling | JanusSignaling


def room_of(base: str, rooms: int, publisher: int) -> str:
    """Publisher p's room: `base` itself with one room, else base-(p mod rooms). Every
    subscription to p is a session in p's room."""
    return base if rooms == 1 else f"{base}-{publisher % rooms}"


Stream = SubscriberStream | CountingStream


def _signaling(plan: WorkerPlan, http: aiohttp.ClientSession) -> Signaling:
    if plan.backend == "janus":
        return JanusSignaling(http, plan.base_url, int(plan.room))
    return BlindfoldSignaling(http, plan)


async def _worker(plan: WorkerPlan, conn: Connection) -> None:
    """Runs the parent's commands in order: publish, subscribe (any number of times, each
    adding subscriptions), window (any number of times: counters restart for each), stop."""
    loop = asyncio.get_running_loop()
    certificate = DtlsCertificate.generate()
    context = client_context(certificate)
    window = Window()
    video_latency: array[int] = array("q")
    audio_latency: array[int] = array("q")
    publishers: list[Publisher] = []
    streams: list[Stream] = []
    pacers: list[Pacer] = []
    limit = asyncio.Semaphore(plan.concurrency)

    async def command() -> tuple[Any, ...]:
        message: tuple[Any, ...] = await loop.run_in_executor(None, conn.recv)
        return message

    async def publish(index: int, signaling: Signaling) -> Publisher:
        async with limit:
            peer = Peer(context, certificate)
            ssrcs = Ssrcs.random()
            remote = await signaling.publish(index, peer, ssrcs)
            await peer.connect(parse_answer(remote))
            publisher = Publisher(index, peer, ssrcs, window, plan.video_kbps)
            peer.on_srtp = publisher.on_srtp
            return publisher

    async def subscribe(sub: int, pub: int, token: str, signaling: Signaling) -> Stream:
        async with limit:
            peer = Peer(context, certificate, controlling=signaling.subscriber_controlling)
            remote = await signaling.subscribe(sub, pub, peer, token)
            await peer.connect(parse_answer(remote))
            stream: Stream
            if plan.count_only:
                stream = CountingStream(
                    sub, pub, peer, window, video_latency, audio_latency, plan.sample_every
                )
            else:
                stream = SubscriberStream(sub, pub, peer, window, video_latency, audio_latency)
            peer.on_srtp = stream.on_srtp
            return stream

    # Janus holds one HTTP connection in its long poll; the default pool (100) is plenty else.
    async with aiohttp.ClientSession() as http:
        signaling = _signaling(plan, http)
        await signaling.start()
        try:
            while True:
                message = await command()
                kind = message[0]
                if kind == "publish":
                    started = time.monotonic()
                    new = await asyncio.gather(*(publish(i, signaling) for i in plan.publishers))
                    publishers += new
                    base = loop.time() + 0.05
                    count = max(1, len(new))
                    for k, pub in enumerate(new):
                        # Stagger publishers over one frame interval, as independent cameras.
                        pacers.append(
                            Pacer(loop, base + k / FPS / count, 1 / FPS, pub.send_video_frame)
                        )
                        pacers.append(
                            Pacer(
                                loop,
                                base + 0.007 + k / AUDIO_PPS / count,
                                1 / AUDIO_PPS,
                                pub.send_audio,
                            )
                        )
                    conn.send(("published", {"seconds": time.monotonic() - started}))
                elif kind == "subscribe":
                    _, subscriptions, tokens = message
                    started = time.monotonic()
                    new_streams = list(
                        await asyncio.gather(
                            *(
                                subscribe(
                                    s,
                                    p,
                                    tokens.get((s, room_of(plan.room, plan.rooms, p)), ""),
                                    signaling,
                                )
                                for s, p in subscriptions
                            )
                        )
                    )
                    streams += new_streams
                    try:
                        await asyncio.wait_for(
                            asyncio.gather(*(s.started() for s in new_streams)), 30
                        )
                    except TimeoutError:
                        waiting = [
                            f"s{s.subscriber}<-p{s.publisher}"
                            for s in new_streams
                            if not s._ready.done()
                        ]
                        raise PeerError(f"no media after 30 s on {', '.join(waiting)}") from None
                    conn.send(("subscribed", {"seconds": time.monotonic() - started}))
                elif kind == "window":
                    _, start_ns, end_ns, grace = message
                    for pub in publishers:
                        pub.reset_window()
                    for stream in streams:
                        stream.reset_window()
                    del video_latency[:]
                    del audio_latency[:]
                    skipped0 = sum(p.skipped for p in pacers)
                    for pacer in pacers:
                        pacer.max_late = 0.0
                    window.start_ns, window.end_ns = start_ns, end_ns
                    await asyncio.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9 + grace))
                    result = _window_result(publishers, streams, pacers, skipped0)
                    result["signaling"] = signaling.stats()
                    conn.send(("result", result))
                elif kind == "stop":
                    break
        finally:
            for pacer in pacers:
                pacer.stop()
            await signaling.close()
            for peer in [p.peer for p in publishers] + [s.peer for s in streams]:
                peer.close()
    conn.send(("stopped", None))


def _window_result(
    publishers: list[Publisher], streams: list[Stream], pacers: list[Pacer], skipped0: int
) -> dict[str, Any]:
    peers = [p.peer for p in publishers] + [s.peer for s in streams]
    video_latency = streams[0].video_latency if streams else array("q")
    audio_latency = streams[0].audio_latency if streams else array("q")
    return {
        "sent": {p.index: [p.sent_video, p.sent_audio] for p in publishers},
        # (subscriber, publisher, video, audio, packets the window's sequence numbers span
        # or -1 when the receiver decrypts and counts by send time instead)
        "received": [
            [
                s.subscriber,
                s.publisher,
                s.win_video,
                s.win_audio,
                s.expected() if isinstance(s, CountingStream) else -1,
            ]
            for s in streams
        ],
        "video_latency_ns": video_latency.tobytes(),
        "audio_latency_ns": audio_latency.tobytes(),
        "pacer_skipped": sum(p.skipped for p in pacers) - skipped0,
        "pacer_max_late_ms": max((p.max_late for p in pacers), default=0.0) * 1000,
        "read_lag_sum_ns": sum(s.read_lag_sum_ns for s in streams),
        "read_lag_count": sum(
            s.samples if isinstance(s, CountingStream) else s.win_video + s.win_audio
            for s in streams
        ),
        "read_lag_max_ns": max((s.read_lag_max_ns for s in streams), default=0),
        "send_errors": sum(peer.send_errors for peer in peers),
        "srtp_failures": sum(s.srtp_failures for s in streams),
        "reordered": sum(s.reordered for s in streams),
        "unknown_ssrc": sum(s.unknown for s in streams),
        "plis": sum(p.plis for p in publishers),
        "keyframes": sum(p.keyframes for p in publishers),
        "srtp_profiles": sorted({peer.srtp_profile for peer in peers}),
        "consent_sent": sum(peer.consent_sent for peer in peers),
        "consent_ok": sum(peer.consent_ok for peer in peers),
        "checks_answered": sum(peer.checks_answered for peer in peers),
    }


def worker_entry(plan: WorkerPlan, conn: Connection) -> None:
    """Process target: one event loop (uvloop when installed) for all of this worker's peers."""
    # Ctrl-C goes to the whole process group; the parent decides when workers stop. If the
    # parent is killed outright, the workers go with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    # A capacity run may hold more sockets than the default soft limit of open files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_worker(plan, conn))
    except Exception:
        conn.send(("error", traceback.format_exc()))


# -- the SFU process ---------------------------------------------------------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Admission limits far above any load the bench makes: it measures forwarding, not them.
_BENCH_LIMITS = {
    "max_sessions": 100000,
    "max_sessions_per_room": 100000,
    "max_sessions_per_identity": 1000,
    "session_rate_per_identity": 10000.0,
    "session_burst_per_identity": 10000,
    "session_rate_per_ip": 100000.0,
    "session_burst_per_ip": 100000,
}


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--sfu-set rtc.fastpath=off` style overrides as a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--sfu-set takes KEY=VALUE (dotted key), not {item!r}")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


class Sfu:
    """`python -m sfu serve` on free loopback ports, optionally under cProfile.

    `root` is the source tree to run (default: this checkout), e.g. an exported commit;
    `settings` are merged into the config (e.g. {"rtc": {"fastpath": "off"}}).
    """

    name = "blindfold"
    backend = "blindfold"
    room = ROOM

    def __init__(
        self,
        workdir: Path,
        profile: Path | None,
        root: Path | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.http_port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.config_path = workdir / "sfu.yaml"
        self.log_path = workdir / "sfu.log"
        config = {
            "dev_mode": True,
            "drain_timeout": "1s",
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "rtc": {"bind_host": "127.0.0.1", "udp_port": self.udp_port},
            "logging": {"level": "warning"},
            "limits": dict(_BENCH_LIMITS),
        }
        self.config_path.write_text(yaml.safe_dump(merge(config, settings or {}), sort_keys=False))
        self.profile = profile
        self.root = root or ROOT
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._config: Any = None

    def start(self) -> None:
        command = [sys.executable]
        if self.profile is not None:
            command += ["-m", "cProfile", "-o", str(self.profile)]
        command += ["-m", "sfu", "serve", "--config", str(self.config_path)]
        # The SFU reads SFU_* overrides from the environment; this run must be self-contained.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFU_")}
        if self.root != ROOT:
            env["PYTHONPATH"] = str(self.root)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_ready_blocking(self.process, self.url, 20, self.log_tail)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def token(self, identity: str, *, publish: bool, ttl: float, room: str = ROOM) -> str:
        from sfu.config import load_config
        from sfu.control.auth import mint_token

        if self._config is None:
            self._config = load_config(self.config_path, env={})
        return mint_token(
            self._config,
            room=room,
            identity=identity,
            publish=publish,
            subscribe=not publish,
            ttl=ttl,
        )

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """The SFU's RTP counters (empty if /metrics does not export them)."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith(RTP_COUNTER + "{"):
                continue
            series, _, value = line.rpartition(" ")
            direction = dict(_LABEL.findall(series)).get("direction")
            key = {"out": FORWARDED_METRIC, "in": RECEIVED_METRIC}.get(direction or "")
            if key is not None:
                out[key] = out.get(key, 0.0) + float(value)
        return out


class Server(Protocol):
    """What the orchestration needs of the server under test (Sfu, or compare.py's Janus)."""

    name: str
    backend: str  # the worker's signaling: "blindfold" or "janus"
    room: str
    url: str

    @property
    def pid(self) -> int: ...

    def token(self, identity: str, *, publish: bool, ttl: float) -> str: ...

    def metrics(self) -> dict[str, float]: ...


def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process in clock ticks, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces; the fields after it are fixed.
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def cpu_ticks(pid: int) -> int:
    return sum(cpu_split(pid))


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first (a server's media worker processes are
    its children), from the parent pid in every /proc/<pid>/stat."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(entry))
    tree = [pid]
    for node in tree:  # grows while it is walked: breadth first
        tree += sorted(parents.get(node, []))
    return tree


def tree_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """(utime, stime) clock ticks of `pid` and of each of its descendants, by pid."""
    out = {}
    for node in process_tree(pid):
        with contextlib.suppress(OSError):
            out[node] = cpu_split(node)
    return out


def tree_cpu_ticks(pid: int) -> int:
    return sum(u + s for u, s in tree_cpu(pid).values())


def process_label(pid: int, root: int) -> str:
    if pid == root:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    if "sfu.media.worker" in argv:
        return f"media worker (pid {pid})"
    return f"{Path(argv[0]).name} (pid {pid})"


def machine_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of the whole machine, from /proc/stat's "cpu" line."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq, steal


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` and its descendants, each summed over the processes (pages
    they share, such as the interpreter's, count once per process)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for node in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{node}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0])
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` and of its descendants onto `cpus` (threads and processes
    started later inherit the mask)."""
    for node in process_tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{node}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list, in ms (ns input); NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank] / 1e6


# -- orchestration -----------------------------------------------------------------------------


def _expect(conn: Connection, kind: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"a worker sent no {kind!r} within {timeout:g} s")
    message = conn.recv()
    if message[0] == "error":
        raise RuntimeError(f"a worker failed:\n{message[1]}")
    if message[0] != kind:
        raise RuntimeError(f"expected {kind!r} from a worker, got {message[0]!r}")
    return message[1]


class Load:
    """The generator's worker processes, driven step by step: publish, subscribe (repeatable,
    adding subscribers), measure a window (repeatable), stop.

    --procs 1: one process for everything. --procs N >= 2: publishers in the first, the
    subscribers spread over the other N - 1 (subscriber s in worker 1 + s % (N - 1)), so the
    publishers' pacing is never delayed by receive bursts.
    """

    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.rooms: int = getattr(args, "rooms", 1)
        if self.rooms > 1 and not isinstance(server, Sfu):
            raise ValueError("more than one room needs Blindfold (WHIP/WHEP)")
        self.ttl = 3600.0
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self.subscribers = 0
        self.broken = False  # a worker failed: stop the rest without waiting for replies

    def room(self, publisher: int) -> str:
        return room_of(self.server.room, self.rooms, publisher)

    def token(self, identity: str, *, publish: bool, room: str) -> str:
        if room == self.server.room:
            return self.server.token(identity, publish=publish, ttl=self.ttl)
        assert isinstance(self.server, Sfu)
        return self.server.token(identity, publish=publish, ttl=self.ttl, room=room)

    def __enter__(self) -> Load:
        args, server = self.args, self.server
        pubs = list(range(args.publishers))
        pub_tokens = (
            {p: self.token(f"pub{p}", publish=True, room=self.room(p)) for p in pubs}
            if server.backend == "blindfold"
            else {}
        )
        ctx = multiprocessing.get_context("spawn")
        for k in range(args.procs):
            plan = WorkerPlan(
                backend=server.backend,
                base_url=server.url,
                room=server.room,
                rooms=self.rooms,
                publishers=pubs if k == 0 else [],
                pub_tokens=pub_tokens if k == 0 else {},
                count_only=args.count_only,
                sample_every=args.sample_every,
                video_kbps=args.video_kbps,
            )
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(target=worker_entry, args=(plan, child_end), daemon=True)
            process.start()
            self.workers.append((process, parent_end))
            if args.pin:
                pin(process.pid or 0, {1})
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(clean=exc[0] is None and not self.broken)

    def close(self, *, clean: bool) -> None:
        if clean:
            for _, conn in self.workers:
                conn.send(("stop",))
            for _, conn in self.workers:
                _expect(conn, "stopped", 30)
        else:
            for _, conn in self.workers:
                with contextlib.suppress(OSError):
                    conn.send(("stop",))
        for process, _ in self.workers:
            process.join(5 if clean else 2)
            if process.is_alive():
                process.terminate()
                process.join(2)
        self.workers = []

    def publish(self) -> float:
        for _, conn in self.workers:
            conn.send(("publish",))
        return float(max(_expect(conn, "published", 60)["seconds"] for _, conn in self.workers))

    def subscribe(self, count: int) -> float:
        """Add subscribers self.subscribers .. + count, each to every publisher's stream.

        With several rooms each subscription is a session in its publisher's room, so a
        subscriber is one participant in every room, watching that room's publishers."""
        new = range(self.subscribers, self.subscribers + count)
        self.subscribers += count
        pubs = range(self.args.publishers)
        targets = self.workers[1:] if len(self.workers) > 1 else self.workers
        busy = []
        for k, (_, conn) in enumerate(targets):
            mine = [s for s in new if s % len(targets) == k]
            if not mine:
                continue
            rooms = sorted({self.room(p) for p in pubs})
            tokens = (
                {
                    (s, room): self.token(f"sub{s}", publish=False, room=room)
                    for s in mine
                    for room in rooms
                }
                if self.server.backend == "blindfold"
                else {}
            )
            conn.send(("subscribe", [(s, p) for s in mine for p in pubs], tokens))
            busy.append(conn)
        timeout = 90 + 0.2 * count * len(pubs)
        return max((_expect(conn, "subscribed", timeout)["seconds"] for conn in busy), default=0)

    def measure(self, perf: Path | None = None) -> dict[str, Any]:
        """One window: --warmup s, then --seconds measured; raw counts for summarise()."""
        args, server = self.args, self.server
        start_ns = time.monotonic_ns() + int(args.warmup * 1e9)
        end_ns = start_ns + int(args.seconds * 1e9)
        for _, conn in self.workers:
            conn.send(("window", start_ns, end_ns, args.grace))
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        pids = [p.pid or 0 for p, _ in self.workers]
        # Scrape before reading the CPU at the start and after it at the end, so the
        # scrapes' own CPU stays outside the window. A busy server may take a while to
        # answer: the counters are taken to be read halfway through each scrape.
        m0 = time.monotonic_ns()
        metrics0 = server.metrics()
        t0 = time.monotonic_ns()
        # The server and its descendants (media workers), which exist for the whole window.
        tree0 = tree_cpu(server.pid)
        recorder = start_perf(perf, list(tree0))
        gen0 = [cpu_ticks(pid) for pid in pids]
        busy0, steal0 = machine_ticks()
        time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
        tree1 = tree_cpu(server.pid)
        gen1 = [cpu_ticks(pid) for pid in pids]
        busy1, steal1 = machine_ticks()
        t1 = time.monotonic_ns()
        metrics1 = server.metrics()
        m1 = time.monotonic_ns()
        stop_perf(recorder)  # after t1: writing perf's data file is not part of the window
        memory = memory_kb(server.pid)
        results = [_expect(conn, "result", args.grace + 30) for _, conn in self.workers]
        measured = (t1 - t0) / 1e9
        # A process that started in the window counts from zero; one that ended in it is
        # missing from the sum (its CPU went to its parent's cutime when it was reaped).
        by_process = {
            pid: (
                (u1 - tree0.get(pid, (0, 0))[0]) / CLK_TCK,
                (s1 - tree0.get(pid, (0, 0))[1]) / CLK_TCK,
            )
            for pid, (u1, s1) in tree1.items()
        }
        server_cpu = sum(u + s for u, s in by_process.values())
        gen_cpu = [(b - a) / CLK_TCK for a, b in zip(gen0, gen1, strict=True)]
        return {
            "results": results,
            "measured": measured,
            "sfu_cpu_s": server_cpu,
            "sfu_sys_s": sum(s for _, s in by_process.values()),
            "sfu_cpu_by_process": [
                {"process": process_label(pid, server.pid), "cpu_s": u + s}
                for pid, (u, s) in by_process.items()
            ],
            "sfu_processes_ended": len(set(tree0) - set(tree1)),
            "gen_cpu_s": gen_cpu,
            # Whatever else ran on the machine meanwhile (other users' jobs, the kernel's
            # softirqs for loopback), and time the hypervisor took: context for noisy results.
            "other_cpu_s": (busy1 - busy0) / CLK_TCK - server_cpu - sum(gen_cpu),
            "steal_s": (steal1 - steal0) / CLK_TCK,
            "memory": memory,
            "metrics": (metrics0, metrics1),
            "metrics_seconds": ((t1 + m1) - (m0 + t0)) / 2e9,
            "subscribers": self.subscribers,
        }


def idle_cpu(pid: int, seconds: float) -> float:
    """CPU share of the idle server (timers, loop-lag probe; its media workers included)
    before any session exists."""
    t0, c0 = time.monotonic(), tree_cpu_ticks(pid)
    time.sleep(seconds)
    return (tree_cpu_ticks(pid) - c0) / CLK_TCK / (time.monotonic() - t0)


def measure_once(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """args.publishers x args.subscribers on a running server: one window, summarised."""
    idle = idle_cpu(server.pid, args.idle)
    with Load(args, server) as load:
        setup_pub = load.publish()
        setup_sub = load.subscribe(args.subscribers)
        raw = load.measure(getattr(args, "perf", None))
    return summarise(args, raw, server=server, idle=idle, setup=(setup_pub, setup_sub))


def judge(s: dict[str, Any], args: argparse.Namespace) -> str:
    """A capacity step's verdict: "pass", or why it does not count / why to stop."""
    loss = s["loss_percent"]
    if loss is None or loss >= args.max_loss:
        return "loss"
    if s["delivery_percent"] is not None and s["delivery_percent"] < 99.0:
        return "backlog"  # fewer packets arrived in the window than were sent into it
    p99 = s["latency_ms"]["p99"]
    if not p99 <= args.max_p99_ms:  # NaN (no samples) fails too
        return "latency"  # a queue builds up somewhere: the server is not keeping up
    return "pass"


def capacity_on(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """Step the subscribers up by --step from --subscribers until a step fails (judge()),
    the server (its busiest process) reaches --max-cpu % of one core, new sessions fail to
    connect, the generator saturates, or --max-subscribers; the highest passing step is the
    capacity."""
    idle = idle_cpu(server.pid, args.idle)
    steps: list[dict[str, Any]] = []
    stop_reason = f"reached --max-subscribers {args.max_subscribers}"
    started = time.monotonic()
    with Load(args, server) as load:
        load.publish()
        target = args.subscribers
        while target <= args.max_subscribers:
            try:
                setup = load.subscribe(target - load.subscribers)
            except RuntimeError as exc:
                # A saturated server drops datagrams at its socket, ICE checks included.
                reason = str(exc).strip().splitlines()[-1]
                stop_reason = f"adding subscribers up to {target} failed ({reason})"
                print(f"  {stop_reason}", flush=True)
                load.broken = True
                break
            raw = load.measure()
            step = summarise(args, raw, server=server, idle=idle, setup=(0.0, setup))
            step["verdict"] = judge(step, args)
            steps.append(step)
            print(step_line(step), flush=True)
            gen = step["generator"]
            if step["verdict"] != "pass":
                stop_reason = f"{step['verdict']} at {target} subscribers"
                break
            # One core is the limit of each of the server's processes (media workers).
            busiest = step["sfu_max_process_cpu_percent"]
            if busiest >= args.max_cpu:
                stop_reason = (
                    f"the server used {step['sfu_cpu_percent']:.0f} % of a core"
                    if step["sfu_processes"] == 1
                    else f"a server process used {busiest:.0f} % of a core"
                )
                break
            if gen["max_process_cpu_percent"] >= 90 or gen["achieved_percent"] < 99:
                stop_reason = "the generator saturated: the result is a lower bound"
                break
            if time.monotonic() - started > args.max_minutes * 60:
                stop_reason = f"--max-minutes {args.max_minutes:g} passed"
                break
            target += args.step
    passing = [s for s in steps if s["verdict"] == "pass"]
    best = max(passing, key=lambda s: s["forwarded_pps"], default=None)
    return {
        "server": server.name,
        "steps": steps,
        "best": best,
        "stop_reason": stop_reason,
        "max_loss_percent": args.max_loss,
    }


def step_line(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    gen = s["generator"]
    loss = s["loss_percent"]
    return (
        f"  {s['publishers']}x{s['subscribers']:<4} {s['forwarded_pps']:>9,.0f} pkt/s  "
        f"server {s['sfu_cpu_percent']:5.1f} %  "
        f"{s['sfu_cpu_us_per_received_packet'] or float('nan'):5.1f} µs/pkt  "
        f"loss {float('nan') if loss is None else loss:.3f} %  "
        f"p50/p99 {lat['p50']:.1f}/{lat['p99']:.1f} ms  "
        f"gen {gen['cpu_percent']:.0f} % (max proc {gen['max_process_cpu_percent']:.0f} %)  "
        f"rest {s['machine']['other_cpu_percent']:.0f} %  {s.get('verdict', '')}"
    )


def summarise(
    args: argparse.Namespace,
    raw: dict[str, Any],
    *,
    server: Server,
    idle: float,
    setup: tuple[float, float],
) -> dict[str, Any]:
    results: list[dict[str, Any]] = raw["results"]
    measured: float = raw["measured"]
    sfu_cpu_s: float = raw["sfu_cpu_s"]
    sfu_sys_s: float = raw["sfu_sys_s"]
    gen_cpu: list[float] = raw["gen_cpu_s"]
    seconds = args.seconds
    subscribers = raw["subscribers"]
    sent: dict[int, int] = {}
    for r in results:
        for pub, (video, audio) in r["sent"].items():
            sent[int(pub)] = video + audio
    sent_expected = received = seq_expected = 0
    for r in results:
        for _sub, pub, video, audio, spanned in r["received"]:
            sent_expected += sent[pub]
            received += video + audio
            seq_expected += max(spanned, video + audio)
    if args.count_only:
        # Loss from sequence-number gaps; delivery compares arrivals in the window with the
        # packets sent in it (edges differ by one-way latency, so it is only a backlog check).
        expected = seq_expected
        loss_method = "sequence-number gaps per SSRC, by arrival in the window"
    else:
        expected = sent_expected
        loss_method = "packets sent in the window (mark inside the payload) not received"
    intended = args.publishers * packets_per_second(args.video_kbps) * seconds
    total_sent = sum(sent.values())
    video_lat = sorted(v for r in results for v in array("q", r["video_latency_ns"]))
    audio_lat = sorted(v for r in results for v in array("q", r["audio_latency_ns"]))
    all_lat = sorted(video_lat + audio_lat)
    before, after = raw["metrics"]
    span = raw["metrics_seconds"]
    received_pps = received / seconds if seconds else 0.0
    by_process = raw.get("sfu_cpu_by_process", [])
    counter_pps = None
    if FORWARDED_METRIC in before and FORWARDED_METRIC in after:
        counter_pps = (after[FORWARDED_METRIC] - before[FORWARDED_METRIC]) / span
    workers = any(p["process"].startswith("media worker") for p in by_process)
    if counter_pps is not None and not workers:
        forwarded_pps = counter_pps
        forwarded_source = f"SFU counter {FORWARDED_METRIC}"
    elif counter_pps is not None:
        # Media workers send their counters to /metrics once a second: each scrape may lag by
        # up to 1 s, and a window edge that falls between the two scrapes' phases moves a
        # second of one worker's packets in or out of the count. The receivers count exactly.
        forwarded_pps = received_pps
        forwarded_source = (
            "packets received by all subscribers (the media workers' counter, sent once a "
            f"second, said {counter_pps:,.0f}/s)"
        )
    else:
        forwarded_pps = received_pps
        forwarded_source = "packets received by all subscribers (server exports no counter)"
    sfu_in = None
    if RECEIVED_METRIC in before and RECEIVED_METRIC in after:
        sfu_in = (after[RECEIVED_METRIC] - before[RECEIVED_METRIC]) / span
    send_rate = total_sent / intended if intended else 0.0
    # Packets per CPU window: the counters' and the receivers' windows are not exactly the
    # CPU's, their rates are. The same normalisation for every server: CPU over the packets
    # the subscribers got (what compare.py compares).
    forwarded = forwarded_pps * measured
    received_in_cpu_window = received_pps * measured
    read_lag_count = sum(r["read_lag_count"] for r in results)
    memory = raw["memory"]
    return {
        "server": server.name,
        "publishers": args.publishers,
        "subscribers": subscribers,
        "rooms": getattr(args, "rooms", 1),
        "sessions": args.publishers * (subscribers + 1),
        "seconds": seconds,
        "video_kbps": args.video_kbps,
        "receivers": (
            f"counting (1 in {args.sample_every} decrypted)" if args.count_only else "decrypting"
        ),
        "generator_processes": args.procs,
        "pinned": bool(args.pin),
        "forwarded_pps": forwarded_pps,
        "forwarded_source": forwarded_source,
        "sfu_counter_pps": counter_pps,
        "received_pps": received_pps,
        "sfu_received_pps": sfu_in,
        "sfu_cpu_us_per_packet": sfu_cpu_s * 1e6 / forwarded if forwarded else None,
        "sfu_cpu_us_per_packet_above_idle": (
            (sfu_cpu_s - idle * measured) * 1e6 / forwarded if forwarded else None
        ),
        "sfu_cpu_us_per_received_packet": (
            sfu_cpu_s * 1e6 / received_in_cpu_window if received_in_cpu_window else None
        ),
        "sfu_cpu_percent": 100 * sfu_cpu_s / measured,
        # The server process and its descendants (media workers): how many, and each one's
        # share of sfu_cpu_percent.
        "sfu_processes": max(1, len(by_process)),
        "sfu_cpu_by_process": [
            {"process": p["process"], "cpu_percent": 100 * p["cpu_s"] / measured}
            for p in by_process
        ],
        "sfu_max_process_cpu_percent": max(
            (100 * p["cpu_s"] / measured for p in by_process), default=100 * sfu_cpu_s / measured
        ),
        "sfu_processes_ended": raw.get("sfu_processes_ended", 0),
        "sfu_idle_cpu_percent": 100 * idle,
        # Kernel time is mostly the sendto/recvfrom system calls (loopback delivery included).
        "sfu_cpu_system_share_percent": 100 * sfu_sys_s / sfu_cpu_s if sfu_cpu_s else None,
        "loss_percent": 100 * (1 - received / expected) if expected else None,
        "loss_method": loss_method,
        "packets_expected": expected,
        "packets_received": received,
        "delivery_percent": (
            100 * received / sent_expected if args.count_only and sent_expected else None
        ),
        "latency_ms": {
            "samples": len(all_lat),
            "p50": percentile(all_lat, 50),
            "p90": percentile(all_lat, 90),
            "p99": percentile(all_lat, 99),
            "max": percentile(all_lat, 100),
            "video_p50": percentile(video_lat, 50),
            "video_p99": percentile(video_lat, 99),
            "audio_p50": percentile(audio_lat, 50),
            "audio_p99": percentile(audio_lat, 99),
        },
        "rss_mb": memory.get("VmRSS", 0) / 1024,
        "rss_peak_mb": memory.get("VmHWM", 0) / 1024,
        "generator": {
            "intended_pps": intended / seconds if seconds else 0,
            "achieved_pps": total_sent / seconds if seconds else 0,
            "achieved_percent": 100 * send_rate,
            "cpu_percent": 100 * sum(gen_cpu) / measured,
            "max_process_cpu_percent": 100 * max(gen_cpu, default=0.0) / measured,
            "pacer_skipped_ticks": sum(r["pacer_skipped"] for r in results),
            "pacer_max_late_ms": max(r["pacer_max_late_ms"] for r in results),
            "read_lag_mean_ms": (
                sum(r["read_lag_sum_ns"] for r in results) / read_lag_count / 1e6
                if read_lag_count
                else None
            ),
            "read_lag_max_ms": max(r["read_lag_max_ns"] for r in results) / 1e6,
            "send_errors": sum(r["send_errors"] for r in results),
            "setup_seconds": {"publish": setup[0], "subscribe": setup[1]},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "other_cpu_percent": 100 * max(0.0, raw["other_cpu_s"]) / measured,
            "steal_percent": 100 * raw["steal_s"] / measured,
        },
        "checks": {
            "srtp_failures": sum(r["srtp_failures"] for r in results),
            "reordered": sum(r["reordered"] for r in results),
            "unknown_ssrc": sum(r["unknown_ssrc"] for r in results),
            "plis_received": sum(r["plis"] for r in results),
            "keyframes_sent": sum(r["keyframes"] for r in results),
            "consent_checks_sent": sum(r["consent_sent"] for r in results),
            "consent_checks_answered": sum(r["consent_ok"] for r in results),
            "server_checks_answered": sum(r["checks_answered"] for r in results),
            "srtp_profiles": sorted({p for r in results for p in r["srtp_profiles"]}),
            "signaling": [r["signaling"] for r in results if r["signaling"]],
        },
        "profiled": getattr(args, "profile", None) is not None,
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    gen = s["generator"]
    us = s["sfu_cpu_us_per_packet"]
    net = s["sfu_cpu_us_per_packet_above_idle"]
    sys_share = s["sfu_cpu_system_share_percent"] or 0.0
    loss = s["loss_percent"]
    sampled = "" if s["receivers"] == "decrypting" else f" ({lat['samples']:,} samples)"
    rooms = f" in {s['rooms']} rooms" if s.get("rooms", 1) > 1 else ""
    processes = s.get("sfu_processes", 1)
    rss = f"{s['rss_mb']:.1f} MB (peak {s['rss_peak_mb']:.1f} MB)"
    if processes > 1:
        rss = f"{rss}, summed over {processes} processes"
    rows = [
        ("server", s["server"]),
        ("publishers x subscribers", f"{s['publishers']} x {s['subscribers']}{rooms}"),
        ("WHIP + WHEP sessions", f"{s['sessions']}"),
        ("measured", f"{s['seconds']:g} s"),
        ("forwarded packets/s", f"{s['forwarded_pps']:,.0f}"),
        ("SFU CPU per forwarded packet", "n/a" if us is None else f"{us:.1f} µs"),
        ("  of which above idle", "n/a" if net is None else f"{net:.1f} µs"),
        (
            "SFU CPU",
            f"{s['sfu_cpu_percent']:.1f} % of one core ({sys_share:.0f} % in the kernel; "
            f"idle: {s['sfu_idle_cpu_percent']:.1f} %)",
        ),
        (
            "loss",
            "n/a"
            if loss is None
            else f"{loss:.3f} % ({s['packets_expected'] - s['packets_received']:,} "
            f"of {s['packets_expected']:,})",
        ),
        ("added latency p50 / p99" + sampled, f"{_ms(lat['p50'])} / {_ms(lat['p99'])} ms"),
        ("  video p50 / p99", f"{lat['video_p50']:.2f} / {lat['video_p99']:.2f} ms"),
        ("  audio p50 / p99", f"{lat['audio_p50']:.2f} / {lat['audio_p99']:.2f} ms"),
        ("  max", f"{lat['max']:.2f} ms"),
        ("SFU RSS", rss),
        (
            "generator send rate",
            f"{gen['achieved_pps']:,.0f} of {gen['intended_pps']:,.0f} packets/s "
            f"({gen['achieved_percent']:.1f} %)",
        ),
        (
            "generator CPU, read lag mean / max",
            f"{gen['cpu_percent']:.1f} % in {s['generator_processes']} process(es) "
            f"(busiest {gen['max_process_cpu_percent']:.1f} %), "
            f"{_ms(gen['read_lag_mean_ms'])} / {gen['read_lag_max_ms']:.2f} ms",
        ),
        (
            "rest of the machine",
            f"{s['machine']['other_cpu_percent']:.1f} % CPU (other processes, softirq), "
            f"{s['machine']['steal_percent']:.1f} % steal",
        ),
    ]
    if s["delivery_percent"] is not None:
        rows.insert(9, ("  arrived / sent in the window", f"{s['delivery_percent']:.2f} %"))
    if processes > 1:
        at = next(i for i, (name, _) in enumerate(rows) if name == "SFU CPU") + 1
        shares = ", ".join(
            f"{p['process']} {p['cpu_percent']:.1f} %" for p in s["sfu_cpu_by_process"]
        )
        rows.insert(at, ("  summed over processes", shares))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    lines.append(f"forwarded packets counted by: {s['forwarded_source']}")
    lines.append(f"receivers: {s['receivers']}; loss: {s['loss_method']}")
    return "\n".join(lines)


def warnings_for(s: dict[str, Any], max_loss: float = 0.1) -> list[str]:
    """What makes a run's figures doubtful, one sentence each."""
    out = []
    gen = s["generator"]
    if gen["achieved_percent"] < 95:
        out.append(
            f"the generator sent only {gen['achieved_percent']:.1f} % of the intended packets; "
            "results understate the load (try --procs 2)"
        )
    if gen["max_process_cpu_percent"] >= 80:
        out.append(
            f"a generator process used {gen['max_process_cpu_percent']:.0f} % of a core: it may "
            "be what limits the run (try --count-only or more --procs)"
        )
    loss = s["loss_percent"]
    if loss is None or loss >= max_loss:
        out.append(
            f"{s['server']}: loss {'n/a' if loss is None else f'{loss:.3f} %'} (>= {max_loss} %): "
            "its per-packet figure does not count"
        )
    if s.get("sfu_processes_ended"):
        out.append(
            f"{s['sfu_processes_ended']} of the server's processes ended during the window: "
            "their CPU is missing from its figures"
        )
    if s["machine"]["other_cpu_percent"] >= 30:
        out.append(
            f"the rest of the machine used {s['machine']['other_cpu_percent']:.0f} % CPU "
            "meanwhile: a noisy run"
        )
    return out


def start_perf(path: Path | None, pids: list[int]) -> subprocess.Popen[bytes] | None:
    """`perf record` of the SFU's processes for the window: C, libsrtp and kernel time that
    cProfile cannot see (it charges a C call's whole cost, system call included, to its
    caller)."""
    if path is None:
        return None
    if shutil.which("perf") is None:
        print("warning: --perf given but perf is not installed", file=sys.stderr)
        return None
    target = ",".join(str(pid) for pid in pids)
    command = ["perf", "record", "-F", "999", "-g", "-p", target, "-o", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_perf(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    process.send_signal(signal.SIGINT)  # perf writes its data file on SIGINT
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def print_perf(path: Path) -> None:
    """Where the SFU's CPU went by shared object, and the share of the UDP send path."""
    base = ["perf", "report", "-i", str(path), "--stdio", "--no-children"]
    by_dso = subprocess.run(
        [*base, "--sort", "dso", "-g", "none"], capture_output=True, text=True, check=False
    )
    print(f"\nSFU perf profile ({path}), CPU by shared object:")
    print("\n".join(line for line in by_dso.stdout.splitlines() if "%" in line and "#" not in line))
    script = subprocess.run(
        ["perf", "script", "-i", str(path)], capture_output=True, text=True, check=False
    )
    samples = [s for s in script.stdout.split("\n\n") if s.strip()]
    if not samples:
        return
    # On loopback the sender's sendto also runs the receiver's network stack (softirq,
    # enqueue, wake-up); a NIC would take that off the SFU's account.
    groups = {
        "in udp_sendmsg (sendto system call)": ("udp_sendmsg",),
        "  of which loopback receive path": ("net_rx_action", "__netif_receive_skb"),
        "in recvmsg / recvfrom": ("udp_recvmsg",),
        "in libsrtp / OpenSSL (pylibsrtp)": ("_binding.abi3.so",),
    }
    for label, needles in groups.items():
        hits = sum(1 for s in samples if any(n in s for n in needles))
        print(f"{label:<40} {100 * hits / len(samples):5.1f} % of samples")


def print_profile(path: Path, top: int) -> None:
    import pstats

    print(f"\nSFU profile ({path}), top {top} by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


def add_load_arguments(
    parser: argparse.ArgumentParser, *, publishers: int, subscribers: int
) -> None:
    """The load's shape and the generator's options (shared with bench/compare.py)."""
    parser.add_argument("--publishers", type=int, default=publishers)
    parser.add_argument("--subscribers", type=int, default=subscribers)
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=2.0, help="after all media flows")
    parser.add_argument("--idle", type=float, default=2.0, help="idle server CPU sample first")
    parser.add_argument("--grace", type=float, default=0.5, help="receive after the window")
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="generator processes: 1 for everything; N >= 2: publishers in one, "
        "subscribers spread over N - 1",
    )
    parser.add_argument(
        "--video-kbps", type=int, default=1000, help="video bitrate per publisher (30 frames/s)"
    )
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="receivers count packets by SSRC and sequence number without decrypting "
        "(loss from sequence gaps; latency from 1 in --sample-every decrypted packets)",
    )
    parser.add_argument("--sample-every", type=int, default=16)
    parser.add_argument(
        "--pin", action="store_true", help="pin the server to CPU 0 and the generator to CPU 1"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")


def check_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.publishers < 1 or args.subscribers < 1 or not 1 <= args.seconds <= 300:
        parser.error("need >= 1 publisher and subscriber and 1-300 seconds")
    if not 1 <= args.procs <= 8:
        parser.error("--procs must be 1-8")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs 2 CPUs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, publishers=4, subscribers=4)
    parser.add_argument(
        "--perf", type=Path, help="perf record the SFU during the window into this file"
    )
    parser.add_argument(
        "--profile", type=Path, help="run the SFU under cProfile, write stats here, print top"
    )
    parser.add_argument("--sfu-root", type=Path, help="run the SFU from this source tree")
    parser.add_argument(
        "--rooms",
        type=int,
        default=1,
        help="spread the publishers round-robin over this many rooms (bench-0 ..); each "
        "subscription is a session in its publisher's room, so with rtc.workers > 1 rooms "
        "can land on different media workers",
    )
    parser.add_argument(
        "--sfu-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SFU config override, dotted key, YAML value (e.g. rtc.fastpath=off); repeatable",
    )
    capacity = parser.add_argument_group("capacity mode")
    capacity.add_argument(
        "--capacity",
        action="store_true",
        help="step the subscribers up from --subscribers by --step until loss >= --max-loss "
        "or the SFU (its busiest process) uses --max-cpu %% of a core; implies --count-only",
    )
    capacity.add_argument("--step", type=int, default=20, help="subscribers added per step")
    capacity.add_argument("--max-subscribers", type=int, default=400)
    capacity.add_argument("--max-loss", type=float, default=0.1, help="percent")
    capacity.add_argument("--max-cpu", type=float, default=95.0, help="percent of one core")
    capacity.add_argument(
        "--max-p99-ms", type=float, default=50.0, help="a passing step's latency p99 (sampled)"
    )
    capacity.add_argument("--max-minutes", type=float, default=10.0, help="stop stepping after")
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    if not 1 <= args.rooms <= args.publishers:
        parser.error("--rooms must be 1 to --publishers")
    if args.capacity:
        args.count_only = True
        if args.seconds > 20:
            parser.error("--capacity: keep --seconds (per step) at 20 or less")
        if args.step < 1:
            parser.error("--step must be >= 1")
    try:
        settings = parse_settings(args.sfu_set)
    except (ValueError, yaml.YAMLError) as exc:
        parser.error(str(exc))

    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        sfu = Sfu(Path(tmp), args.profile, args.sfu_root, settings)
        sfu.start()
        try:
            if args.pin:
                pin(sfu.pid, {0})
            if args.capacity:
                pps = packets_per_second(args.video_kbps)
                print(
                    f"capacity: {args.publishers} publishers x {pps} packets/s, subscribers "
                    f"from {args.subscribers} by {args.step}, {args.seconds:g} s per step",
                    flush=True,
                )
                summary = capacity_on(args, sfu)
            else:
                summary = measure_once(args, sfu)
        except BaseException:
            print(f"the SFU's log ends with:\n{sfu.log_tail()}", file=sys.stderr)
            raise
        finally:
            exit_code = sfu.stop()
        if exit_code not in (0, None):
            print(f"warning: the SFU exited with {exit_code}:\n{sfu.log_tail()}", file=sys.stderr)

    if args.capacity:
        print(capacity_report(summary))
    else:
        print(table(summary))
        for warning in warnings_for(summary):
            print(f"WARNING: {warning}", file=sys.stderr)
    if summary.get("profiled"):
        print("note: the SFU ran under cProfile; its CPU figures are inflated", file=sys.stderr)
        print_profile(args.profile, 25)
    if args.perf is not None and args.perf.exists():
        print_perf(args.perf)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def capacity_report(c: dict[str, Any]) -> str:
    best = c["best"]
    lines = [f"{c['server']}: stopped because {c['stop_reason']}."]
    if best is None:
        lines.append(f"no step passed (loss < {c['max_loss_percent']} %)")
        return "\n".join(lines)
    gen = best["generator"]
    lines += [
        f"capacity: {best['forwarded_pps']:,.0f} forwarded packets/s with loss "
        f"{best['loss_percent']:.3f} % at {best['publishers']} x {best['subscribers']} "
        f"({best['sfu_cpu_percent']:.0f} % of one core, "
        f"{best['sfu_cpu_us_per_packet']:.1f} µs per packet);",
        f"  latency p50 / p99 {best['latency_ms']['p50']:.2f} / {best['latency_ms']['p99']:.2f}"
        f" ms (sampled); generator {gen['cpu_percent']:.0f} % CPU in "
        f"{best['generator_processes']} process(es), busiest "
        f"{gen['max_process_cpu_percent']:.0f} %; rest of the machine "
        f"{best['machine']['other_cpu_percent']:.0f} %",
    ]
    if best["sfu_cpu_percent"] > 0:
        lines.append(
            f"  at 100 % of one core that would be about "
            f"{best['forwarded_pps'] * 100 / best['sfu_cpu_percent']:,.0f} packets/s "
            "(linear extrapolation of the best step)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
