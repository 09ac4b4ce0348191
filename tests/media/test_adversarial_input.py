"""Inputs found by attacking the server from outside, each refused where it enters.

Every case here once produced a 500, a dropped socket, a ghost session or lost media for
other clients; each now gets its documented 4xx or protocol error and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct

import aiohttp
import jwt
import pytest

from sfu.app import Server
from sfu.config import DEV_API_KEY, DEV_API_SECRET
from sfu.media.downtrack import DownTrack
from sfu.media.producer import Producer
from sfu.media.rtp import parse_header
from sfu.media.srtp import (
    AEAD_AES_128_GCM,
    MAX_INBOUND_STREAMS,
    SrtpKeyingMaterial,
    SrtpSession,
)
from tests.media.harness import SDP, bearer, post_offer, token
from tests.media.test_downtrack import VP8, Clock, Sink, Upstream, vp8_packet
from tests.media.test_whip_whep_http import offer_sdp, problem


async def mutated_offer(old: str, new: str, count: int = 1) -> str:
    sdp = await offer_sdp()
    assert old in sdp, old
    return sdp.replace(old, new, count)


def first_video_pt(sdp: str) -> str:
    line = next(line for line in sdp.splitlines() if line.startswith("m=video"))
    return line.split()[3]


async def test_payload_type_over_127_is_refused_at_negotiation(sfu: Server) -> None:
    sdp = await offer_sdp()
    pt = first_video_pt(sdp)
    bad = sdp.replace(f"a=rtpmap:{pt} ", "a=rtpmap:300 ").replace(
        f"m=video 9 UDP/TLS/RTP/SAVPF {pt}", "m=video 9 UDP/TLS/RTP/SAVPF 300"
    )
    for kind, grant in (("whip", {"publish": True}), ("whep", {"subscribe": True})):
        status, _, body, _ = await post_offer(
            f"{sfu.url}/{kind}/room1/cam", bad, {**SDP, **bearer(token(sfu, **grant))}
        )
        assert status == 400, body
        details = problem(body)
        assert details["code"] == "invalid_sdp"
        assert "300" in str(details["detail"])
    assert sfu.engine.transports == {}


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("a=setup:actpass", "a=setup:passive", "setup:passive"),
        ("a=ssrc-group:FID", "a=ssrc-group:\r\na=ssrc-group:FID", "empty ssrc-group"),
        ("a=ssrc-group:FID", "a=ssrc-group:FID x", "ssrc-group id"),
        ("a=rtpmap:97 VP8/90000", "a=rtpmap:97", "rtpmap without codec"),
        ("a=rtpmap:97 VP8/90000", "a=rtpmap:97 VP8/0", "clock rate"),
        ("a=fmtp:98 apt=97", "a=fmtp:\u00b2 apt=97", "fmtp payload type"),
        ("a=extmap:1 ", "a=extmap:999 ", "extmap id"),
        ("m=video ", "m=video 99999999999999999999", "port"),
        ("a=ssrc:", "a=ssrc:99999999999 cname:x\r\na=ssrc:", "a=ssrc"),
    ],
)
async def test_bad_offers_are_400_and_hold_nothing(
    sfu: Server, old: str, new: str, why: str
) -> None:
    bad = await mutated_offer(old, new)
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", bad, {**SDP, **bearer(token(sfu, publish=True))}
    )
    assert status == 400, body
    assert problem(body)["code"] == "invalid_sdp", why
    # Refused before anything was made: the real publisher gets the stream name at once.
    assert sfu.engine.transports == {}
    good = await offer_sdp()
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", good, {**SDP, **bearer(token(sfu, publish=True))}
    )
    assert status == 201, body


def signed(claims: dict[str, object]) -> str:
    return jwt.encode(claims, DEV_API_SECRET, algorithm="HS256", headers={"kid": DEV_API_KEY})


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": "9999999999"},
        {"exp": [9999999999]},
        {"exp": True},
        {"exp": 10**400},
        {"nbf": "0"},
        {"nbf": {"a": 1}},
        {"name": "line\nbreak"},
        {"name": 42},
    ],
)
async def test_signed_tokens_with_bad_claim_types_are_401(
    sfu: Server, bad: dict[str, object]
) -> None:
    claims: dict[str, object] = {
        "sub": "mallory",
        "room": "room1",
        "iat": 0,
        "exp": 9_999_999_999,
        "grants": {"publish": True},
        **bad,
    }
    sdp = await offer_sdp()
    status, headers, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam", sdp, {**SDP, **bearer(signed(claims))}
    )
    assert status == 401, body
    assert problem(body)["code"] == "invalid_token"
    assert headers["WWW-Authenticate"] == "Bearer"


async def test_oversized_header_line_is_400_without_an_error_log(
    sfu: Server, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = sfu.config.http.host, sfu.config.http.port
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /whip/room1/cam HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"A" * 20_000
            + b"\r\n\r\n"
        )
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        assert b" 400 " in status_line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    async with aiohttp.ClientSession() as http, http.get(f"{sfu.url}/metrics") as r:
        text = await r.text()
    assert "sfu_http_malformed_requests_total 3.0" in text


async def test_unknown_http_methods_share_one_label(sfu: Server) -> None:
    async with aiohttp.ClientSession() as http:
        # The HTTP parser knows a few dozen WebDAV and other methods besides HTTP's own.
        for method in ("PROPFIND", "MKCOL", "LOCK", "SEARCH"):
            async with http.request(method, f"{sfu.url}/healthz") as r:
                assert r.status == 405
        async with http.get(f"{sfu.url}/metrics") as r:
            text = await r.text()
    assert "PROPFIND" not in text
    assert 'method="other"' in text


# -- room protocol -----------------------------------------------------------------------------


async def joined_socket(
    sfu: Server, **join: object
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(sfu.url.replace("http", "ws") + "/rtc")
    await ws.send_str(
        json.dumps(
            {
                "type": "join",
                "version": 1,
                "token": token(sfu, publish=True, subscribe=True),
                **join,
            }
        )
    )
    return http, ws


async def next_message(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    data: dict[str, object] = json.loads(msg.data)
    return data


@pytest.mark.parametrize(
    ("join", "code"),
    [
        ({"version": True}, "unsupported_version"),
        ({"version": 1.0}, "unsupported_version"),
        ({"name": "Bob\u202eevil"}, "invalid_message"),
        ({"name": "two\nlines"}, "invalid_message"),
        ({"name": "x" * 200}, "invalid_message"),
        ({"subscribe": 123}, "invalid_message"),
    ],
)
async def test_bad_join_fields_leave_no_participant(
    sfu: Server, join: dict[str, object], code: str
) -> None:
    http, ws = await joined_socket(sfu, **join)
    try:
        error = await next_message(ws)
        assert (error["type"], error["code"], error["fatal"]) == ("error", code, True)
    finally:
        await http.close()
    assert sfu.rooms.get("room1") is None
    assert sfu.hub.by_resume == {}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("a=setup:actpass", "a=setup:passive"),
        ("a=ssrc-group:FID", "a=ssrc-group:\r\na=ssrc-group:FID"),
        ("a=rtpmap:97 VP8/90000", "a=rtpmap:97"),
    ],
)
async def test_bad_publish_offer_is_invalid_sdp_and_the_socket_stays(
    sfu: Server, old: str, new: str
) -> None:
    http, ws = await joined_socket(sfu)
    try:
        assert (await next_message(ws))["type"] == "joined"
        await ws.send_str(
            json.dumps({"type": "publish_offer", "sdp": await mutated_offer(old, new)})
        )
        error = await next_message(ws)
        assert (error["code"], error["fatal"]) == ("invalid_sdp", False)
        await ws.send_str(json.dumps({"type": "publish_offer", "sdp": await offer_sdp()}))
        kinds = [(await next_message(ws))["type"] for _ in range(3)]
        assert "publish_answer" in kinds
    finally:
        await http.close()


async def test_deeply_nested_json_is_invalid_message(sfu: Server) -> None:
    http, ws = await joined_socket(sfu)
    try:
        assert (await next_message(ws))["type"] == "joined"
        await ws.send_str("[" * 30_000 + "]" * 30_000)
        error = await next_message(ws)
        assert (error["code"], error["fatal"]) == ("invalid_message", False)
    finally:
        await http.close()


# -- media plane -------------------------------------------------------------------------------


class BrokenSink(Sink):
    def send_rtp(self, packet: bytes | bytearray) -> None:
        raise struct.error("cannot pack")


def test_one_failing_copy_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    producer = Producer("p", "video", "1", VP8, {}, Upstream(), buffer_size=64, clock=clock)
    sinks = [Sink(), BrokenSink(), Sink()]
    copies = [
        DownTrack(producer, sink, ssrc=0x100 + i, payload_type=100, ext_map=[0] * 256, clock=clock)
        for i, sink in enumerate(sinks)
    ]
    for copy in copies:
        producer.attach(copy)
    for seq in range(10):
        data = vp8_packet(seq, 3000 * seq, key=seq == 0)
        hdr = parse_header(data)
        assert hdr is not None
        producer.on_rtp(data, hdr)
    assert len(sinks[0].rtp) == 10
    assert len(sinks[2].rtp) == 10
    assert copies[1].forward_errors == 10
    assert copies[1].stats.forward_errors == 10
    # One traceback for the broken copy, not one per packet.
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def rtp(ssrc: int, seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 96, seq, 1000, ssrc) + b"\x00" * 40


def test_switching_ssrcs_keeps_a_bounded_number_of_srtp_contexts() -> None:
    keys = SrtpKeyingMaterial.from_exported(
        AEAD_AES_128_GCM, os.urandom(AEAD_AES_128_GCM.exporter_length)
    )
    client, server = SrtpSession(keys, "client"), SrtpSession(keys, "server")
    for ssrc in range(1, 1001):
        plain = server.unprotect_rtp(client.protect_rtp(rtp(ssrc, 1)) or b"")
        assert plain is not None
        server.note_inbound(ssrc)
    assert server.inbound_streams == MAX_INBOUND_STREAMS
    # An evicted SSRC that sends again is still accepted (libsrtp makes a new context).
    assert server.unprotect_rtp(client.protect_rtp(rtp(1, 2)) or b"") is not None


async def test_relay_to_must_be_a_string(sfu: Server) -> None:
    http, ws = await joined_socket(sfu)
    try:
        assert (await next_message(ws))["type"] == "joined"
        await ws.send_str(json.dumps({"type": "relay", "payload": "AA==", "to": ["p-1"]}))
        error = await next_message(ws)
        assert (error["code"], error["fatal"]) == ("invalid_message", False)
    finally:
        await http.close()


async def test_nan_is_not_json(sfu: Server) -> None:
    http, ws = await joined_socket(sfu)
    try:
        assert (await next_message(ws))["type"] == "joined"
        await ws.send_str('{"type": "ping", "ts": NaN}')
        error = await next_message(ws)
        assert (error["code"], error["fatal"]) == ("invalid_message", False)
    finally:
        await http.close()
