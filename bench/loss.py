"""Random packet loss: an E2EE call through the SFU against the same peers connected directly.

    sudo .venv/bin/python bench/loss.py [--rates 0,3,10,20] [--seconds 12] [--runs 1]
                                        [--paths sfu,relay,p2p] [--json out.json]

Needs root: each call runs in its own throwaway network namespace with only `lo`, where, once
both peers decode audio and video, an iptables rule drops every UDP datagram arriving on `lo`
with the given probability (`-m statistic --mode random`; the kernel here has no netem). TCP,
i.e. the WHIP/WHEP exchanges, is never dropped. Through the SFU a media packet crosses two
lossy hops (publisher to SFU, SFU to subscriber), peer to peer one; on the relay path
(`rtc.workers: 2`, publisher and subscriber on different workers) three, the relay between
the workers being the third. RTCP and the repairs face the loss too. tests/netns/losscall.py
runs each call; tests/netns/test_loss.py asserts the targets at 10 %.

The peers are aiortc 1.16 with the project's SFrame hooks (sfu/client/e2ee.py): 320x240 VP8
at 30 frames/s with enough detail for 2-3 packets a frame, and a 48 kHz Opus tone (one packet
per 20 ms frame). Through the SFU they are sfu.client.whip's publish and subscribe against an
in-process `sfu.app.Server`; peer to peer, the same transceivers, codecs and hooks with the
offer and answer passed directly.

Frames the publisher sent during --seconds of loss are matched by their SFrame counter to
frames the subscriber reassembled and authenticated, i.e. handed to its decoder ("delivered";
the loss stays on for 2 s more so that late repairs face it too). For audio the table also
shows how many of those frames reached the SFU (its tap on the publisher's transport) and the
subscriber's RTP stack ("arrived", before aiortc's jitter buffer). A last table replays random
loss straight into aiortc's audio jitter buffer (no network, no SFU): what the subscriber's
own buffer lets through of what arrives. See docs/performance.md, "Loss".

Each call takes about 20 s; with the defaults (4 rates, 3 paths) the bench stops by itself
after about 4.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's tests package is a sibling

from tests.netns.losscall import (  # noqa: E402
    CallResult,
    KindResult,
    run_in_namespace,
    unavailable_reason,
)

DRAIN = 2.0
CALL_TIMEOUT = 90.0


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f} %" if whole else "    -  "


def summed(results: list[CallResult], kind: str) -> KindResult:
    total = KindResult()
    for result in results:
        one = result.kind(kind)
        total.sent += one.sent
        total.delivered += one.delivered
        total.decoded += one.decoded
        total.at_sfu += one.at_sfu
        total.arrived += one.arrived
    return total


def table(rows: list[tuple[float, str, list[CallResult]]]) -> str:
    head = (
        f"{'loss':>5} {'path':>5} | {'video delivered':>22} {'decoded':>7} | "
        f"{'audio at SFU':>12} {'arrived':>8} {'delivered':>22}"
    )
    lines = [head, "-" * len(head)]
    for loss, mode, results in rows:
        video, audio = summed(results, "video"), summed(results, "audio")
        at_sfu = percent(audio.at_sfu, audio.sent) if mode == "sfu" else "    -  "
        lines.append(
            f"{loss:>5.0%} {mode:>5} | "
            f"{video.delivered:>5}/{video.sent:<5} {percent(video.delivered, video.sent):>10} "
            f"{video.decoded:>7} | {at_sfu:>12} {percent(audio.arrived, audio.sent):>8} "
            f"{audio.delivered:>5}/{audio.sent:<5} {percent(audio.delivered, audio.sent):>10}"
        )
    return "\n".join(lines)


def jitter_buffer_replay(rates: list[float], packets: int = 20000) -> list[tuple[float, float]]:
    """aiortc's audio JitterBuffer (capacity 16, prefetch 4, as RTCRtpReceiver makes it) fed
    one Opus packet per frame with random loss: (arrived, handed on) as fractions of sent."""
    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.rtp import RtpPacket

    out = []
    for rate in rates:
        rng = random.Random(1)
        buffer = JitterBuffer(capacity=16, prefetch=4)
        arrived = handed_on = 0
        for seq in range(packets):
            if rng.random() < rate:
                continue
            arrived += 1
            packet = RtpPacket(sequence_number=seq & 0xFFFF, timestamp=(960 * seq) & 0xFFFFFFFF)
            packet._data = b"\xfc"  # type: ignore[attr-defined]
            _, frame = buffer.add(packet)
            handed_on += frame is not None
        out.append((arrived / packets, handed_on / packets))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0,3,10,20", help="loss in percent, comma-separated")
    parser.add_argument("--seconds", type=float, default=12.0, help="lossy window per call")
    parser.add_argument("--runs", type=int, default=1, help="calls per rate and path, summed")
    parser.add_argument("--json", type=Path, help="write every call's result here")
    parser.add_argument(
        "--paths",
        default="sfu,relay,p2p",
        help="comma-separated: sfu (one media plane), relay (two workers, the media crossing "
        "the relay between them: three lossy hops), p2p",
    )
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    rates = [float(r) / 100 for r in args.rates.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - {"sfu", "relay", "p2p"})
    if unknown or not paths:
        parser.error(f"--paths: expected some of sfu, relay, p2p, got {args.paths!r}")
    rows: list[tuple[float, str, list[CallResult]]] = []
    raw: list[dict[str, Any]] = []
    for loss in rates:
        for mode in paths:
            results = []
            for _ in range(args.runs):
                result = run_in_namespace(mode, loss, args.seconds, DRAIN, CALL_TIMEOUT)
                print(f"{mode} at {loss:.0%}: {result.to_json()}", file=sys.stderr, flush=True)
                results.append(result)
                raw.append(json.loads(result.to_json()))
            rows.append((loss, mode, results))
    print(table(rows))
    print()
    print("aiortc's audio jitter buffer alone, random loss, 20000 packets:")
    print(f"{'loss':>5} | {'arrived':>8} {'handed to decoder':>18}")
    replayed = sorted({*rates, 0.01})  # 1 %: even that is too much for a 95 % target
    for rate, (arrived, handed_on) in zip(replayed, jitter_buffer_replay(replayed), strict=True):
        print(f"{rate:>5.0%} | {100 * arrived:>6.1f} % {100 * handed_on:>16.1f} %")
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
