"""Calls that hold up while people leave, rejoin and close their connections: real aiortc
participants through a real SFU on 127.0.0.1."""

from __future__ import annotations

import asyncio

import aiohttp

from sfu.app import Server
from tests.media.harness import ColourTrack, Counter, token, wait_for
from tests.rooms.test_room_protocol import _drain, client


async def test_a_leaver_does_not_stop_the_others_and_its_rejoin_is_received(
    sfu: Server,
) -> None:
    seen = Counter()
    alice = client(sfu, "alice", on_track=seen.on_track)
    bob, carol = client(sfu, "bob"), client(sfu, "carol")
    again = None
    try:
        # Bob publishes first, so his section tags the BUNDLE group of Alice's subscriber.
        for person in (alice, bob, carol):
            await person.connect()
        await bob.publish([ColourTrack((40, 200, 40))])
        await wait_for(lambda: seen.frames["video"] >= 5, what="alice decoding bob")
        await carol.publish([ColourTrack((40, 40, 200))])
        await wait_for(lambda: len(seen.tasks) == 2, what="alice receiving carol")

        await bob.leave()
        left = await alice.next_event("participant_left", within=3)
        assert left["participant"] == bob.participant_id
        await asyncio.sleep(0.5)  # Bob's BYE has ended his track on Alice's side by now
        before = seen.frames["video"]
        await asyncio.sleep(1.0)
        assert seen.frames["video"] - before >= 10, "alice keeps decoding carol"
        subscriber = alice.subscriber
        assert subscriber.connectionState == "connected"
        # Bob's retired section stays bundled and is never rejected: port 0 on the section
        # that tags the BUNDLE group makes a browser close the transport everyone shares.
        offer = subscriber.remoteDescription.sdp
        assert "m=video 0 " not in offer
        assert "a=inactive" in offer

        again = client(sfu, "bob")
        await again.connect()
        await again.publish([ColourTrack((200, 200, 40))])
        await wait_for(lambda: len(seen.tasks) == 3, timeout=5, what="alice receiving bob again")
        before = seen.frames["video"]
        await asyncio.sleep(1.0)
        # Carol's and the new Bob's video both arrive (about 30 fps each).
        assert seen.frames["video"] - before >= 30
        assert subscriber.connectionState == "connected"
    finally:
        for person in (alice, carol, *([again] if again else [])):
            await person.leave()


async def test_a_socket_closed_normally_is_a_leave_seen_at_once(sfu: Server) -> None:
    alice, bob = client(sfu, "alice"), client(sfu, "bob")
    try:
        await alice.connect()
        await bob.connect()
        _drain(alice)
        assert bob._ws is not None
        await bob._ws.close(code=1001)  # what a browser sends when its tab closes
        left = await alice.next_event("participant_left", within=3)
        assert left["participant"] == bob.participant_id
        assert bob.participant_id not in sfu.hub.participants
    finally:
        await alice.leave()
        await bob.leave()


async def test_closing_a_media_connection_is_a_leave_seen_at_once(sfu: Server) -> None:
    alice, bob = client(sfu, "alice"), client(sfu, "bob")
    try:
        await alice.connect()
        await bob.connect()
        await bob.publish([ColourTrack()])
        await wait_for(
            lambda: bob.publisher is not None and bob.publisher.connectionState == "connected",
            what="bob's publisher connected",
        )
        _drain(alice)
        assert bob.publisher is not None
        await bob.publisher.close()  # DTLS close_notify
        left = await alice.next_event("participant_left", within=3)
        assert left["participant"] == bob.participant_id
    finally:
        await alice.leave()
        await bob.leave()


async def test_rejoining_with_the_same_identity_alone_in_a_room(sfu: Server) -> None:
    first, second = client(sfu, "alice"), client(sfu, "alice")
    try:
        await first.connect()
        joined = await second.connect()
        assert joined["type"] == "joined"
        assert joined["participant"]["id"] != first.participant_id
        assert list(sfu.hub.participants) == [second.participant_id]
        room = sfu.rooms.get("room1")
        assert room is not None
        assert list(room.members) == [second.participant_id]
    finally:
        await second.leave()
        await first.leave()


async def test_a_bad_subscribe_field_in_join_is_refused_and_leaves_nothing(sfu: Server) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{sfu.url}/rtc") as ws:
        await ws.send_json(
            {"type": "join", "token": token(sfu, "room1", "eve", subscribe=True), "subscribe": 123}
        )
        reply = await ws.receive_json(timeout=5)
        assert reply["type"] == "error"
        assert reply["code"] == "invalid_message"
        assert reply["fatal"] is True
        assert "join.subscribe" in reply["message"]
    assert sfu.hub.participants == {}
    assert sfu.rooms.get("room1") is None


async def test_resuming_closes_the_old_socket(sfu: Server) -> None:
    alice = client(sfu, "alice")
    try:
        joined = await alice.connect()
        old = alice._ws
        assert old is not None
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{sfu.url}/rtc") as ws:
            await ws.send_json(
                {
                    "type": "join",
                    "token": token(sfu, "room1", "alice", publish=True, subscribe=True),
                    "resume": joined["resume_token"],
                }
            )
            assert (await ws.receive_json(timeout=5))["resumed"] is True
            await wait_for(lambda: old.closed, timeout=3, what="the old socket closed")
            assert alice.participant_id in sfu.hub.participants
    finally:
        await alice.leave()
