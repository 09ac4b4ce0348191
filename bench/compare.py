"""Blindfold against Janus on the same load, in one invocation.

    python bench/compare.py                       # 3 publishers x 20 subscribers, 20 s each
    python bench/compare.py --json compare.json --seconds 10
    python bench/compare.py --capacity --step 20  # the capacity search on both servers

Runs bench/loadgen.py's load -- P publishers of pre-encrypted, SFrame-shaped VP8 (~1 Mbit/s)
and Opus, each of S subscribers on every stream, one PeerConnection per subscription -- first
against Blindfold (`python -m sfu serve`, WHIP/WHEP) and then against Janus (the Debian
package's 1.1.x, VideoRoom plugin, a room created with `require_e2ee: true`, every publisher's
jsep carrying `"e2ee": true`; the HTTP/JSON API for signaling). For each it prints server CPU
per packet the subscribers received (utime + stime of the server process from /proc over the
window: every thread, kernel time included), packets/s, loss, latency and the generator's and
the rest of the machine's CPU, then the ratio Janus µs / Blindfold µs. For Blindfold the CPU
per packet of its own forwarded-packet counter is printed too.

Janus never offers a loopback address as an ICE candidate. So the bench enters a network
namespace of its own first (unshare(CLONE_NEWNET), which needs root), moves 127.0.0.1/8 from
`lo` onto one end of a veth pair there and tells Janus to gather on that interface
(`ice_enforce_list`). Both servers and the generator run in that namespace, so both get the
same loopback path; the namespace goes away with the bench's processes. Janus is installed
with apt-get when missing (before entering the namespace, which has no route out).

Janus is a full ICE agent: it checks our candidate itself, and it is the controlling side
toward subscribers (it makes their offers); bench/loadgen_peer.py answers its checks.
A figure counts only when the loss is about 0 (< --max-loss %); the bench warns otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.janus_server import JanusProcess, JanusUnavailable, ensure_installed  # noqa: E402
from bench.loadgen import (  # noqa: E402
    Sfu,
    add_load_arguments,
    capacity_on,
    capacity_report,
    check_load_arguments,
    free_port,
    measure_once,
    parse_settings,
    pin,
    table,
    warnings_for,
)

CLONE_NEWNET = 0x40000000
IFACE, PEER_IFACE = "bfbench0", "bfbench1"
SERVERS = ("blindfold", "janus")


def enter_namespace() -> None:
    """This process (and every child it starts from now on) in a fresh network namespace,
    with 127.0.0.1/8 on a veth interface instead of `lo`, so Janus will offer it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise SystemExit(
            f"compare.py: unshare(CLONE_NEWNET) failed ({os.strerror(errno)}); "
            "it needs root (CAP_SYS_ADMIN)"
        )
    ip = shutil.which("ip") or "/usr/sbin/ip"
    for command in (
        "link set lo up",
        "addr del 127.0.0.1/8 dev lo",
        f"link add {IFACE} type veth peer name {PEER_IFACE}",
        f"addr add 127.0.0.1/8 dev {IFACE}",
        f"link set {IFACE} up",
        f"link set {PEER_IFACE} up",
    ):
        result = subprocess.run([ip, *command.split()], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"compare.py: ip {command}: {result.stderr.strip()}")


def start_server(name: str, args: argparse.Namespace, workdir: Path) -> Any:
    server: Any
    if name == "blindfold":
        (workdir / "blindfold").mkdir()
        server = Sfu(workdir / "blindfold", None, args.sfu_root, parse_settings(args.sfu_set))
    else:
        server = JanusProcess(workdir, http_port=free_port(socket.SOCK_STREAM), interface=IFACE)
    server.start()
    if args.pin:
        pin(server.pid, {0})
    return server


def run_server(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = start_server(name, args, workdir)
    try:
        if args.capacity:
            return capacity_on(args, server)
        return measure_once(args, server)
    finally:
        code = server.stop()
        if code not in (0, None):
            print(f"warning: {name} exited with {code}:\n{server.log_tail()}", file=sys.stderr)


def _us(s: dict[str, Any], key: str) -> str:
    value = s.get(key)
    return "n/a" if value is None else f"{value:.1f} µs"


def comparison(results: dict[str, dict[str, Any]]) -> str:
    names = [n for n in SERVERS if n in results]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, render: Any) -> None:
        rows.append((label, [render(results[n]) for n in names]))

    row("server CPU per packet received", lambda s: _us(s, "sfu_cpu_us_per_received_packet"))
    row(
        "server CPU per forwarded packet (own counter)",
        lambda s: (
            _us(s, "sfu_cpu_us_per_packet")
            if s["forwarded_source"].startswith("SFU counter")
            else "n/a"
        ),
    )
    row("packets received by subscribers/s", lambda s: f"{s['received_pps']:,.0f}")
    row(
        "server CPU",
        lambda s: (
            f"{s['sfu_cpu_percent']:.1f} % of a core "
            f"({s['sfu_cpu_system_share_percent'] or 0:.0f} % kernel)"
        ),
    )
    row(
        "loss",
        lambda s: (
            "n/a"
            if s["loss_percent"] is None
            else f"{s['loss_percent']:.3f} % ({s['packets_expected'] - s['packets_received']:,}"
            f" of {s['packets_expected']:,})"
        ),
    )
    row(
        "latency p50 / p99",
        lambda s: f"{s['latency_ms']['p50']:.2f} / {s['latency_ms']['p99']:.2f} ms",
    )
    row("RSS", lambda s: f"{s['rss_mb']:.0f} MB")
    row("SRTP profile", lambda s: ",".join(s["checks"]["srtp_profiles"]))
    row(
        "generator: sent, CPU (busiest process)",
        lambda s: (
            f"{s['generator']['achieved_percent']:.1f} %, {s['generator']['cpu_percent']:.0f}"
            f" % ({s['generator']['max_process_cpu_percent']:.0f} %)"
        ),
    )
    row(
        "rest of the machine",
        lambda s: (
            f"{s['machine']['other_cpu_percent']:.0f} % CPU, "
            f"{s['machine']['steal_percent']:.1f} % steal"
        ),
    )
    width = max(len(label) for label, _ in rows)
    widths = [max(len(n), *(len(values[i]) for _, values in rows)) for i, n in enumerate(names)]
    head = " | ".join(f"{n:<{w}}" for n, w in zip(names, widths, strict=True))
    lines = [f"| {'':<{width}} | {head} |"]
    lines.append("|" + "-" * (width + 2) + "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for label, values in rows:
        cells = " | ".join(f"{v:<{w}}" for v, w in zip(values, widths, strict=True))
        lines.append(f"| {label:<{width}} | {cells} |")
    return "\n".join(lines)


def ratio(results: dict[str, dict[str, Any]], max_loss: float) -> tuple[float | None, bool]:
    """(Janus µs / Blindfold µs per received packet, whether both runs count)."""
    if "janus" not in results or "blindfold" not in results:
        return None, False
    janus = results["janus"]["sfu_cpu_us_per_received_packet"]
    blindfold = results["blindfold"]["sfu_cpu_us_per_received_packet"]
    if not janus or not blindfold:
        return None, False
    valid = all(
        r["loss_percent"] is not None and r["loss_percent"] < max_loss for r in results.values()
    )
    return janus / blindfold, valid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, publishers=3, subscribers=20)
    parser.add_argument(
        "--servers",
        default="blindfold,janus",
        help="which servers, in this order (default: blindfold,janus)",
    )
    parser.add_argument("--sfu-root", type=Path, help="run Blindfold from this source tree")
    parser.add_argument(
        "--sfu-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Blindfold config override (e.g. rtc.fastpath=off); repeatable",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="fail instead of apt-get installing janus"
    )
    parser.add_argument("--max-loss", type=float, default=0.1, help="percent; also capacity's")
    parser.add_argument("--keep-logs", type=Path, help="copy the servers' logs to this folder")
    capacity = parser.add_argument_group("capacity mode (as bench/loadgen.py --capacity)")
    capacity.add_argument("--capacity", action="store_true")
    capacity.add_argument("--step", type=int, default=20)
    capacity.add_argument("--max-subscribers", type=int, default=400)
    capacity.add_argument("--max-cpu", type=float, default=95.0)
    capacity.add_argument("--max-p99-ms", type=float, default=50.0)
    capacity.add_argument("--max-minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or any(s not in SERVERS for s in servers):
        parser.error(f"--servers takes {', '.join(SERVERS)}")
    if args.capacity:
        args.count_only = True
        if args.seconds > 20:
            parser.error("--capacity: keep --seconds (per step) at 20 or less")
    if os.geteuid() != 0:
        parser.error("needs root: it runs the servers in a network namespace of its own")

    janus_version = None
    if "janus" in servers:
        try:
            binary, _lib = ensure_installed(install=not args.no_install)
        except JanusUnavailable as exc:
            print(f"compare.py: {exc}", file=sys.stderr)
            return 2
        from bench.janus_server import janus_version as version_of

        janus_version = version_of(binary)
    enter_namespace()

    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        try:
            for name in servers:
                print(f"== {name} ==", flush=True)
                results[name] = run_server(name, args, Path(tmp))
                if args.capacity:
                    print(capacity_report(results[name]), flush=True)
                else:
                    print(table(results[name]), flush=True)
        finally:
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).rglob("*.log"):
                    with contextlib.suppress(OSError):
                        shutil.copy(log, args.keep_logs / log.name)

    output: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "load": {
            "publishers": args.publishers,
            "subscribers": args.subscribers,
            "seconds": args.seconds,
            "video_kbps": args.video_kbps,
            "generator_processes": args.procs,
            "receivers": "counting" if args.count_only else "decrypting",
        },
        "janus_version": janus_version,
        "results": results,
    }
    print()
    if args.capacity:
        for name, c in results.items():
            best = c["best"]
            figure = "no passing step" if best is None else f"{best['forwarded_pps']:,.0f}/s"
            print(f"{name}: capacity {figure} (stopped: {c['stop_reason']})")
        best_pps = {
            n: c["best"]["forwarded_pps"] for n, c in results.items() if c["best"] is not None
        }
        if len(best_pps) == 2:
            output["capacity_ratio_blindfold_over_janus"] = (
                best_pps["blindfold"] / best_pps["janus"]
            )
    else:
        print(comparison(results))
        value, valid = ratio(results, args.max_loss)
        output["ratio_janus_over_blindfold"] = value
        output["ratio_counts"] = valid
        if value is not None:
            print(
                f"\nratio Janus µs / Blindfold µs per packet received: {value:.2f}"
                + ("" if valid else "  (NOT VALID: loss above --max-loss on a server)")
            )
        for name, s in results.items():
            for warning in warnings_for(s, args.max_loss):
                print(f"WARNING ({name}): {warning}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(output, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("compare.py: interrupted", file=sys.stderr)
        sys.exit(130)
