"""Resource limits under abuse: sessions per identity, room and server, creation rates per
identity and IP, and the handshake timeout for offers nobody follows up."""

from __future__ import annotations

import json

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfu.app import Server
from sfu.control.admission import RateTable, client_ip
from tests.media.harness import SDP, bearer, post_offer, running_server, token, wait_for
from tests.media.test_whip_whep_http import offer_sdp, problem


async def whip(
    sfu: Server, stream: str, identity: str = "alice", room: str = "room1"
) -> tuple[int, dict[str, str], str]:
    status, headers, body, _ = await post_offer(
        f"{sfu.url}/whip/{room}/{stream}",
        await offer_sdp(),
        {**SDP, **bearer(token(sfu, room, identity, publish=True))},
    )
    return status, dict(headers), body


async def metric(sfu: Server, line_start: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{sfu.url}/metrics") as r:
        text = await r.text()
    line = next(line for line in text.splitlines() if line.startswith(line_start))
    return float(line.rsplit(" ", 1)[1])


def test_rate_table_refills_and_stays_bounded() -> None:
    table = RateTable(rate=2.0, burst=3, max_keys=100)
    assert [table.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert table.take("a", 0.0) == 0.5  # one token every 0.5 s
    assert table.take("a", 0.5) == 0.0
    for i in range(1000):
        table.take(f"k{i}", 1.0)
    assert len(table) <= 100


def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    assert client_ip("203.0.113.9", "1.2.3.4", []) == "203.0.113.9"
    assert client_ip("10.0.0.5", "1.2.3.4, 10.0.0.7", ["10.0.0.0/8"]) == "1.2.3.4"
    # A client cannot choose its own address by prepending to the header.
    assert client_ip("10.0.0.5", "6.6.6.6, 1.2.3.4", ["10.0.0.0/8"]) == "1.2.3.4"
    assert client_ip("10.0.0.5", None, ["10.0.0.0/8"]) == "10.0.0.5"


async def test_sessions_per_identity_are_capped_and_freed_on_delete() -> None:
    async with running_server(SFU_LIMITS__MAX_SESSIONS_PER_IDENTITY="2") as sfu:
        first = await whip(sfu, "s1")
        assert (await whip(sfu, "s2"))[0] == 201
        status, _, body = await whip(sfu, "s3")
        assert status == 429
        assert problem(body)["code"] == "session_limit"
        assert "limits.max_sessions_per_identity" in str(problem(body)["detail"])
        # Another identity is not affected.
        assert (await whip(sfu, "s3", identity="bob"))[0] == 201
        async with aiohttp.ClientSession() as http:
            headers = bearer(token(sfu, publish=True))
            async with http.delete(sfu.url + first[1]["Location"], headers=headers) as r:
                assert r.status == 200
        assert (await whip(sfu, "s4"))[0] == 201
        assert await metric(sfu, 'sfu_admission_refusals_total{reason="identity_sessions"}') == 1


async def test_streams_per_room_are_capped() -> None:
    async with running_server(SFU_LIMITS__MAX_STREAMS_PER_ROOM="1") as sfu:
        assert (await whip(sfu, "s1"))[0] == 201
        status, _, body = await whip(sfu, "s2", identity="bob")
        assert (status, problem(body)["code"]) == (429, "session_limit")
        assert (await whip(sfu, "s2", identity="bob", room="room2"))[0] == 201


async def test_creation_rate_per_identity_answers_429_with_retry_after() -> None:
    async with running_server(
        SFU_LIMITS__SESSION_RATE_PER_IDENTITY="0.1", SFU_LIMITS__SESSION_BURST_PER_IDENTITY="2"
    ) as sfu:
        assert (await whip(sfu, "s1"))[0] == 201
        assert (await whip(sfu, "s2"))[0] == 201
        status, headers, body = await whip(sfu, "s3")
        assert (status, problem(body)["code"]) == (429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1
        assert await metric(sfu, 'sfu_admission_refusals_total{reason="rate_identity"}') == 1


async def test_creation_rate_per_ip_covers_every_identity() -> None:
    async with running_server(
        SFU_LIMITS__SESSION_RATE_PER_IP="0.1", SFU_LIMITS__SESSION_BURST_PER_IP="3"
    ) as sfu:
        statuses = [(await whip(sfu, f"s{i}", identity=f"user{i}"))[0] for i in range(5)]
        assert statuses == [201, 201, 201, 429, 429]


async def test_server_cap_refuses_and_readyz_reports_saturation() -> None:
    async with running_server(SFU_LIMITS__MAX_SESSIONS="2") as sfu:
        assert (await whip(sfu, "s1"))[0] == 201
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sfu.url}/readyz") as r:
                assert r.status == 200
            assert (await whip(sfu, "s2", identity="bob"))[0] == 201
            async with http.get(f"{sfu.url}/readyz") as r:
                assert r.status == 503
                assert (await r.json())["code"] == "saturated"
            status, headers, body = await whip(sfu, "s3", identity="carol")
            assert (status, problem(body)["code"]) == (503, "server_full")
            assert headers["Retry-After"] == "5"
            # Room joins count against the same cap.
            async with http.ws_connect(sfu.url.replace("http", "ws") + "/rtc") as ws:
                join = {
                    "type": "join",
                    "version": 1,
                    "token": token(sfu, identity="dave", subscribe=True),
                }
                await ws.send_str(json.dumps(join))
                error = json.loads((await ws.receive(timeout=5)).data)
                assert (error["code"], error["fatal"]) == ("server_full", True)
        assert await metric(sfu, "sfu_admitted_sessions ") == 2


async def test_join_rate_per_identity_is_limited() -> None:
    async with running_server(
        SFU_LIMITS__SESSION_RATE_PER_IDENTITY="0.1", SFU_LIMITS__SESSION_BURST_PER_IDENTITY="1"
    ) as sfu:
        codes = []
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.ws_connect(sfu.url.replace("http", "ws") + "/rtc") as ws:
                    join = {"type": "join", "version": 1, "token": token(sfu, subscribe=True)}
                    await ws.send_str(json.dumps(join))
                    codes.append(json.loads((await ws.receive(timeout=5)).data).get("code"))
        assert codes == [None, "rate_limited"]


async def test_offers_that_never_connect_end_after_the_handshake_timeout() -> None:
    async with running_server(SFU_RTC__HANDSHAKE_TIMEOUT="0.3") as sfu:
        status, _, _ = await whip(sfu, "cam")
        assert status == 201
        assert len(sfu.rooms.sessions) == 1
        await wait_for(lambda: not sfu.rooms.sessions, 5, "the abandoned session to end")
        assert sfu.engine.transports == {}
        # The stream name is free again, long before the consent timeout.
        assert (await whip(sfu, "cam"))[0] == 201
        assert await metric(sfu, "sfu_handshake_timeouts_total") == 1


async def test_sockets_waiting_to_join_are_capped_per_ip() -> None:
    async with running_server(SFU_LIMITS__MAX_PENDING_JOINS_PER_IP="2") as sfu:
        url = sfu.url.replace("http", "ws") + "/rtc"
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(url)
            second = await http.ws_connect(url)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert refused.value.status == 429
            # Joining frees the slot.
            join = {"type": "join", "version": 1, "token": token(sfu, subscribe=True)}
            await first.send_str(json.dumps(join))
            assert json.loads((await first.receive(timeout=5)).data)["type"] == "joined"
            third = await http.ws_connect(url)
            for ws in (first, second, third):
                await ws.close()
        assert await metric(sfu, 'sfu_admission_refusals_total{reason="pending_ip"}') == 1
        await wait_for(lambda: not sfu.admission.pending, 5, "pending sockets forgotten")


@given(
    peer=st.one_of(st.none(), st.sampled_from(["10.0.0.5", "203.0.113.9", "::1"]), st.text()),
    header=st.one_of(st.none(), st.text(max_size=300)),
)
@settings(max_examples=300)
def test_client_ip_takes_any_header_text(peer: str | None, header: str | None) -> None:
    ip = client_ip(peer, header, ["10.0.0.0/8", "::1/128"])
    # Always a bounded key: the peer itself, "unknown", or one hop of the header.
    assert ip in (peer, "unknown") or len(ip) <= 64
