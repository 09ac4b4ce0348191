"""Simulcast in real Chromium through a real rate-limited link (issue 11).

One call for the module, all of it in throwaway network namespaces (tests/browser/shaping.py):

- Pub publishes its fake camera as the client's three VP8 layers (q, h, f; scale 4, 2, 1 of a
  960x540 clip, the smallest camera Chromium encodes three layers for) and a microphone;
- Lim subscribes from behind a 400 kbit/s token bucket on the SFU's side of a veth pair;
- Wide subscribes over the SFU namespace's loopback, unshaped;
- Keyless subscribes with another passphrase: it is sent the media but holds no key.

The clip (a scrolling texture with grain) makes every layer use the bit rate the client
allows it (q 150, h 500, f 1500 kbit/s), so only q fits through 400 kbit/s with the audio
and headers. The tests run in order on that call: Lim gets q and decodes without a stall,
Wide gets f, lifting the limit moves Lim up within 10 s, Wide asking for a thumbnail
(`setVideoSize(track, 160, 120)`) gets q, and Keyless decoded nothing throughout.

Layer widths are read from the publisher's own outbound-rtp per rid rather than assumed, so
that an encoder that scaled a layer down (CPU, its bandwidth estimate) does not make the
server look wrong; the setup check still insists on three layers. Every failure prints what
each subscriber's getStats said, the layer the SFU last reported and the token bucket's
counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.browser.shaping import (
    ClientPage,
    Sfu,
    ShapedNetwork,
    unavailable_reason,
    write_busy_clip,
)
from tests.browser.support import require_browser
from tests.conftest import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CLIP = (960, 540, 15)  # width, height, frames/s
RIDS = ["q", "h", "f"]
# How long the SFU may take to settle a subscriber on a layer after joining or a change of
# the link: its estimate needs a few seconds of feedback. Lifting the limit has the issue's
# own bound.
SETTLE = 15.0
LIFT_BOUND = 10.0
THUMBNAIL_BOUND = 10.0
WINDOW = 5.0
# Of the frames the publisher encoded on the low layer during the window, the limited
# subscriber decodes at least this share; and at least MIN_FPS whatever the publisher does.
# With the final SFU code, about one run in five of this test (on 2 cores) had a single
# freeze of 1.2-1.5 s or delivered 79 % (the SFU has no pacer: a packet lost in the link's
# queue is repaired through the same 400 ms queue), hence 0.7. Over 18 later runs the longest
# freeze exceeded 2 s twice (2.02 s, 2.33 s), hence MAX_STALL 2.5 s. The version before probes
# and the layer allocator's hysteresis decoded 0.4-3.6 frames/s with stalls of up to 5 s, and
# fails these bounds by far.
DELIVERED_SHARE = 0.7
MIN_FPS = 0.4 * CLIP[2]
MAX_STALL = 2.5


@dataclass
class SimulcastCall:
    network: ShapedNetwork
    sfu: Sfu
    pub: ClientPage
    lim: ClientPage
    wide: ClientPage
    keyless: ClientPage
    pub_id: str
    camera: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def subscribers(self) -> list[ClientPage]:
        return [self.lim, self.wide, self.keyless]

    async def layers(self) -> list[dict[str, Any]]:
        """The publisher's video encodings now, narrowest first."""
        return await self.pub.outbound()

    async def layer_width(self, rid: str) -> int | None:
        for entry in await self.layers():
            if entry["rid"] == rid:
                return entry["frameWidth"]
        return None

    async def video(self, page: ClientPage) -> dict[str, Any] | None:
        return await page.video_of(self.pub_id)

    async def snapshot(self) -> str:
        """Everything worth reading when an assertion fails."""
        state: dict[str, Any] = {
            "link": self.network.rate or "unlimited",
            "bucket": self.network.qdisc_stats(),
            "publisher": await self.layers(),
        }
        for page in self.subscribers:
            video = await self.video(page)
            layer = await page.layer(video["trackId"]) if video else None
            reports = await page.events("video_layer")
            state[page.name] = {
                "video": video,
                "layer": layer,
                "video_layer events": len(reports),
                "errors": [e for e in await page.events("error")][-5:],
            }
        # What the SFU decided: layer switches, pauses, probe results (server.log).
        state["server"] = [
            line[-160:]
            for line in self.sfu.log().splitlines()
            if "simulcast:" in line or "probe " in line or "bwe:" in line
        ][-60:]
        return json.dumps(state, indent=1, default=str)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def call(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SimulcastCall]:
    require_browser()
    reason = unavailable_reason()
    if reason is not None:
        unavailable(reason)
    from playwright.async_api import async_playwright

    folder = tmp_path_factory.mktemp("simulcast")
    clip = await asyncio.to_thread(write_busy_clip, folder / "busy.y4m", *CLIP)
    with ShapedNetwork.create() as network:
        # Limited from the start: Lim's first layer is already chosen against the slow link.
        network.limit()
        sfu = Sfu(network)
        playwright = None
        pages: list[ClientPage] = []
        try:
            sfu.wait_listening()
            playwright = await async_playwright().start()

            def launch(name: str, namespace: str, video: Path | None = None) -> Any:
                return ClientPage.launch(
                    playwright, network, namespace, folder / name, name, sfu, video=video
                )

            pub, lim, wide, keyless = await asyncio.gather(
                launch("Pub", network.core, clip),
                launch("Lim", network.edge),
                launch("Wide", network.core),
                launch("Keyless", network.core),
            )
            pages += [pub, lim, wide, keyless]
            room = f"simulcast-{secrets.token_hex(4)}"
            passphrase = secrets.token_urlsafe(16)
            joined = await pub.join(sfu.token(room, "pub", publish=True), passphrase, publish=True)
            assert joined.camera is not None
            for page in (lim, wide):
                await page.join(sfu.token(room, page.name.lower(), publish=False), passphrase)
            await keyless.join(sfu.token(room, "keyless", publish=False), secrets.token_urlsafe(16))
            yield SimulcastCall(
                network=network,
                sfu=sfu,
                pub=pub,
                lim=lim,
                wide=wide,
                keyless=keyless,
                pub_id=joined.id,
                camera=joined.camera,
            )
        finally:
            for page in pages:
                with contextlib.suppress(Exception):  # a browser that already died
                    await page.close()
            if playwright is not None:
                await playwright.stop()
            sfu.stop()


async def _until(check: Any, timeout: float, interval: float = 0.1) -> Any:
    """`check()`'s first truthy result, or None after `timeout` (the caller says what failed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            return None
        await asyncio.sleep(interval)


async def _width_reaches(
    call: SimulcastCall, page: ClientPage, want: Any, timeout: float
) -> dict[str, Any] | None:
    """Poll `page`'s video of the publisher until `want(frameWidth, layers)` holds."""

    async def check() -> dict[str, Any] | None:
        video = await call.video(page)
        if video is None or not video["framesDecoded"]:
            return None
        return video if want(video["frameWidth"], await call.layers()) else None

    return await _until(check, timeout)


def _widest(layers: list[dict[str, Any]]) -> int | None:
    widths = [e["frameWidth"] for e in layers if e["frameWidth"]]
    return max(widths) if widths else None


def _narrowest(layers: list[dict[str, Any]]) -> int | None:
    widths = [e["frameWidth"] for e in layers if e["frameWidth"]]
    return min(widths) if widths else None


async def test_publisher_sends_three_layers(call: SimulcastCall) -> None:
    """The premise of the rest: three encodings with the client's rids, each sending."""
    assert call.camera == {"width": CLIP[0], "height": CLIP[1]}, call.camera

    async def three() -> list[dict[str, Any]] | None:
        layers = await call.layers()
        sending = [e for e in layers if e["frameWidth"] and e["framesEncoded"] > 0]
        return layers if sorted(e["rid"] or "" for e in sending) == sorted(RIDS) else None

    layers = await _until(three, SETTLE, interval=0.5)
    assert layers is not None, (
        "the publisher is not sending three simulcast layers (q, h, f); did the SFU accept "
        f"a=simulcast in its answer?\n{await call.snapshot()}"
    )
    assert [e["rid"] for e in layers] == RIDS, layers


async def _frames_encoded(call: SimulcastCall, rid: str) -> int:
    for entry in await call.layers():
        if entry["rid"] == rid:
            return int(entry.get("framesEncoded") or 0)
    return 0


async def test_limited_subscriber_decodes_the_low_layer_continuously(
    call: SimulcastCall,
) -> None:
    settled = await _width_reaches(
        call, call.lim, lambda width, layers: width == _narrowest(layers), SETTLE
    )
    assert settled is not None, (
        f"behind {call.network.rate}, Lim did not decode the lowest layer within {SETTLE}s\n"
        f"{await call.snapshot()}"
    )
    # Frames keep coming on the low layer: sampled every 100 ms, no gap in framesDecoded
    # longer than MAX_STALL, at least DELIVERED_SHARE of the frames the publisher encoded on
    # that layer meanwhile (on this 2-core machine with four Chromiums, the publisher's own
    # frame rate drops under load: measured against it, that is not the SFU's doing) and
    # at least MIN_FPS, all of it at the low width.
    samples: list[tuple[float, int, int | None]] = []
    loop = asyncio.get_running_loop()
    encoded_before = await _frames_encoded(call, "q")
    start = loop.time()
    while loop.time() - start < WINDOW:
        video = await call.video(call.lim)
        assert video is not None
        samples.append((loop.time() - start, video["framesDecoded"], video["frameWidth"]))
        await asyncio.sleep(0.1)
    encoded = await _frames_encoded(call, "q") - encoded_before
    low = await call.layer_width("q")
    frames = samples[-1][1] - samples[0][1]
    fps = frames / (samples[-1][0] - samples[0][0])
    encoded_fps = encoded / (loop.time() - start)
    stall, last_change = 0.0, samples[0][0]
    for (_, before, _), (t, after, _) in itertools.pairwise(samples):
        if after > before:
            last_change = t
        stall = max(stall, t - last_change)
    widths = sorted({w for _, _, w in samples}, key=lambda w: w or 0)
    detail = (
        f"over {WINDOW}s: {frames} frames ({fps:.1f}/s; the publisher encoded "
        f"{encoded_fps:.1f}/s on q), longest stall {stall:.2f}s, widths seen {widths}, q "
        f"layer {low} px wide\n{await call.snapshot()}"
    )
    assert fps >= DELIVERED_SHARE * encoded_fps, detail
    assert fps >= MIN_FPS, detail
    assert stall <= MAX_STALL, detail
    assert widths == [low], detail


async def test_unlimited_subscriber_gets_the_high_layer(call: SimulcastCall) -> None:
    settled = await _width_reaches(
        call, call.wide, lambda width, layers: width == _widest(layers) == CLIP[0], SETTLE
    )
    assert settled is not None, (
        f"Wide (unshaped) did not decode the {CLIP[0]}-wide top layer within {SETTLE}s\n"
        f"{await call.snapshot()}"
    )
    await asyncio.sleep(2)
    video = await call.video(call.wide)
    assert video is not None, await call.snapshot()
    assert video["frameWidth"] == CLIP[0], await call.snapshot()


async def test_lifting_the_limit_moves_the_limited_subscriber_up(call: SimulcastCall) -> None:
    before = await call.video(call.lim)
    assert before is not None, await call.snapshot()
    low = await call.layer_width("q")
    call.network.lift()
    loop = asyncio.get_running_loop()
    lifted = loop.time()
    moved = await _width_reaches(
        call, call.lim, lambda width, layers: width is not None and low is not None and width > low,
        LIFT_BOUND,
    )  # fmt: skip
    took = loop.time() - lifted
    assert moved is not None, (
        f"{LIFT_BOUND}s after the limit was lifted Lim still decodes {before['frameWidth']} px "
        f"wide (q layer: {low})\n{await call.snapshot()}"
    )
    call.notes.append(f"Lim moved up {took:.1f}s after the lift, to {moved['frameWidth']} px")


async def test_a_thumbnail_gets_the_low_layer(call: SimulcastCall) -> None:
    video = await call.video(call.wide)
    assert video is not None, await call.snapshot()
    await call.wide.set_video_size(video["trackId"], 160, 120)
    settled = await _width_reaches(
        call, call.wide, lambda width, layers: width == _narrowest(layers), THUMBNAIL_BOUND
    )
    layer = await call.wide.layer(video["trackId"])
    assert settled is not None, (
        f"after setVideoSize({video['trackId']}, 160, 120) Wide did not decode the lowest "
        f"layer within {THUMBNAIL_BOUND}s (SFU says: {layer})\n{await call.snapshot()}"
    )
    # The SFU says so too, in its video_layer report (the client's videoLayer()).
    assert layer is not None, "the SFU sent Wide no video_layer report"
    assert layer["layer"] is not None, layer
    assert layer["layer"]["rid"] == "q", layer
    assert not layer["paused"], layer


async def test_keyless_subscriber_decodes_nothing(call: SimulcastCall) -> None:
    """E2EE held through every layer switch: Keyless was sent media all along (packets
    arrived) and its decoder got none of it."""
    video = await call.video(call.keyless)
    assert video is not None, await call.snapshot()
    assert video["packetsReceived"] > 50, await call.snapshot()
    assert video["framesDecoded"] == 0, await call.snapshot()
    status = (await call.keyless.peers()).get(call.pub_id, {})
    assert status.get("counts", {}).get("ok", 0) == 0, status
