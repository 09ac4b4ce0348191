"""E2EE assurance metrics and the `e2ee: required` policy, with real peers through the SFU."""

from __future__ import annotations

import asyncio
import os

import aiohttp

from sfu.app import Server
from sfu.client.e2ee import E2eeConfig
from sfu.client.sframe import compose_kid
from sfu.client.whip import publish, subscribe
from tests.media.harness import ColourTrack, ToneTrack, bearer, make_config, token, wait_for
from tests.media.harness import publish as publish_plain
from tests.media.harness import subscribe as subscribe_plain

KID = compose_kid(5, 0)
KEY = os.urandom(16)


async def scrape(server: Server) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sfu_")
    }


async def started(config_env: dict[str, str]) -> Server:
    server = Server(make_config(**config_env))
    await server.start()
    return server


async def test_encrypted_publisher_is_seen_as_encrypted() -> None:
    server = await started({"SFU_METRICS__INTEGRITY_SAMPLE_EVERY": "5"})
    publication = await publish(
        f"{server.url}/whip/room1/cam",
        token(server, publish=True),
        [ColourTrack(), ToneTrack()],
        E2eeConfig(send_kid=KID, send_key=KEY),
    )
    subscription = await subscribe(
        f"{server.url}/whep/room1/cam",
        token(server, subscribe=True),
        E2eeConfig(receive_keys={KID: KEY}),
    )
    try:
        await wait_for(
            lambda: (
                server.engine.stats.e2ee_frames["video"][1] >= 40
                and server.engine.stats.e2ee_frames["audio"][1] >= 60
            ),
            what="enveloped frames counted",
        )
        values = await scrape(server)
    finally:
        await publication.close()
        await subscription.close()
        await server.close()
    assert values['sfu_e2ee_frames_total{envelope="sframe",kind="video"}'] >= 40
    assert values['sfu_e2ee_frames_total{envelope="sframe",kind="audio"}'] >= 60
    assert values['sfu_e2ee_frames_total{envelope="none",kind="video"}'] == 0
    assert values['sfu_e2ee_frames_total{envelope="none",kind="audio"}'] == 0
    assert values['sfu_e2ee_tracks{policy="optional",state="encrypted"}'] == 2
    assert values['sfu_e2ee_tracks{policy="optional",state="plaintext_suspected"}'] == 0
    assert values['sfu_payload_integrity_checks_total{result="match"}'] > 10
    assert values['sfu_payload_integrity_checks_total{result="mismatch"}'] == 0


async def test_plaintext_publisher_is_suspected() -> None:
    server = await started({})
    pub, _ = await publish_plain(server, "cam")
    try:
        await wait_for(
            lambda: (
                server.engine.stats.e2ee_frames["video"][0] >= 30
                and server.engine.stats.e2ee_frames["audio"][0] >= 30
            ),
            what="frames without envelope counted",
        )
        values = await scrape(server)
    finally:
        await pub.close()
        await server.close()
    assert values['sfu_e2ee_tracks{policy="optional",state="plaintext_suspected"}'] == 2
    assert values['sfu_e2ee_frames_total{envelope="none",kind="video"}'] >= 30
    # No plaintext frame is counted as SFrame: none continues an established KID and counter.
    assert values['sfu_e2ee_frames_total{envelope="sframe",kind="video"}'] == 0
    assert values['sfu_e2ee_frames_total{envelope="sframe",kind="audio"}'] == 0


async def test_required_room_stops_a_plaintext_publisher_and_says_why() -> None:
    server = await started(
        {"SFU_E2EE__ROOMS": "{secure: required}", "SFU_E2EE__GRACE_PERIOD": "1s"}
    )
    pub, location = await publish_plain(server, "cam", room="secure")
    encrypted = await publish(
        f"{server.url}/whip/secure/cam2",
        token(server, "secure", publish=True),
        [ColourTrack(), ToneTrack()],
        E2eeConfig(send_kid=KID, send_key=KEY),
    )
    try:
        await wait_for(
            lambda: [s.stream for s in server.rooms.sessions.values()] == ["cam2"],
            timeout=10,
            what="the plaintext session stopped, the encrypted one kept",
        )
        await wait_for(lambda: pub.connectionState in ("closed", "failed"), what="publisher told")
        async with aiohttp.ClientSession() as http:
            headers = bearer(token(server, "secure", publish=True))
            async with http.delete(f"{server.url}{location}", headers=headers) as r:
                assert r.status == 410
                problem = await r.json(content_type=None)
        assert problem["code"] == "e2ee_required"
        assert "without an SFrame envelope" in problem["detail"]
        await asyncio.sleep(1.5)  # the encrypted publisher is past its grace period too
        assert [s.stream for s in server.rooms.sessions.values()] == ["cam2"]
    finally:
        await pub.close()
        await encrypted.close()
        await server.close()


async def test_a_forwarder_that_alters_a_byte_is_caught() -> None:
    """The integrity check is real: break the forwarder on purpose and it reports it."""
    server = await started({"SFU_METRICS__INTEGRITY_SAMPLE_EVERY": "1"})
    server.engine.router.inject_payload_fault(10**9)
    pub, _ = await publish_plain(server, "cam", tracks=[ColourTrack()])
    sub, _ = await subscribe_plain(server, "cam", kinds=("video",))
    try:
        await wait_for(lambda: server.engine.stats.integrity[1] >= 10, what="mismatches counted")
        values = await scrape(server)
    finally:
        await pub.close()
        await sub.close()
        await server.close()
    assert values['sfu_payload_integrity_checks_total{result="mismatch"}'] >= 10
    assert values['sfu_payload_integrity_checks_total{result="match"}'] == 0
