"""WHIP/WHEP over HTTP: status codes, headers and problem+json for every documented case."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from sfu.app import Server
from tests.media.harness import (
    SDP,
    ColourTrack,
    bearer,
    make_config,
    post_offer,
    publish,
    subscribe,
    token,
)


async def offer_sdp(kinds: tuple[str, ...] = ("video", "audio"), send: bool = True) -> str:
    pc = RTCPeerConnection()
    for kind in kinds:
        if send and kind == "video":
            pc.addTransceiver(ColourTrack(), direction="sendonly")
        else:
            pc.addTransceiver(kind, direction="sendonly" if send else "recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def problem(body: str) -> dict[str, object]:
    data = json.loads(body)
    assert data["type"] == f"urn:blindfold:problem:{data['code']}"
    return data


async def test_whip_201_with_location_etag_and_answer(sfu: Server) -> None:
    sdp = await offer_sdp()
    status, headers, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", sdp, {**SDP, **bearer(token(sfu, publish=True))}
    )
    assert status == 201, body
    assert headers["Content-Type"].startswith("application/sdp")
    assert headers["Location"].startswith("/whip/room1/cam/")
    assert headers["ETag"].startswith('"')
    assert headers["Accept-Patch"] == "application/trickle-ice-sdpfrag"
    assert "a=ice-lite" in body
    assert "a=setup:passive" in body
    assert "a=recvonly" in body
    assert "a=group:BUNDLE" in body
    assert f"a=fingerprint:{sfu.engine.fingerprint}" in body
    assert f"127.0.0.1 {sfu.config.rtc.udp_port} typ host" in body


async def test_ice_servers_in_link_headers() -> None:
    config = make_config(
        SFU_RTC__ICE_SERVERS="[{urls: ['stun:stun.example.net:3478']}, "
        "{urls: ['turn:turn.example.net:3478?transport=udp'], username: u1, credential: p1}]"
    )
    server = Server(config)
    await server.start()
    try:
        sdp = await offer_sdp()
        status, _, body, raw = await post_offer(
            f"{server.url}/whip/room1/cam", sdp, {**SDP, **bearer(token(server, publish=True))}
        )
        assert status == 201, body
        links = raw.getall("Link")
        assert '<stun:stun.example.net:3478>; rel="ice-server"' in links
        assert (
            '<turn:turn.example.net:3478?transport=udp>; rel="ice-server"; username="u1"; '
            'credential="p1"; credential-type="password"' in links
        )
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_token"),
        ({"Authorization": "Bearer not-a-jwt"}, 401, "invalid_token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "missing_token"),
    ],
)
async def test_whip_authentication_errors(
    sfu: Server, headers: dict[str, str], status: int, code: str
) -> None:
    got, response_headers, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", await offer_sdp(), {**SDP, **headers}
    )
    assert (got, problem(body)["code"]) == (status, code)
    assert response_headers["Content-Type"] == "application/problem+json"
    assert response_headers["WWW-Authenticate"] == "Bearer"


async def test_expired_token_is_401(sfu: Server) -> None:
    from sfu.control.auth import mint_token

    old = mint_token(
        sfu.config, room="room1", identity="a", publish=True, subscribe=False, ttl=1, now=1000
    )
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", await offer_sdp(), {**SDP, **bearer(old)}
    )
    assert (status, problem(body)["code"]) == (401, "token_expired")


async def test_wrong_room_and_wrong_grant_are_403(sfu: Server) -> None:
    sdp = await offer_sdp()
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room2/cam", sdp, {**SDP, **bearer(token(sfu, "room1", publish=True))}
    )
    assert (status, problem(body)["code"]) == (403, "wrong_room")
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", sdp, {**SDP, **bearer(token(sfu, subscribe=True))}
    )
    assert (status, problem(body)["code"]) == (403, "no_publish_grant")
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whep/room1/cam",
        await offer_sdp(send=False),
        {**SDP, **bearer(token(sfu, publish=True))},
    )
    assert (status, problem(body)["code"]) == (403, "no_subscribe_grant")


async def test_whep_for_unpublished_stream_is_404(sfu: Server) -> None:
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whep/room1/nothing",
        await offer_sdp(send=False),
        {**SDP, **bearer(token(sfu, subscribe=True))},
    )
    assert (status, problem(body)["code"]) == (404, "stream_not_found")


async def test_publishing_the_same_stream_twice_is_409(sfu: Server) -> None:
    pc, _ = await publish(sfu, "cam")
    try:
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whip/room1/cam",
            await offer_sdp(),
            {**SDP, **bearer(token(sfu, publish=True))},
        )
        assert (status, problem(body)["code"]) == (409, "stream_exists")
    finally:
        await pc.close()


async def test_body_errors_413_415_400(sfu: Server) -> None:
    auth = bearer(token(sfu, publish=True))
    url = f"{sfu.url}/whip/room1/cam"
    big = "v=0\r\n" + "a=x-padding:" + "x" * (sfu.config.limits.max_sdp_bytes + 10) + "\r\n"
    status, _, body, _ = await post_offer(url, big, {**SDP, **auth})
    assert (status, problem(body)["code"]) == (413, "sdp_too_large")
    status, headers, body, _ = await post_offer(
        url, await offer_sdp(), {"Content-Type": "text/plain", **auth}
    )
    assert (status, problem(body)["code"]) == (415, "unsupported_media_type")
    assert headers["Accept-Post"] == "application/sdp"
    status, _, body, _ = await post_offer(url, "hello", {**SDP, **auth})
    assert (status, problem(body)["code"]) == (400, "invalid_sdp")
    no_fingerprint = "\r\n".join(
        line for line in (await offer_sdp()).splitlines() if not line.startswith("a=fingerprint")
    )
    status, _, body, _ = await post_offer(url, no_fingerprint, {**SDP, **auth})
    assert (status, problem(body)["code"]) == (400, "invalid_sdp")
    assert "fingerprint" in problem(body)["detail"]


async def test_offer_without_forwardable_codec_is_400_and_names_it(sfu: Server) -> None:
    sdp = await offer_sdp(("audio",))
    # Keep only PCMU: a codec the SFU does not forward.
    lines = []
    for line in sdp.splitlines():
        if line.startswith("m=audio"):
            parts = line.split()
            line = " ".join([*parts[:3], "0"])
        if line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")) and not line.startswith(
            "a=rtpmap:0 "
        ):
            continue
        lines.append(line)
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam",
        "\r\n".join(lines) + "\r\n",
        {**SDP, **bearer(token(sfu, publish=True))},
    )
    data = problem(body)
    assert (status, data["code"]) == (400, "no_usable_media")
    assert "PCMU" in str(data["detail"])


async def test_subscriber_without_the_publishers_codec_gets_406(sfu: Server) -> None:
    pc, _ = await publish(sfu, "cam", tracks=[ColourTrack()])
    try:
        sdp = await offer_sdp(("video",), send=False)
        # Remove VP8 from the subscriber's offer, leaving only H264.
        vp8 = {line.split()[0].split(":")[1] for line in sdp.splitlines() if "VP8/90000" in line}
        kept = [
            line
            for line in sdp.splitlines()
            if not any(
                line.startswith((f"a=rtpmap:{pt} ", f"a=rtcp-fb:{pt} ", f"a=fmtp:{pt} "))
                for pt in vp8
            )
        ]
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whep/room1/cam",
            "\r\n".join(kept) + "\r\n",
            {**SDP, **bearer(token(sfu, subscribe=True))},
        )
        data = problem(body)
        assert (status, data["code"]) == (406, "codec_not_offered")
        assert "VP8" in str(data["detail"])
    finally:
        await pc.close()


async def test_delete_ends_the_session(sfu: Server) -> None:
    pc, location = await publish(sfu, "cam")
    try:
        auth = bearer(token(sfu, publish=True))
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{sfu.url}{location}", headers=auth) as response:
                assert response.status == 200
            assert sfu.rooms.get("room1") is None
            async with http.delete(f"{sfu.url}{location}", headers=auth) as response:
                assert response.status == 404
                assert (await response.json(content_type=None))["code"] == "session_not_found"
        # The stream name is free again.
        pc2, _ = await publish(sfu, "cam")
        await pc2.close()
    finally:
        await pc.close()


async def test_delete_needs_a_token_for_that_room(sfu: Server) -> None:
    pc, location = await publish(sfu, "cam")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{sfu.url}{location}") as response:
                assert response.status == 401
            other = bearer(token(sfu, "room2", publish=True))
            async with http.delete(f"{sfu.url}{location}", headers=other) as response:
                assert response.status == 403
        assert sfu.rooms.get("room1") is not None
    finally:
        await pc.close()


async def test_patch_trickle_and_restart(sfu: Server) -> None:
    pc, location = await publish(sfu, "cam")
    auth = bearer(token(sfu, publish=True))
    session = next(iter(sfu.rooms.sessions.values()))
    frag = (
        f"a=ice-ufrag:{session.transport.remote_ufrag}\r\na=ice-pwd:x\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 1 127.0.0.1 9 typ host\r\n"
    )
    trickle = {"Content-Type": "application/trickle-ice-sdpfrag", **auth}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.patch(f"{sfu.url}{location}", data=frag, headers=trickle) as r:
                assert r.status == 204
            async with http.patch(
                f"{sfu.url}{location}", data=frag, headers={**trickle, "If-Match": '"nope"'}
            ) as r:
                assert r.status == 412
            async with http.patch(
                f"{sfu.url}{location}", data=frag, headers={"Content-Type": "text/plain", **auth}
            ) as r:
                assert r.status == 415
            restart = frag.replace(session.transport.remote_ufrag or "", "newufrag")
            async with http.patch(f"{sfu.url}{location}", data=restart, headers=trickle) as r:
                assert r.status == 422
                assert (await r.json(content_type=None))["code"] == "ice_restart_unsupported"
    finally:
        await pc.close()


async def test_options_advertise_what_the_endpoint_takes(sfu: Server) -> None:
    async with aiohttp.ClientSession() as http, http.options(f"{sfu.url}/whip/room1/cam") as r:
        assert r.status == 204
        assert r.headers["Accept-Post"] == "application/sdp"


async def test_draining_server_refuses_new_sessions_with_503(sfu: Server) -> None:
    sfu.lifecycle.start_draining()
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", await offer_sdp(), {**SDP, **bearer(token(sfu, publish=True))}
    )
    assert (status, problem(body)["code"]) == (503, "draining")


async def test_invalid_names_are_400(sfu: Server) -> None:
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/-bad", await offer_sdp(), {**SDP, **bearer(token(sfu, publish=True))}
    )
    assert (status, problem(body)["code"]) == (400, "invalid_name")


async def test_unconnected_session_is_closed_when_consent_expires() -> None:
    server = Server(make_config(SFU_RTC__CONSENT_TIMEOUT="1s"))
    await server.start()
    try:
        status, _, body, _ = await post_offer(
            f"{server.url}/whip/room1/cam",
            await offer_sdp(),
            {**SDP, **bearer(token(server, publish=True))},
        )
        assert status == 201, body
        assert len(server.rooms.sessions) == 1
        # No client ever connects: the session is reaped once consent lapses.
        from tests.media.harness import wait_for

        await wait_for(lambda: not server.rooms.sessions, timeout=5, what="session reaped")
        assert server.engine.agent.consent_expiries == 1
        assert server.lifecycle.active() == {}
    finally:
        await server.close()


async def test_subscriber_and_publisher_sessions_hold_the_drain(sfu: Server) -> None:
    pc, _ = await publish(sfu, "cam")
    sub, _ = await subscribe(sfu, "cam")
    try:
        assert sfu.lifecycle.active() == {"whip_session": 1, "whep_session": 1}
    finally:
        await pc.close()
        await sub.close()
