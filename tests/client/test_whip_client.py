"""WHIP publish and WHEP subscribe against a tiny aiohttp endpoint answering with real aiortc peers.

The endpoint plays the far end of an E2EE call (it holds the key, as another participant
would; the SFU never does): its WHIP peer decrypts and decodes what the client publishes,
its WHEP peer sends protected media the client must decrypt. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aioice.ice
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from av import VideoFrame

from sfu.client import sframe as sf
from sfu.client.e2ee import E2eeConfig, E2eeContext
from sfu.client.whip import WhipError, publish, subscribe
from tests.client.test_e2ee_aiortc import (
    QUADRANTS,
    PatternTrack,
    Peer,
    ToneTrack,
    quadrant_means,
    wait_for,
)

TOKEN = "good-token"
CLIENT_KID = sf.compose_kid(2, 0)
CLIENT_KEY = bytes(range(32, 48))
SERVER_KID = sf.compose_kid(3, 0)
SERVER_KEY = bytes(range(48, 64))
PROBLEM = "application/problem+json"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice drops 127.0.0.1 when gathering; the peers here must use it and nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda *a, **k: ["127.0.0.1"])


@dataclass
class Endpoint:
    """The test WHIP/WHEP server and what it saw."""

    base: str = ""
    offers: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    peers: dict[str, Peer] = field(default_factory=dict)
    contexts: dict[str, E2eeContext] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


def _problem(status: int, code: str, detail: str) -> web.Response:
    body = {
        "type": f"https://example.invalid/problems/{code}",
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "code": code,
    }
    return web.json_response(body, status=status, content_type=PROBLEM)


def make_app(endpoint: Endpoint) -> web.Application:
    async def check(request: web.Request) -> tuple[str | None, web.Response | None]:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return None, _problem(401, "unauthorized", "missing or invalid bearer token")
        if request.content_type != "application/sdp":
            return None, _problem(415, "unsupported_media_type", "expected application/sdp")
        offer = await request.text()
        endpoint.offers.append(offer)
        return offer, None

    async def answer(peer: Peer, offer: str, prepare: Any, kind: str) -> web.Response:
        await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        prepare(peer.pc)
        await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        resource = f"{kind}-{next(endpoint.ids)}"
        endpoint.peers[resource] = peer
        return web.Response(
            status=201,
            body=peer.pc.localDescription.sdp.encode(),
            content_type="application/sdp",
            headers={"Location": f"/resource/{resource}"},
        )

    async def whip(request: web.Request) -> web.Response:
        offer, error = await check(request)
        if error is not None or offer is None:
            return error or web.Response(status=500)
        # The far end of the call: holds the publisher's key, decrypts and decodes.
        context = E2eeContext(E2eeConfig(receive_keys={CLIENT_KID: CLIENT_KEY}))
        peer = Peer()

        def prepare(pc: RTCPeerConnection) -> None:
            for transceiver in pc.getTransceivers():
                context.attach_receiver(transceiver.receiver)

        response = await answer(peer, offer, prepare, "whip")
        endpoint.contexts[response.headers["Location"].rsplit("/", 1)[1]] = context
        return response

    async def whep(request: web.Request) -> web.Response:
        offer, error = await check(request)
        if error is not None or offer is None:
            return error or web.Response(status=500)
        context = E2eeContext(E2eeConfig(send_kid=SERVER_KID, send_key=SERVER_KEY))
        peer = Peer()

        def prepare(pc: RTCPeerConnection) -> None:
            for track in (ToneTrack(), PatternTrack()):
                context.attach_sender(pc.addTrack(track))

        response = await answer(peer, offer, prepare, "whep")
        endpoint.contexts[response.headers["Location"].rsplit("/", 1)[1]] = context
        return response

    async def delete(request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _problem(401, "unauthorized", "missing or invalid bearer token")
        peer = endpoint.peers.pop(resource, None)
        if peer is None:
            return _problem(404, "not_found", "no such session")
        endpoint.deleted.append(resource)
        await peer.close()
        return web.Response(status=200)

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="overloaded, try later")

    async def no_location(request: web.Request) -> web.Response:
        return web.Response(status=201, text="v=0\r\n", content_type="application/sdp")

    app = web.Application()
    app.router.add_post("/whip", whip)
    app.router.add_post("/whep", whep)
    app.router.add_post("/broken", broken)
    app.router.add_post("/no-location", no_location)
    app.router.add_delete("/resource/{resource}", delete)
    return app


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    state = Endpoint()
    runner = web.AppRunner(make_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base = f"http://127.0.0.1:{port}"
    yield state
    for peer in state.peers.values():
        await peer.close()
    await runner.cleanup()


def rtpmap_names(sdp: str) -> set[str]:
    return {
        line.split(" ", 1)[1].split("/")[0]
        for line in sdp.splitlines()
        if line.startswith("a=rtpmap:")
    }


async def test_publish_e2ee_reaches_the_far_end_and_close_deletes(endpoint: Endpoint) -> None:
    publication = await publish(
        f"{endpoint.base}/whip",
        TOKEN,
        [ToneTrack(), PatternTrack()],
        E2eeConfig(send_kid=CLIENT_KID, send_key=CLIENT_KEY),
    )
    resource = publication.resource_url.name
    assert str(publication.resource_url) == f"{endpoint.base}/resource/{resource}"
    far = endpoint.peers[resource]
    try:
        await wait_for(
            lambda: len(far.decoded["audio"]) >= 15 and len(far.decoded["video"]) >= 8, timeout=8
        )
    finally:
        await publication.close()
    assert len(far.decoded["audio"]) >= 15
    assert len(far.decoded["video"]) >= 8
    video = far.decoded["video"][-1]
    assert isinstance(video, VideoFrame)
    for means, want in zip(quadrant_means(video), QUADRANTS, strict=True):
        assert all(abs(g - w) <= 6 for g, w in zip(means, want, strict=True))
    far_counters = endpoint.contexts[resource].counters
    assert far_counters.frames_unprotected >= 20
    assert far_counters.dropped == 0
    assert publication.e2ee is not None
    assert publication.e2ee.counters.frames_protected >= far_counters.frames_unprotected

    # Offered: Opus and VP8 (+ its RTX and feedback) only; ICE complete, no trickle.
    offer = endpoint.offers[-1]
    assert rtpmap_names(offer) == {"opus", "VP8", "rtx"}
    assert " nack pli" in offer
    assert "a=candidate:" in offer
    assert "a=end-of-candidates" in offer
    assert CLIENT_KEY.hex() not in offer.lower()

    assert endpoint.deleted == [resource]
    assert publication.closed
    assert publication.pc.connectionState == "closed"
    await publication.close()  # idempotent: no second DELETE
    assert endpoint.deleted == [resource]


async def test_subscribe_e2ee_decrypts_what_the_far_end_sends(endpoint: Endpoint) -> None:
    seen: list[str] = []
    subscription = await subscribe(
        f"{endpoint.base}/whep",
        TOKEN,
        E2eeConfig(receive_keys={SERVER_KID: SERVER_KEY}),
        on_track=lambda track: seen.append(track.kind),
    )
    decoded: dict[str, int] = {"audio": 0, "video": 0}
    last_video: list[VideoFrame] = []

    async def consume(track: Any) -> None:
        while True:
            frame = await track.recv()
            decoded[track.kind] += 1
            if isinstance(frame, VideoFrame):
                last_video[:] = [frame]

    tasks = [asyncio.ensure_future(consume(t)) for t in subscription.tracks]
    try:
        await wait_for(lambda: decoded["audio"] >= 15 and decoded["video"] >= 8, timeout=8)
    finally:
        await subscription.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(seen) == ["audio", "video"]
    assert decoded["audio"] >= 15
    assert decoded["video"] >= 8
    for means, want in zip(quadrant_means(last_video[0]), QUADRANTS, strict=True):
        assert all(abs(g - w) <= 6 for g, w in zip(means, want, strict=True))
    assert subscription.e2ee is not None
    assert subscription.e2ee.counters.frames_unprotected >= 20
    assert subscription.e2ee.counters.dropped == 0
    offer = endpoint.offers[-1]
    assert offer.count("a=recvonly") == 2
    assert rtpmap_names(offer) == {"opus", "VP8", "rtx"}
    assert len(endpoint.deleted) == 1


async def test_errors_map_to_whip_error(endpoint: Endpoint) -> None:
    with pytest.raises(WhipError) as info:
        await publish(f"{endpoint.base}/whip", "wrong", [ToneTrack()], None)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    assert info.value.detail == "missing or invalid bearer token"
    assert info.value.problem["type"] == "https://example.invalid/problems/unauthorized"
    assert "401 unauthorized" in str(info.value)

    with pytest.raises(WhipError) as info:
        await subscribe(f"{endpoint.base}/whep", "wrong")
    assert (info.value.status, info.value.code) == (401, "unauthorized")

    with pytest.raises(WhipError) as info:
        await subscribe(f"{endpoint.base}/broken", TOKEN)
    assert (info.value.status, info.value.code) == (503, None)
    assert info.value.detail == "overloaded, try later"

    with pytest.raises(WhipError) as info:
        await subscribe(f"{endpoint.base}/no-location", TOKEN)
    assert info.value.code == "missing_location"

    with pytest.raises(ValueError, match="send_kid"):
        await publish(f"{endpoint.base}/whip", TOKEN, [ToneTrack()], E2eeConfig())
    assert endpoint.peers == {}


async def test_a_shared_http_session_is_left_open(endpoint: Endpoint) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(WhipError):
            await subscribe(f"{endpoint.base}/whep", "wrong", session=http)
        assert not http.closed
