"""The room protocol with real aiortc participants through a real SFU on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest

from sfu.app import Server
from sfu.client.room import RoomClient, RoomError
from tests.media.harness import ColourTrack, Counter, ToneTrack, make_config, token, wait_for


def client(server: Server, identity: str, room: str = "room1", **kwargs) -> RoomClient:  # type: ignore[no-untyped-def]
    grants = kwargs.pop("grants", {"publish": True, "subscribe": True})
    return RoomClient(server.url, token(server, room, identity, **grants), **kwargs)


async def test_two_participants_exchange_media_and_events(sfu: Server) -> None:
    seen_a, seen_b = Counter(), Counter()
    alice = client(sfu, "alice", on_track=seen_a.on_track)
    bob = client(sfu, "bob", on_track=seen_b.on_track)
    try:
        joined = await alice.connect()
        assert joined["version"] == 1
        assert joined["participants"] == []
        assert joined["participant"]["identity"] == "alice"
        assert joined["participant"]["slot"] == 1
        await alice.publish([ColourTrack(), ToneTrack()])
        joined_b = await bob.connect()
        assert [p["identity"] for p in joined_b["participants"]] == ["alice"]
        assert sorted(t["kind"] for t in joined_b["tracks"]) == ["audio", "video"]
        event = await alice.next_event("participant_joined")
        assert event["participant"]["identity"] == "bob"
        assert event["participant"]["slot"] == 2  # slots are never reused in a room
        await bob.publish([ColourTrack((20, 200, 20)), ToneTrack()])
        published = await alice.next_event("track_published")
        assert published["track"]["participant"] == bob.participant_id
        await wait_for(
            lambda: min(seen_a.frames.values()) >= 10 and min(seen_b.frames.values()) >= 10,
            timeout=20,
            what="both directions decoding audio and video",
        )
        # Mute is announced to the others.
        bob_session = sfu.hub.participants[bob.participant_id].publication
        assert bob_session is not None
        bob_tracks = [p.id for p in bob_session.producers]
        assert published["track"]["id"] in bob_tracks
        await bob.send({"type": "mute", "track": bob_tracks[0], "muted": True})
        muted = await alice.next_event("track_muted")
        assert (muted["track"], muted["muted"]) == (bob_tracks[0], True)
        # Leaving: the others see the participant and its tracks go.
        await bob.leave()
        unpublished = await alice.next_event("track_unpublished")
        assert unpublished["track"] in bob_tracks
        left = await alice.next_event("participant_left")
        assert left["participant"] == bob.participant_id
        await wait_for(lambda: len(sfu.hub.participants) == 1, what="bob removed")
    finally:
        await alice.leave()
        await bob.leave()


async def raw_socket(
    server: Server,
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(server.url.replace("http", "ws") + "/rtc")
    return http, ws


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "relay", "payload": "AA=="}, "join_required"),
        ({"type": "join", "version": 2, "token": "x"}, "unsupported_version"),
        ({"type": "join", "version": 1}, "missing_token"),
        ({"type": "join", "version": 1, "token": "nope"}, "invalid_token"),
        ({"type": "join", "version": 1, "token": "x", "resume": "bogus"}, "invalid_token"),
    ],
)
async def test_join_errors_are_documented_codes(
    sfu: Server, first: dict[str, object], code: str
) -> None:
    http, ws = await raw_socket(sfu)
    try:
        await ws.send_str(json.dumps(first))
        error = await receive(ws)
        assert (error["type"], error["code"], error["fatal"]) == ("error", code, True)
        assert (await ws.receive(timeout=5)).type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
        )
    finally:
        await http.close()


async def test_bad_resume_token_is_refused(sfu: Server) -> None:
    http, ws = await raw_socket(sfu)
    try:
        await ws.send_str(
            json.dumps(
                {
                    "type": "join",
                    "token": token(sfu, "room1", "a", subscribe=True),
                    "resume": "nope",
                }
            )
        )
        assert (await receive(ws))["code"] == "resume_failed"
    finally:
        await http.close()


async def test_blind_relay_forwards_opaque_payloads_with_sender_id(sfu: Server) -> None:
    alice, bob, carol = client(sfu, "alice"), client(sfu, "bob"), client(sfu, "carol")
    try:
        for c in (alice, bob, carol):
            await c.connect()
        payload = base64.b64encode(b"\x00opaque key message\xff").decode()
        await alice.relay(payload, to=bob.participant_id)
        message = await bob.next_event("relay")
        assert message == {"type": "relay", "from": alice.participant_id, "payload": payload}
        await alice.relay(payload)  # to everyone else
        assert (await carol.next_event("relay"))["from"] == alice.participant_id
        assert (await bob.next_event("relay"))["from"] == alice.participant_id
        assert sfu.hub.relay_messages == 3
        assert sfu.hub.relay_bytes == 3 * len(payload)
        too_big = base64.b64encode(bytes(sfu.config.limits.max_relay_payload_bytes)).decode()
        await alice.relay(too_big)
        assert (await alice.next_event("error"))["code"] == "relay_too_large"
        await alice.send({"type": "relay", "payload": "not base64!"})
        assert (await alice.next_event("error"))["code"] == "invalid_message"
        await alice.relay(payload, to="p-nobody")
        assert (await alice.next_event("error"))["code"] == "unknown_participant"
    finally:
        for c in (alice, bob, carol):
            await c.leave()


async def test_relay_content_is_never_logged(sfu: Server, caplog: pytest.LogCaptureFixture) -> None:
    alice, bob = client(sfu, "alice"), client(sfu, "bob")
    secret = base64.b64encode(b"KEY-MATERIAL-THE-SFU-MUST-NOT-SEE").decode()
    try:
        with caplog.at_level("DEBUG"):
            await alice.connect()
            await bob.connect()
            await alice.relay(secret, to=bob.participant_id)
            await bob.next_event("relay")
        assert secret not in caplog.text
        assert "KEY-MATERIAL" not in caplog.text
    finally:
        await alice.leave()
        await bob.leave()


async def test_rooms_are_isolated(sfu: Server) -> None:
    alice = client(sfu, "alice", room="room1")
    eve = client(sfu, "eve", room="room2")
    try:
        await alice.connect()
        await alice.publish([ColourTrack()])
        joined = await eve.connect()
        assert joined["participants"] == []
        assert joined["tracks"] == []
        await eve.relay(base64.b64encode(b"x").decode(), to=alice.participant_id)
        assert (await eve.next_event("error"))["code"] == "unknown_participant"
        await asyncio.sleep(0.3)
        kinds = {e["type"] for e in _drain(eve)}
        assert "participant_joined" not in kinds
        assert "track_published" not in kinds
        assert "subscribe_offer" not in kinds
    finally:
        await alice.leave()
        await eve.leave()


async def test_subscribe_only_token_cannot_publish(sfu: Server) -> None:
    viewer = client(sfu, "viewer", grants={"subscribe": True})
    try:
        await viewer.connect()
        with pytest.raises(RoomError) as caught:
            await viewer.publish([ColourTrack()])
        assert caught.value.code == "no_publish_grant"
    finally:
        await viewer.leave()


async def test_room_full_and_message_limits() -> None:
    server = Server(
        make_config(
            SFU_LIMITS__MAX_PARTICIPANTS_PER_ROOM="2",
            SFU_LIMITS__MAX_MESSAGE_BYTES="4096",
            SFU_LIMITS__MAX_MESSAGES_PER_SECOND="5",
        )
    )
    await server.start()
    clients = [client(server, name) for name in ("a", "b", "c")]
    try:
        await clients[0].connect()
        await clients[1].connect()
        with pytest.raises(RoomError) as caught:
            await clients[2].connect()
        assert caught.value.code == "room_full"
        # Rate: a burst beyond twice the per-second budget is refused, not fatal.
        for _ in range(20):
            await clients[0].send({"type": "ping"})
        assert (await clients[0].next_event("error"))["code"] == "rate_limited"
        # Size: a message over limits.max_message_bytes closes that socket, nothing else.
        await clients[1].send({"type": "ping", "pad": "x" * 5000})
        await wait_for(
            lambda: clients[1]._ws is not None and clients[1]._ws.closed, what="socket closed"
        )
        assert server.engine.demux.errors == 0
        await clients[0].send({"type": "bogus"})
        assert (await clients[0].next_event("error"))["code"] in ("unknown_type", "rate_limited")
    finally:
        for c in clients:
            await c.leave()
        await server.close()


async def test_dropped_socket_resumes_without_a_leave() -> None:
    server = Server(make_config(SFU_ROOMS__RECONNECT_WINDOW="2s"))
    await server.start()
    seen = Counter()
    alice, bob = client(server, "alice"), client(server, "bob", on_track=seen.on_track)
    try:
        await alice.connect()
        await alice.publish([ColourTrack()])
        await bob.connect()
        await wait_for(lambda: seen.frames["video"] >= 5, what="bob decoding alice")
        await alice.drop()
        await asyncio.sleep(0.5)
        before = seen.frames["video"]
        await asyncio.sleep(0.5)
        assert seen.frames["video"] > before, "media keeps flowing while the socket is down"
        joined = await alice.connect(resume=True)
        assert joined["resumed"] is True
        assert joined["participant"]["id"] == alice.participant_id
        await asyncio.sleep(2.5)  # past the window: resumed, so nobody left
        assert "participant_left" not in {e["type"] for e in _drain(bob)}
        # Dropped again and not back in time: now the others are told.
        await alice.drop()
        left = await bob.next_event("participant_left", within=6)
        assert left["participant"] == alice.participant_id
    finally:
        await alice.leave()
        await bob.leave()
        await server.close()


async def test_ice_restart_keeps_media_flowing(sfu: Server) -> None:
    seen = Counter()
    alice, bob = client(sfu, "alice"), client(sfu, "bob", on_track=seen.on_track)
    try:
        await alice.connect()
        transceivers = await alice.publish([ColourTrack()])
        await bob.connect()
        await wait_for(lambda: seen.frames["video"] >= 5, what="bob decoding alice")
        session = sfu.hub.participants[alice.participant_id].publication
        assert session is not None
        old_ufrag = session.transport.ice_ufrag
        # A re-offer with fresh ICE credentials (what restartIce() produces in a browser).
        pc = alice.publisher
        assert pc is not None
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        remote_ufrag = session.transport.remote_ufrag
        restarted = sdp.replace(f"a=ice-ufrag:{remote_ufrag}", "a=ice-ufrag:rstrt")
        _drain(alice)  # the first publish_answer is still queued as an event
        await alice.send({"type": "publish_offer", "sdp": restarted})
        answer = await alice.next_event("publish_answer")
        assert f"a=ice-ufrag:{old_ufrag}" not in answer["sdp"]
        assert session.transport.remote_ufrag == "rstrt"
        # The media plane's transport itself runs on the new credentials.
        assert sfu.engine.transports[session.transport.id].ice.remote_ufrag == "rstrt"
        assert len(session.producers) == len(transceivers)
        before = seen.frames["video"]
        await asyncio.sleep(1)
        assert seen.frames["video"] > before
    finally:
        await alice.leave()
        await bob.leave()


async def test_active_speaker_follows_who_makes_sound(sfu: Server) -> None:
    from tests.media.harness import ToneTrack as Loud

    class Quiet(Loud):
        async def recv(self):  # type: ignore[no-untyped-def]
            frame = await super().recv()
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            return frame

    alice, bob, carol = client(sfu, "alice"), client(sfu, "bob"), client(sfu, "carol")
    try:
        for c in (alice, bob, carol):
            await c.connect()
        await alice.publish([Loud()])
        await bob.publish([Quiet()])
        event = await carol.next_event("active_speaker", within=10)
        assert event["speakers"][0] == alice.participant_id
        assert bob.participant_id not in event["speakers"]
        # Someone joining later learns the current speaker from `joined`.
        dave = client(sfu, "dave")
        joined = await dave.connect()
        assert joined["speakers"] == [alice.participant_id]
        await dave.leave()
    finally:
        for c in (alice, bob, carol):
            await c.leave()


def _drain(c: RoomClient) -> list[dict[str, object]]:
    out = []
    while not c.events.empty():
        out.append(c.events.get_nowait())
    return out


async def test_whip_and_whep_meet_room_participants(sfu: Server) -> None:
    from tests.media.harness import publish as whip_publish
    from tests.media.harness import subscribe as whep_subscribe

    seen = Counter()
    carol = client(sfu, "carol", on_track=seen.on_track)
    try:
        await carol.connect()
        pc, _ = await whip_publish(sfu, "obs", tracks=[ColourTrack()])
        joined = await carol.next_event("participant_joined")
        assert joined["participant"]["kind"] == "whip"
        track = await carol.next_event("track_published")
        assert (track["track"]["kind"], track["track"]["stream"]) == ("video", "obs")
        await wait_for(lambda: seen.frames["video"] >= 5, what="carol decoding the WHIP stream")
        # A room participant's publication is a WHEP stream named after its identity.
        await carol.publish([ColourTrack()])
        viewer, counter = await whep_subscribe(sfu, "carol", kinds=("video",))
        await wait_for(lambda: counter.frames["video"] >= 5, what="WHEP viewer of carol")
        await pc.close()
        await viewer.close()
        left = await carol.next_event("participant_left")
        assert left["participant"] == joined["participant"]["id"]
    finally:
        await carol.leave()


async def test_subscribing_to_a_chosen_set_of_tracks(sfu: Server) -> None:
    alice = client(sfu, "alice")
    bob = client(sfu, "bob", subscribe=[])
    try:
        await alice.connect()
        await alice.publish([ColourTrack(), ToneTrack()])
        await bob.connect()
        await asyncio.sleep(0.3)
        assert "subscribe_offer" not in {e["type"] for e in _drain(bob)}
        session = sfu.hub.participants[alice.participant_id].publication
        assert session is not None
        video = next(p for p in session.producers if p.kind == "video")
        await bob.send({"type": "subscribe", "tracks": [video.id]})
        offer = await bob.next_event("subscribe_offer")
        assert offer["sdp"].count("m=video") == 1
        assert "m=audio" not in offer["sdp"]
        await bob.send({"type": "subscribe", "tracks": "all"})
        offer = await bob.next_event("subscribe_offer")
        assert "m=audio" in offer["sdp"]
        await bob.send({"type": "subscribe", "tracks": 42})
        assert (await bob.next_event("error"))["code"] == "invalid_message"
    finally:
        await alice.leave()
        await bob.leave()


async def test_video_size_is_checked_and_kept_per_track(sfu: Server) -> None:
    alice = client(sfu, "alice")
    bob = client(sfu, "bob")
    try:
        await alice.connect()
        await alice.publish([ColourTrack()])
        await bob.connect()
        session = sfu.hub.participants[alice.participant_id].publication
        assert session is not None
        video = session.producers[0]
        await bob.set_video_size(video.id, 320, 180)
        await bob.send({"type": "ping", "ts": 1})
        await bob.next_event("pong")  # no error came before it
        assert sfu.hub.participants[bob.participant_id].video_sizes == {video.id: (320, 180)}
        await bob.send({"type": "video_size", "track": "nope", "width": 1, "height": 1})
        assert (await bob.next_event("error"))["code"] == "unknown_track"
        for bad in ({"width": -1, "height": 2}, {"width": True, "height": 2}, {"width": 9}):
            await bob.send({"type": "video_size", "track": video.id, **bad})
            assert (await bob.next_event("error"))["code"] == "invalid_message"
    finally:
        await alice.leave()
        await bob.leave()
