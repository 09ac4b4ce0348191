"""Churn: does the SFU give back what ended sessions took?

    python bench/churn.py --whip 10000 --rooms 1000 [--consent-timeout 1s] [--json out.json]

Starts `python -m sfu serve` on free loopback ports with a short ICE consent timeout and
generous session limits, then runs rounds. Each round:

- opens `--round` WHIP sessions (a fresh identity and stream name each, a canned offer whose
  ICE never starts), DELETEs every `--delete-every`-th one at once and lets the rest expire
  by consent timeout;
- runs its share of `--rooms` room cycles: two participants join a fresh room over the
  WebSocket room protocol, both publish (canned offer, no ICE: each gets the other's tracks
  as down-tracks), both leave;
- waits until the SFU's count gauges (sessions, transports, rooms, participants, tracks,
  subscriptions) read 0, closes the HTTP connections, and samples the SFU's RSS
  (/proc/PID/status VmRSS), its open fds (/proc/PID/fd) and every `sfu_*` gauge.

The verdict (exit status 0 or 1): final RSS within `--tolerance` (10 %) of the RSS after the
first round, fds back to the count before any churn, every count gauge 0 after every round,
and no request refused. See docs/performance.md ("Churn").

`--diagnose [FRAMES]` runs the same SFU under a wrapper (this file, `--serve-diagnosed`)
that answers SIGUSR1 with a memory report, printed after each round: what the cycle
collector found unreachable since the last round (objects only a full collection frees),
which Python object types grew, and with FRAMES > 0 the allocation sites that grew
(tracemalloc). The wrapper collects garbage at every report, so its RSS column is not the
measurement: run without `--diagnose` for that.

The driver functions (`whip_churn_once`, `room_cycle_once`, `sample`, `ChurnServer`) are
importable for other benches.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import linecache
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import typing
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.loadgen_peer import Ssrcs, build_offer, random_ice  # noqa: E402
from bench.sfu_process import wait_ready_blocking  # noqa: E402
from sfu.config import Config, LimitsConfig, load_config  # noqa: E402
from sfu.control.auth import mint_token  # noqa: E402
from sfu.media.dtls import Fingerprint  # noqa: E402
from sfu.units import parse_duration  # noqa: E402

SDP_HEADERS = {"Content-Type": "application/sdp"}
TOKEN_TTL = 6 * 3600.0
# Gauges that describe the server's state or configuration, not things that churn.
STATE_GAUGES = frozenset(
    {
        "sfu_build_info",
        "sfu_ready",
        "sfu_admitted_sessions_limit",
        "sfu_media_fastpath_enabled",
        "sfu_media_workers",
        "sfu_media_worker_info",
    }
)
GENEROUS = 1_000_000


class ChurnError(Exception):
    """The SFU refused or failed a step that churn needs to succeed."""


# -- the SFU process ---------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generous_limits() -> dict[str, Any]:
    """Every session-count or creation-rate limit in `LimitsConfig`, set far above churn.

    Found by name rather than listed, so limits added to the config later (per identity,
    room or address; token buckets) do not refuse the churn and make it measure refusals.
    Sizes of messages and SDP keep their defaults: churn sends small ones.
    """
    out: dict[str, Any] = {}
    for name, info in LimitsConfig.model_fields.items():
        if any(word in name for word in ("bytes", "timeout")):
            continue
        annotation = typing.get_origin(info.annotation) or info.annotation
        if annotation in (int, float) or "Int" in str(info.annotation):
            out[name] = GENEROUS
    return out


def churn_config(http_port: int, udp_port: int, consent_timeout: str) -> dict[str, Any]:
    return {
        "dev_mode": True,
        "drain_timeout": "1s",
        "http": {"host": "127.0.0.1", "port": http_port},
        "rtc": {"bind_host": "127.0.0.1", "udp_port": udp_port, "consent_timeout": consent_timeout},
        "logging": {"level": "warning"},
        "limits": generous_limits(),
    }


class ChurnServer:
    """`python -m sfu serve` on free loopback ports with the churn config."""

    def __init__(
        self,
        workdir: Path,
        *,
        consent_timeout: str = "1s",
        env: dict[str, str] | None = None,
        diagnose: int | None = None,
    ) -> None:
        self.http_port = free_port()
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.workdir = workdir
        self.config_path = workdir / "sfu.yaml"
        self.log_path = workdir / "sfu.log"
        self.config_path.write_text(
            yaml.safe_dump(churn_config(self.http_port, self.udp_port, consent_timeout))
        )
        # The same file the server reads: tokens are signed with its (dev) key.
        self.config: Config = load_config(str(self.config_path), env={})
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._extra_env = env or {}
        self.diagnose = diagnose
        self.report_path = workdir / "memory-report.txt"
        self._report_offset = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        # SFU_* variables are config overrides: this run must be exactly the file above.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFU_")}
        env.update(self._extra_env)
        command = [sys.executable, "-m", "sfu", "serve", "--config", str(self.config_path)]
        if self.diagnose is not None:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-diagnosed",
                str(self.config_path),
                str(self.report_path),
                str(self.diagnose),
            ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_ready_blocking(self.process, self.url, timeout, self.log_tail, ChurnError)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ChurnError("the SFU is not running")
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
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

    async def memory_report(self, within: float = 60.0) -> str:
        """Ask a `diagnose` server for its memory report (SIGUSR1) and return it."""
        self.signal(signal.SIGUSR1)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            text = self.report_path.read_text() if self.report_path.exists() else ""
            end = text.find(REPORT_END, self._report_offset)
            if end >= 0:
                report = text[self._report_offset : end]
                self._report_offset = end + len(REPORT_END)
                return report
        return "(no memory report)\n"

    def token(self, room: str, identity: str, *, publish: bool, subscribe: bool) -> str:
        return mint_token(
            self.config,
            room=room,
            identity=identity,
            publish=publish,
            subscribe=subscribe,
            ttl=TOKEN_TTL,
        )


# -- one cycle ---------------------------------------------------------------------------------


def canned_offer() -> str:
    """A publisher offer (VP8+RTX, Opus) with fresh ICE credentials and a made-up DTLS
    fingerprint: enough for the SFU to answer, never enough to connect."""
    return build_offer(
        send=True,
        ufrag=random_ice(8),
        pwd=random_ice(24),
        fingerprint=Fingerprint("sha-256", secrets.token_bytes(32).hex(":")),
        ssrcs=Ssrcs.random(),
    )


async def whip_churn_once(
    http: aiohttp.ClientSession,
    base_url: str,
    token: str,
    *,
    room: str,
    stream: str,
    delete: bool = False,
) -> str:
    """Open one WHIP session that will never start ICE; DELETE it at once if `delete`.
    Returns its Location. ChurnError if the SFU does not answer 201 (and 200 to DELETE)."""
    auth = {"Authorization": f"Bearer {token}"}
    async with http.post(
        f"{base_url}/whip/{room}/{stream}", data=canned_offer(), headers={**SDP_HEADERS, **auth}
    ) as response:
        body = await response.text()
        if response.status != 201:
            raise ChurnError(f"POST /whip/{room}/{stream}: {response.status} {body[:200]}")
        location = response.headers["Location"]
    if delete:
        async with http.delete(f"{base_url}{location}", headers=auth) as response:
            if response.status != 200:
                raise ChurnError(f"DELETE {location}: {response.status}")
    return location


async def _receive_until(ws: aiohttp.ClientWebSocketResponse, wanted: str) -> dict[str, Any]:
    """Skip room events until a message of type `wanted`; ChurnError on an error message."""
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ChurnError(f"socket ended while waiting for {wanted}: {msg.type.name}")
        data: dict[str, Any] = json.loads(msg.data)
        if data.get("type") == wanted:
            return data
        if data.get("type") == "error":
            raise ChurnError(f"waiting for {wanted}: {data.get('code')}: {data.get('message')}")


async def room_cycle_once(
    http: aiohttp.ClientSession, base_url: str, tokens: Sequence[str]
) -> None:
    """One room's life: every token's participant joins (in order), publishes a canned
    offer and leaves. With two or more tokens for one room each participant also gets the
    others' tracks as down-tracks. The room is empty afterwards."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    try:
        for token in tokens:
            ws = await http.ws_connect(f"{base_url}/rtc")
            sockets.append(ws)
            await ws.send_json({"type": "join", "version": 1, "token": token})
            await _receive_until(ws, "joined")
        for ws in sockets:
            await ws.send_json({"type": "publish_offer", "sdp": canned_offer()})
            await _receive_until(ws, "publish_answer")
        for ws in sockets:
            await ws.send_json({"type": "leave"})
            # The server closes the socket once it has handled the leave.
            while (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
                pass
    finally:
        for ws in sockets:
            await ws.close()


# -- sampling ----------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ChurnError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def parse_gauges(text: str) -> dict[str, float]:
    """Every `sfu_*` gauge, summed over its label sets (e.g. sfu_transports by state)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "gauge" or not family.name.startswith("sfu_"):
            continue
        if family.name.endswith("_created"):
            continue  # a counter's creation timestamp, exposed as a gauge
        out[family.name] = sum(s.value for s in family.samples)
    return out


def fetch_gauges(base_url: str) -> dict[str, float]:
    # A one-off connection (closed on return), so scraping holds no fd in the server.
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        return parse_gauges(response.read().decode())


def busy_gauges(gauges: dict[str, float]) -> dict[str, float]:
    """The count gauges that are not 0."""
    return {k: v for k, v in gauges.items() if k not in STATE_GAUGES and v}


@dataclass
class Sample:
    whip_cycles: int
    room_cycles: int
    rss_kb: int
    fds: int
    gauges: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def sample(pid: int, base_url: str, whip_cycles: int, room_cycles: int) -> Sample:
    return Sample(whip_cycles, room_cycles, rss_kb(pid), fd_count(pid), fetch_gauges(base_url))


async def wait_idle(base_url: str, within: float) -> dict[str, float]:
    """Poll /metrics until every count gauge reads 0, or `within` seconds pass; the last read."""
    deadline = time.monotonic() + within
    while True:
        gauges = await asyncio.to_thread(fetch_gauges, base_url)
        if not busy_gauges(gauges) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.2)


async def wait_fds(pid: int, baseline: int, within: float) -> int:
    """The server closes a keep-alive socket a little after the client does."""
    deadline = time.monotonic() + within
    while True:
        count = fd_count(pid)
        if count <= baseline or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Plan:
    whip: int = 10_000
    rooms: int = 1_000
    round: int = 1_000
    concurrency: int = 16
    delete_every: int = 10
    participants: int = 2

    @property
    def rounds(self) -> int:
        return max(1, math.ceil(self.whip / self.round))


async def run_round(server: ChurnServer, plan: Plan, index: int, whip_done: int) -> int:
    """One round's WHIP and room cycles; returns how many WHIP cycles it ran."""
    count = min(plan.round, plan.whip - whip_done)
    room_from = plan.rooms * index // plan.rounds
    room_to = plan.rooms * (index + 1) // plan.rounds
    gate = asyncio.Semaphore(plan.concurrency)
    # No pool limit: a room cycle holds one socket per participant, and a pool smaller than
    # the gate's cycles times their sockets would deadlock; the gate bounds what is in flight.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def whip(i: int) -> None:
            room, identity = f"w{i // 10}", f"pub{i}"
            token = server.token(room, identity, publish=True, subscribe=False)
            async with gate:
                await whip_churn_once(
                    http,
                    server.url,
                    token,
                    room=room,
                    stream=f"s{i}",
                    delete=plan.delete_every > 0 and i % plan.delete_every == 0,
                )

        async def cycle(j: int) -> None:
            room = f"r{j}"
            tokens = [
                server.token(room, f"p{j}-{k}", publish=True, subscribe=True)
                for k in range(plan.participants)
            ]
            async with gate:
                await room_cycle_once(http, server.url, tokens)

        await asyncio.gather(
            *(whip(whip_done + i) for i in range(count)),
            *(cycle(j) for j in range(room_from, room_to)),
        )
    return count


async def run(server: ChurnServer, plan: Plan, out: Any = sys.stdout) -> list[Sample]:
    """Baseline, then one sample after each round (index 0 is the baseline)."""
    consent = server.config.rtc.consent_timeout
    # The readiness probe's connection may still be open on the server's side.
    await asyncio.sleep(0.5)
    baseline = sample(server.pid, server.url, 0, 0)
    samples = [baseline]
    _print_header(out)
    _print_row(out, baseline)
    whip_done = room_done = 0
    for index in range(plan.rounds):
        started = time.monotonic()
        whip_done += await run_round(server, plan, index, whip_done)
        room_done = plan.rooms * (index + 1) // plan.rounds
        # Expiry takes the consent timeout plus one media-timer tick; the rest is slack
        # for a loaded machine.
        await wait_idle(server.url, consent + 15)
        await wait_fds(server.pid, baseline.fds, 5)
        row = sample(server.pid, server.url, whip_done, room_done)
        row.seconds = time.monotonic() - started
        samples.append(row)
        _print_row(out, row)
        if server.diagnose is not None:
            print(await server.memory_report(), file=out, flush=True)
    return samples


def verdict(samples: list[Sample], tolerance: float) -> list[str]:
    """What misses the target (empty: met)."""
    if len(samples) < 2:
        return ["no round ran"]
    baseline, first, last = samples[0], samples[1], samples[-1]
    failures = []
    limit = first.rss_kb * (1 + tolerance)
    if last.rss_kb > limit:
        failures.append(
            f"RSS {last.rss_kb} kB after all rounds > {limit:.0f} kB "
            f"({first.rss_kb} kB after the first round + {tolerance:.0%})"
        )
    if last.fds != baseline.fds:
        failures.append(f"{last.fds} fds after all rounds, {baseline.fds} before churn")
    for row in samples[1:]:
        busy = busy_gauges(row.gauges)
        if busy:
            failures.append(f"gauges not 0 after {row.whip_cycles} WHIP cycles: {busy}")
    return failures


def _print_header(out: Any) -> None:
    print(
        f"{'whip':>7} {'rooms':>6} {'RSS MiB':>8} {'Δ first':>8} {'fds':>4} "
        f"{'secs':>6}  gauges not 0",
        file=out,
    )


_first_rss: list[int] = []


def _print_row(out: Any, row: Sample) -> None:
    if row.whip_cycles and not _first_rss:
        _first_rss.append(row.rss_kb)
    delta = f"{(row.rss_kb / _first_rss[0] - 1):+.1%}" if _first_rss else "-"
    busy = busy_gauges(row.gauges)
    print(
        f"{row.whip_cycles:>7} {row.room_cycles:>6} {row.rss_kb / 1024:>8.1f} {delta:>8} "
        f"{row.fds:>4} {row.seconds:>6.1f}  {busy or '-'}",
        file=out,
        flush=True,
    )


# -- the diagnosed server ----------------------------------------------------------------------

REPORT_END = "-- end of report --\n"


class MemoryReporter:
    """What a running SFU holds that it should not, compared with the previous report."""

    def __init__(self, path: Path, frames: int) -> None:
        self.path = path
        self.frames = frames
        self._types: collections.Counter[str] = collections.Counter()
        self._snapshot: tracemalloc.Snapshot | None = None
        self._mallinfo = _mallinfo2()
        if frames > 0:
            tracemalloc.start(frames)

    def report(self) -> None:
        lines = [f"memory report, RSS {rss_kb(os.getpid())} kB"]
        if self._mallinfo is not None:
            # glibc's heap: what is in use against what it holds, which RSS follows.
            info = self._mallinfo()
            lines[0] += (
                f"; malloc {info.uordblks // 1024} kB in use, {info.fordblks // 1024} kB "
                f"free, {(info.arena + info.hblkhd) // 1024} kB held"
            )
        # Garbage kept for inspection: what reference counting could not free by itself.
        gc.set_debug(gc.DEBUG_SAVEALL)
        unreachable = gc.collect()
        gc.set_debug(0)
        garbage = collections.Counter(_type_name(thing) for thing in gc.garbage)
        gc.garbage.clear()
        gc.collect()
        lines.append(f"  unreachable since the last report (cycles): {unreachable}")
        lines += [f"    {count:7d} {name}" for name, count in garbage.most_common(12)]
        types = collections.Counter(_type_name(thing) for thing in gc.get_objects())
        if self._types:
            grown = (types - self._types).most_common(12)
            lines.append("  object types that grew:" + ("" if grown else " none"))
            lines += [f"    {count:+7d} {name}" for name, count in grown]
        self._types = types
        if self.frames > 0:
            # Not the report's own work: its snapshots and the source lines it formats.
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [
                    tracemalloc.Filter(False, tracemalloc.__file__),
                    tracemalloc.Filter(False, linecache.__file__),
                ]
            )
            if self._snapshot is not None:
                lines.append("  allocation sites that grew:")
                for stat in snapshot.compare_to(self._snapshot, "traceback")[:8]:
                    lines.append(f"    {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d}")
                    lines += [f"        {line}" for line in stat.traceback.format()[-8:]]
            self._snapshot = snapshot
        with self.path.open("a") as out:
            out.write("\n".join(lines) + "\n" + REPORT_END)


_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _MallInfo2(ctypes.Structure):
    _fields_: typing.ClassVar[list[tuple[str, type[ctypes.c_size_t]]]] = [
        (name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS.split()
    ]


def _mallinfo2() -> typing.Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc, or older than 2.33
    function.restype = _MallInfo2
    return typing.cast(typing.Callable[[], _MallInfo2], function)


def _type_name(thing: object) -> str:
    kind = type(thing)
    return f"{kind.__module__}.{kind.__qualname__}"


def serve_diagnosed(config_path: str, report_path: str, frames: int) -> int:
    """`sfu serve` (same config, logging and event loop), plus SIGUSR1 -> memory report."""
    from sfu.app import serve
    from sfu.logs import setup_logging

    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.json_lines)
    reporter = MemoryReporter(Path(report_path), frames)

    async def main() -> int:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, reporter.report)
        return await serve(config, "uvloop")

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--whip", type=int, default=10_000, help="WHIP create/expire cycles")
    parser.add_argument("--rooms", type=int, default=1_000, help="room join/publish/leave cycles")
    parser.add_argument("--round", type=int, default=1_000, help="WHIP cycles per sample")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--delete-every", type=int, default=10, help="DELETE every Nth WHIP session (0: none)"
    )
    parser.add_argument("--participants", type=int, default=2, help="participants per room")
    parser.add_argument("--consent-timeout", default="1s", help="rtc.consent_timeout")
    parser.add_argument("--tolerance", type=float, default=0.10, help="RSS growth allowed")
    parser.add_argument("--json", type=Path, help="write the samples here")
    parser.add_argument(
        "--diagnose",
        type=int,
        nargs="?",
        const=0,
        metavar="FRAMES",
        help="print the server's memory report after each round (FRAMES: tracemalloc depth)",
    )
    parser.add_argument("--serve-diagnosed", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_diagnosed:
        config_path, report_path, frames = args.serve_diagnosed
        return serve_diagnosed(config_path, report_path, int(frames))
    parse_duration(args.consent_timeout)  # fail early on a typo
    plan = Plan(
        whip=args.whip,
        rooms=args.rooms,
        round=args.round,
        concurrency=args.concurrency,
        delete_every=args.delete_every,
        participants=args.participants,
    )
    with tempfile.TemporaryDirectory(prefix="sfu-churn-") as workdir:
        server = ChurnServer(
            Path(workdir), consent_timeout=args.consent_timeout, diagnose=args.diagnose
        )
        server.start()
        try:
            samples = asyncio.run(run(server, plan))
        except ChurnError as exc:
            print(f"churn failed: {exc}\n{server.log_tail()}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    failures = verdict(samples, args.tolerance)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"samples": [asdict(s) for s in samples], "failures": failures}, indent=1)
        )
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("PASS: RSS, fds and gauges within the target")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
