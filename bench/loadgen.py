"""Load generator: P publishers and S subscribers through a real SFU over ICE/DTLS/SRTP.

    python bench/loadgen.py --publishers 4 --subscribers 4 --seconds 20 [--json out.json]

It starts `python -m sfu serve` on free loopback ports, publishes P streams over WHIP (VP8-like
video at ~1 Mbit/s plus Opus-like audio at 48 kbit/s, all pre-encrypted SFrame-shaped frames),
subscribes each of S subscribers to every stream over WHEP (P x S sessions), waits until every
subscriber receives video and audio, warms up, then measures for --seconds:

- SFU CPU (utime+stime from /proc/<pid>/stat) per forwarded packet, and as % of one core;
- forwarded packets/s: the SFU's own `sfu_rtp_packets_total{direction="out"}` counter when
  /metrics exports it, else the packets the subscribers received (the output says which);
- loss: 1 - received / (sent x subscribers), over packets *sent* inside the window;
- added latency: the kernel's receive timestamp minus the send time carried inside the
  encrypted payload (one clock, one machine): both loopback hops plus everything the SFU does,
  but not the time the generator takes to get to the packet;
- SFU RSS (VmRSS, VmHWM), the generator's achieved send rate and CPU, and the CPU the rest of
  the machine used meanwhile (the numbers are only as quiet as the machine).

The clients are `bench.loadgen_peer` (our STUN codec, a pyOpenSSL DTLS client, our SRTP), in
one worker process (--procs 1) or split publishers / subscribers over two (--procs 2).
--profile runs the SFU under cProfile, --perf records it with `perf record` for the window.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
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
from typing import Any
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.loadgen_media import (  # noqa: E402
    AUDIO_PPS,
    FPS,
    PACKETS_PER_SECOND,
    Publisher,
    SubscriberStream,
    Window,
)
from bench.loadgen_peer import (  # noqa: E402
    Peer,
    PeerError,
    Ssrcs,
    build_offer,
    client_context,
    parse_answer,
)
from bench.sfu_process import wait_ready_blocking  # noqa: E402
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
    base_url: str
    publishers: list[int] = field(default_factory=list)
    subscriptions: list[tuple[int, int]] = field(default_factory=list)  # (subscriber, publisher)
    pub_tokens: dict[int, str] = field(default_factory=dict)
    sub_tokens: dict[int, str] = field(default_factory=dict)
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


async def _worker(plan: WorkerPlan, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    certificate = DtlsCertificate.generate()
    context = client_context(certificate)
    window = Window()
    video_latency: array[int] = array("q")
    audio_latency: array[int] = array("q")
    publishers: list[Publisher] = []
    streams: list[SubscriberStream] = []
    pacers: list[Pacer] = []
    sessions: list[tuple[str, str]] = []  # (url, token) to DELETE at the end
    limit = asyncio.Semaphore(plan.concurrency)

    async def command() -> tuple[Any, ...]:
        message: tuple[Any, ...] = await loop.run_in_executor(None, conn.recv)
        return message

    async def publish(index: int, http: aiohttp.ClientSession) -> Publisher:
        async with limit:
            peer = Peer(context, certificate)
            ssrcs = Ssrcs.random()
            offer = build_offer(
                send=True,
                ufrag=peer.local_ufrag,
                pwd=peer.local_pwd,
                fingerprint=certificate.fingerprint,
                ssrcs=ssrcs,
            )
            token = plan.pub_tokens[index]
            answer, location = await _post(
                http, f"{plan.base_url}/whip/{ROOM}/p{index}", offer, token
            )
            sessions.append((location, token))
            await peer.connect(parse_answer(answer))
            publisher = Publisher(index, peer, ssrcs, window)
            peer.on_srtp = publisher.on_srtp
            return publisher

    async def subscribe(sub: int, pub: int, http: aiohttp.ClientSession) -> SubscriberStream:
        async with limit:
            peer = Peer(context, certificate)
            offer = build_offer(
                send=False,
                ufrag=peer.local_ufrag,
                pwd=peer.local_pwd,
                fingerprint=certificate.fingerprint,
                ssrcs=None,
            )
            token = plan.sub_tokens[sub]
            answer, location = await _post(
                http, f"{plan.base_url}/whep/{ROOM}/p{pub}", offer, token
            )
            sessions.append((location, token))
            await peer.connect(parse_answer(answer))
            stream = SubscriberStream(sub, pub, peer, window, video_latency, audio_latency)
            peer.on_srtp = stream.on_srtp
            return stream

    async with aiohttp.ClientSession() as http:
        await command()  # publish
        started = time.monotonic()
        publishers = list(await asyncio.gather(*(publish(i, http) for i in plan.publishers)))
        base = loop.time() + 0.05
        count = max(1, len(publishers))
        for k, pub in enumerate(publishers):
            # Stagger publishers over one frame interval, as independent cameras would be.
            pacers.append(Pacer(loop, base + k / FPS / count, 1 / FPS, pub.send_video_frame))
            pacers.append(
                Pacer(loop, base + 0.007 + k / AUDIO_PPS / count, 1 / AUDIO_PPS, pub.send_audio)
            )
        conn.send(("published", {"seconds": time.monotonic() - started}))

        await command()  # subscribe
        started = time.monotonic()
        streams = list(
            await asyncio.gather(*(subscribe(s, p, http) for s, p in plan.subscriptions))
        )
        try:
            await asyncio.wait_for(asyncio.gather(*(s.started() for s in streams)), 30)
        except TimeoutError:
            waiting = [f"s{s.subscriber}<-p{s.publisher}" for s in streams if not s._ready.done()]
            raise PeerError(f"no media after 30 s on {', '.join(waiting)}") from None
        conn.send(("subscribed", {"seconds": time.monotonic() - started}))
        peers = [p.peer for p in publishers] + [s.peer for s in streams]

        _, start_ns, end_ns, grace = await command()  # window
        window.start_ns, window.end_ns = start_ns, end_ns
        await asyncio.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9 + grace))
        result = {
            "sent": {p.index: [p.sent_video, p.sent_audio] for p in publishers},
            "received": [[s.subscriber, s.publisher, s.win_video, s.win_audio] for s in streams],
            "video_latency_ns": video_latency.tobytes(),
            "audio_latency_ns": audio_latency.tobytes(),
            "pacer_skipped": sum(p.skipped for p in pacers),
            "pacer_max_late_ms": max((p.max_late for p in pacers), default=0.0) * 1000,
            "read_lag_sum_ns": sum(s.read_lag_sum_ns for s in streams),
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
        }
        conn.send(("result", result))

        await command()  # stop
        for pacer in pacers:
            pacer.stop()
        # DELETE lets the SFU drop the sessions at once instead of draining them at SIGTERM.
        timeout = aiohttp.ClientTimeout(total=5)

        async def delete(url: str, token: str) -> None:
            try:
                async with http.delete(
                    url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
                ):
                    pass
            except (aiohttp.ClientError, TimeoutError):
                pass

        await asyncio.gather(*(delete(url, token) for url, token in sessions))
        for peer in peers:
            peer.close()
        conn.send(("stopped", None))


def worker_entry(plan: WorkerPlan, conn: Connection) -> None:
    """Process target: one event loop (uvloop when installed) for all of this worker's peers."""
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


class Sfu:
    """`python -m sfu serve` on free loopback ports, optionally under cProfile."""

    def __init__(self, workdir: Path, profile: Path | None) -> None:
        self.http_port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.config_path = workdir / "sfu.yaml"
        self.log_path = workdir / "sfu.log"
        self.config_path.write_text(
            "dev_mode: true\n"
            "drain_timeout: 1s\n"
            f"http: {{host: 127.0.0.1, port: {self.http_port}}}\n"
            f"rtc: {{bind_host: 127.0.0.1, udp_port: {self.udp_port}}}\n"
            "logging: {level: warning}\n"
        )
        self.profile = profile
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable]
        if self.profile is not None:
            command += ["-m", "cProfile", "-o", str(self.profile)]
        command += ["-m", "sfu", "serve", "--config", str(self.config_path)]
        # The SFU reads SFU_* overrides from the environment; this run must be self-contained.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFU_")}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_ready_blocking(self.process, self.url, 20, self.log_tail)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

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


def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process in clock ticks, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces; the fields after it are fixed.
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def cpu_ticks(pid: int) -> int:
    return sum(cpu_split(pid))


def machine_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of the whole machine, from /proc/stat's "cpu" line."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq, steal


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


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


def plan_workers(args: argparse.Namespace, sfu: Sfu) -> list[WorkerPlan]:
    from sfu.config import load_config
    from sfu.control.auth import mint_token

    config = load_config(sfu.config_path, env={})
    ttl = args.seconds + 600

    def token(identity: str, *, publish: bool) -> str:
        return mint_token(
            config, room=ROOM, identity=identity, publish=publish, subscribe=not publish, ttl=ttl
        )

    pubs = list(range(args.publishers))
    subs = [(s, p) for s in range(args.subscribers) for p in pubs]
    pub_tokens = {p: token(f"pub{p}", publish=True) for p in pubs}
    sub_tokens = {s: token(f"sub{s}", publish=False) for s in range(args.subscribers)}
    if args.procs == 1:
        return [WorkerPlan(sfu.url, pubs, subs, pub_tokens, sub_tokens)]
    # Two processes: the publishers' pacing is never delayed by subscribers' receive bursts.
    return [
        WorkerPlan(sfu.url, pubs, [], pub_tokens, {}),
        WorkerPlan(sfu.url, [], subs, {}, sub_tokens),
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        sfu = Sfu(Path(tmp), args.profile)
        sfu.start()
        # The idle process (timers, loop-lag probe) costs CPU with no traffic at all; measured
        # apart so the per-packet figure can be read with and without it.
        idle0 = cpu_ticks(sfu.pid)
        idle_t0 = time.monotonic()
        time.sleep(args.idle)
        idle_cpu = (cpu_ticks(sfu.pid) - idle0) / CLK_TCK / (time.monotonic() - idle_t0)
        ctx = multiprocessing.get_context("spawn")
        workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        try:
            for plan in plan_workers(args, sfu):
                parent_end, child_end = ctx.Pipe()
                process: multiprocessing.process.BaseProcess = ctx.Process(
                    target=worker_entry, args=(plan, child_end), daemon=True
                )
                process.start()
                workers.append((process, parent_end))
            for _, conn in workers:
                conn.send(("publish",))
            setup_pub = max(_expect(conn, "published", 60)["seconds"] for _, conn in workers)
            for _, conn in workers:
                conn.send(("subscribe",))
            setup_sub = max(_expect(conn, "subscribed", 90)["seconds"] for _, conn in workers)

            start_ns = time.monotonic_ns() + int(args.warmup * 1e9)
            end_ns = start_ns + int(args.seconds * 1e9)
            for _, conn in workers:
                conn.send(("window", start_ns, end_ns, args.grace))
            time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
            # Scrape before reading the CPU at the start and after it at the end, so the
            # scrapes' own CPU stays outside the window.
            metrics0 = sfu.metrics()
            t0 = time.monotonic_ns()
            sfu_user0, sfu_sys0 = cpu_split(sfu.pid)
            perf = start_perf(args.perf, sfu.pid)
            gen_cpu0 = sum(cpu_ticks(p.pid or 0) for p, _ in workers)
            busy0, steal0 = machine_ticks()
            time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
            sfu_user1, sfu_sys1 = cpu_split(sfu.pid)
            gen_cpu1 = sum(cpu_ticks(p.pid or 0) for p, _ in workers)
            busy1, steal1 = machine_ticks()
            t1 = time.monotonic_ns()
            metrics1 = sfu.metrics()
            stop_perf(perf)  # after t1: writing perf's data file is not part of the window
            memory = memory_kb(sfu.pid)
            results = [_expect(conn, "result", args.grace + 30) for _, conn in workers]
            for _, conn in workers:
                conn.send(("stop",))
            for _, conn in workers:
                _expect(conn, "stopped", 30)
        finally:
            for process, _ in workers:
                process.join(5)
                if process.is_alive():
                    process.terminate()
            exit_code = sfu.stop()
        if exit_code not in (0, None):
            print(f"warning: the SFU exited with {exit_code}:\n{sfu.log_tail()}", file=sys.stderr)

    measured = (t1 - t0) / 1e9
    return summarise(
        args,
        results,
        measured=measured,
        sfu_cpu_s=(sfu_user1 - sfu_user0 + sfu_sys1 - sfu_sys0) / CLK_TCK,
        sfu_sys_s=(sfu_sys1 - sfu_sys0) / CLK_TCK,
        sfu_idle_cpu=idle_cpu,
        gen_cpu_s=(gen_cpu1 - gen_cpu0) / CLK_TCK,
        # Whatever else ran on the machine meanwhile (other users' jobs, the kernel's
        # softirqs for loopback), and time the hypervisor took: context for noisy results.
        other_cpu_s=(busy1 - busy0 - (sfu_user1 - sfu_user0 + sfu_sys1 - sfu_sys0)) / CLK_TCK
        - (gen_cpu1 - gen_cpu0) / CLK_TCK,
        steal_s=(steal1 - steal0) / CLK_TCK,
        memory=memory,
        metrics=(metrics0, metrics1),
        setup=(setup_pub, setup_sub),
    )


def summarise(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    *,
    measured: float,
    sfu_cpu_s: float,
    sfu_sys_s: float,
    sfu_idle_cpu: float,
    gen_cpu_s: float,
    other_cpu_s: float,
    steal_s: float,
    memory: dict[str, int],
    metrics: tuple[dict[str, float], dict[str, float]],
    setup: tuple[float, float],
) -> dict[str, Any]:
    seconds = args.seconds
    sent: dict[int, int] = {}
    for r in results:
        for pub, (video, audio) in r["sent"].items():
            sent[int(pub)] = video + audio
    expected = received = 0
    for r in results:
        for _sub, pub, video, audio in r["received"]:
            expected += sent[pub]
            received += video + audio
    intended = args.publishers * PACKETS_PER_SECOND * seconds
    total_sent = sum(sent.values())
    video_lat = sorted(v for r in results for v in array("q", r["video_latency_ns"]))
    audio_lat = sorted(v for r in results for v in array("q", r["audio_latency_ns"]))
    all_lat = sorted(video_lat + audio_lat)
    before, after = metrics
    if FORWARDED_METRIC in before and FORWARDED_METRIC in after:
        forwarded = after[FORWARDED_METRIC] - before[FORWARDED_METRIC]
        forwarded_source = f"SFU counter {FORWARDED_METRIC}"
        forwarded_seconds = measured
    else:
        forwarded = float(received)
        forwarded_source = "packets received by all subscribers (SFU exports no RTP counter)"
        forwarded_seconds = seconds
    sfu_in = None
    if RECEIVED_METRIC in before and RECEIVED_METRIC in after:
        sfu_in = (after[RECEIVED_METRIC] - before[RECEIVED_METRIC]) / measured
    send_rate = total_sent / intended if intended else 0.0
    return {
        "publishers": args.publishers,
        "subscribers": args.subscribers,
        "sessions": args.publishers * (args.subscribers + 1),
        "seconds": seconds,
        "generator_processes": args.procs,
        "forwarded_pps": forwarded / forwarded_seconds,
        "forwarded_source": forwarded_source,
        "sfu_received_pps": sfu_in,
        "sfu_cpu_us_per_packet": sfu_cpu_s * 1e6 / forwarded if forwarded else None,
        "sfu_cpu_us_per_packet_above_idle": (
            (sfu_cpu_s - sfu_idle_cpu * measured) * 1e6 / forwarded if forwarded else None
        ),
        "sfu_cpu_percent": 100 * sfu_cpu_s / measured,
        "sfu_idle_cpu_percent": 100 * sfu_idle_cpu,
        # Kernel time is mostly the sendto/recvfrom system calls (loopback delivery included).
        "sfu_cpu_system_share_percent": 100 * sfu_sys_s / sfu_cpu_s if sfu_cpu_s else None,
        "loss_percent": 100 * (1 - received / expected) if expected else None,
        "packets_expected": expected,
        "packets_received": received,
        "latency_ms": {
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
            "cpu_percent": 100 * gen_cpu_s / measured,
            "pacer_skipped_ticks": sum(r["pacer_skipped"] for r in results),
            "pacer_max_late_ms": max(r["pacer_max_late_ms"] for r in results),
            "read_lag_mean_ms": (
                sum(r["read_lag_sum_ns"] for r in results) / received / 1e6 if received else None
            ),
            "read_lag_max_ms": max(r["read_lag_max_ns"] for r in results) / 1e6,
            "send_errors": sum(r["send_errors"] for r in results),
            "setup_seconds": {"publish": setup[0], "subscribe": setup[1]},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "other_cpu_percent": 100 * max(0.0, other_cpu_s) / measured,
            "steal_percent": 100 * steal_s / measured,
        },
        "checks": {
            "srtp_failures": sum(r["srtp_failures"] for r in results),
            "reordered": sum(r["reordered"] for r in results),
            "unknown_ssrc": sum(r["unknown_ssrc"] for r in results),
            "plis_received": sum(r["plis"] for r in results),
            "keyframes_sent": sum(r["keyframes"] for r in results),
            "consent_checks_sent": sum(r["consent_sent"] for r in results),
            "consent_checks_answered": sum(r["consent_ok"] for r in results),
            "srtp_profiles": sorted({p for r in results for p in r["srtp_profiles"]}),
        },
        "profiled": args.profile is not None,
    }


def table(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    gen = s["generator"]
    us = s["sfu_cpu_us_per_packet"]
    net = s["sfu_cpu_us_per_packet_above_idle"]
    sys_share = s["sfu_cpu_system_share_percent"] or 0.0
    loss = s["loss_percent"]
    rows = [
        ("publishers x subscribers", f"{s['publishers']} x {s['subscribers']}"),
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
        ("added latency p50 / p99", f"{lat['p50']:.2f} / {lat['p99']:.2f} ms"),
        ("  video p50 / p99", f"{lat['video_p50']:.2f} / {lat['video_p99']:.2f} ms"),
        ("  audio p50 / p99", f"{lat['audio_p50']:.2f} / {lat['audio_p99']:.2f} ms"),
        ("  max", f"{lat['max']:.2f} ms"),
        ("SFU RSS", f"{s['rss_mb']:.1f} MB (peak {s['rss_peak_mb']:.1f} MB)"),
        (
            "generator send rate",
            f"{gen['achieved_pps']:,.0f} of {gen['intended_pps']:,.0f} packets/s "
            f"({gen['achieved_percent']:.1f} %)",
        ),
        (
            "generator CPU, read lag mean / max",
            f"{gen['cpu_percent']:.1f} % in {s['generator_processes']} process(es), "
            f"{gen['read_lag_mean_ms']:.2f} / {gen['read_lag_max_ms']:.2f} ms",
        ),
        (
            "rest of the machine",
            f"{s['machine']['other_cpu_percent']:.1f} % CPU (other processes, softirq), "
            f"{s['machine']['steal_percent']:.1f} % steal",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    lines.append(f"forwarded packets counted by: {s['forwarded_source']}")
    return "\n".join(lines)


def start_perf(path: Path | None, pid: int) -> subprocess.Popen[bytes] | None:
    """`perf record` of the SFU for the window: C, libsrtp and kernel time that cProfile
    cannot see (it charges a C call's whole cost, system call included, to its caller)."""
    if path is None:
        return None
    if shutil.which("perf") is None:
        print("warning: --perf given but perf is not installed", file=sys.stderr)
        return None
    command = ["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(path)]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=2.0, help="after all media flows")
    parser.add_argument("--idle", type=float, default=2.0, help="idle SFU CPU sample first")
    parser.add_argument("--grace", type=float, default=0.5, help="receive after the window")
    parser.add_argument("--procs", type=int, choices=(1, 2), default=1, help="client processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--perf", type=Path, help="perf record the SFU during the window into this file"
    )
    parser.add_argument(
        "--profile", type=Path, help="run the SFU under cProfile, write stats here, print top"
    )
    args = parser.parse_args(argv)
    if args.publishers < 1 or args.subscribers < 1 or not 1 <= args.seconds <= 300:
        parser.error("need >= 1 publisher and subscriber and 1-300 seconds")
    if args.procs == 2 and (args.publishers < 1 or args.subscribers < 1):
        parser.error("--procs 2 needs publishers and subscribers")

    summary = run(args)
    print(table(summary))
    gen = summary["generator"]
    if gen["achieved_percent"] < 95:
        print(
            f"WARNING: the generator sent only {gen['achieved_percent']:.1f} % of the intended "
            "packets; results understate the load (try --procs 2)",
            file=sys.stderr,
        )
    if summary["profiled"]:
        print("note: the SFU ran under cProfile; its CPU figures are inflated", file=sys.stderr)
        print_profile(args.profile, 25)
    if args.perf is not None and args.perf.exists():
        print_perf(args.perf)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
