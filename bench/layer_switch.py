"""How fast simulcast reacts, in real Chromium through a real rate-limited link.

    .venv/bin/python bench/layer_switch.py [--runs 5] [--rate 400kbit] [--keyframe-cache on|off]
        [--json out.json]

Needs root: it builds the network of tests/browser/shaping.py (two throwaway namespaces, a
veth pair, a `tc tbf` bucket on the SFU's end) and runs the SFU and every Chromium inside it.
A publisher sends the client's three VP8 layers of a busy 960x540 clip (every layer uses the
bit rate it is allowed), then:

(a) switch down: a subscriber behind the veth decodes the top layer with the link unlimited;
    the bucket is applied (`--rate`), and the script polls the subscriber's getStats every
    100 ms until frameWidth drops below what it was. It also times the way back up after
    the limit is lifted. One sample per run; a run that never switches counts as a miss.
(b) first frame: a new subscriber (a fresh page in an already running browser, unshaped)
    joins the call in progress; the time from the start of its join to its first decoded
    frame of the publisher's video, polled in the page every 20 ms.

Prints median / min / max of each. Before the SFU forwards simulcast, (a) measures nothing
useful (every run is a miss: no layer to drop to) but the script runs to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's tests package is a sibling

from tests.browser.shaping import (  # noqa: E402
    ClientPage,
    Sfu,
    ShapedNetwork,
    unavailable_reason,
    write_busy_clip,
)

CLIP = (960, 540, 15)
POLL = 0.1


async def _width(page: ClientPage, publisher: str) -> int | None:
    video = await page.video_of(publisher)
    return video["frameWidth"] if video and video["framesDecoded"] else None


async def _wait_width(
    page: ClientPage,
    publisher: str,
    want: Any,
    timeout: float,  # noqa: ASYNC109
) -> tuple[float | None, int | None]:
    """Seconds until `want(frameWidth)` holds (polled every POLL), and that width."""
    start = time.monotonic()
    width = None
    while time.monotonic() - start < timeout:
        width = await _width(page, publisher)
        if want(width):
            return time.monotonic() - start, width
        await asyncio.sleep(POLL)
    return None, width


async def switch_down(
    network: ShapedNetwork,
    sub: ClientPage,
    publisher: str,
    rate: str,
    timeout: float,  # noqa: ASYNC109
) -> dict[str, Any]:
    network.lift()
    # Start from the top: the widest the subscriber gets on the open link, held for 2 s.
    _, top = await _wait_width(sub, publisher, lambda w: w == CLIP[0], timeout)
    await asyncio.sleep(2)
    top = await _width(sub, publisher) or top
    network.limit(rate=rate)
    down, narrow = await _wait_width(
        sub, publisher, lambda w: w is not None and top is not None and w < top, timeout
    )
    await asyncio.sleep(2)
    network.lift()
    up, back = await _wait_width(
        sub, publisher, lambda w: w is not None and narrow is not None and w > narrow, timeout
    )
    return {"from": top, "to": narrow, "down_s": down, "back_to": back, "up_s": up}


async def first_frame(
    page: ClientPage, sfu: Sfu, room: str, passphrase: str, publisher: str, index: int
) -> tuple[ClientPage, float | None]:
    page = await page.reopen(sfu)
    token = sfu.token(room, f"joiner-{index}", publish=False)
    _, ms = await asyncio.gather(page.join(token, passphrase), page.first_frame(publisher))
    return page, ms


def summary(values: list[float | None], unit: str = "s") -> str:
    got = [v for v in values if v is not None]
    misses = len(values) - len(got)
    if not got:
        return f"no sample ({misses} misses)"
    text = (
        f"median {statistics.median(got):.2f} {unit}, min {min(got):.2f}, max {max(got):.2f}"
        f" ({len(got)} runs"
    )
    return text + (f", {misses} misses)" if misses else ")")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    workdir = Path(tempfile.mkdtemp(prefix="bf-layer-switch-"))
    clip = write_busy_clip(workdir / "busy.y4m", *CLIP)
    result: dict[str, Any] = {
        "rate": args.rate,
        "keyframe_cache": args.keyframe_cache,
        "switch": [],
        "first_frame_ms": [],
    }
    with ShapedNetwork.create() as network:
        sfu = Sfu(network, {"rtc": {"keyframe_cache": args.keyframe_cache == "on"}})
        playwright = await async_playwright().start()
        pages: list[ClientPage] = []
        try:
            sfu.wait_listening()

            def launch(name: str, namespace: str, video: Path | None = None) -> Any:
                return ClientPage.launch(
                    playwright, network, namespace, workdir / name, name, sfu, video=video
                )

            pub, edge, joiner = await asyncio.gather(
                launch("pub", network.core, clip),
                launch("edge", network.edge),
                launch("joiner", network.core),
            )
            pages += [pub, edge, joiner]
            room = f"bench-{secrets.token_hex(4)}"
            passphrase = secrets.token_urlsafe(16)
            publisher = (
                await pub.join(sfu.token(room, "pub", publish=True), passphrase, publish=True)
            ).id
            await edge.join(sfu.token(room, "edge", publish=False), passphrase)
            for run in range(args.runs):
                sample = await switch_down(network, edge, publisher, args.rate, args.timeout)
                result["switch"].append(sample)
                print(f"switch {run + 1}: {sample}", flush=True)
            for run in range(args.runs):
                joiner, ms = await first_frame(joiner, sfu, room, passphrase, publisher, run)
                pages[-1] = joiner
                result["first_frame_ms"].append(ms)
                print(f"first frame {run + 1}: {ms} ms", flush=True)
            result["layers"] = await pub.outbound()
        finally:
            for page in pages:
                with contextlib.suppress(Exception):
                    await page.close()
            await playwright.stop()
            sfu.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", default="400kbit", help="tc rate of the limit (tbf)")
    parser.add_argument("--timeout", type=float, default=20.0, help="per wait, seconds")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--keyframe-cache",
        choices=("on", "off"),
        default="on",
        help="rtc.keyframe_cache of the SFU: compare time to first frame with and without it",
    )
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    result = asyncio.run(main_async(args))
    print("\nlayers published:", [(e["rid"], e["frameWidth"]) for e in result.get("layers", [])])
    print(f"(a) switch down at {args.rate}:", summary([s["down_s"] for s in result["switch"]]))
    print("    back up after the lift:", summary([s["up_s"] for s in result["switch"]]))
    print("(b) first frame of a new subscriber:", summary(result["first_frame_ms"], "ms"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
