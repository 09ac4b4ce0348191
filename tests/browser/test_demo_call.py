"""The demo page and the browser client in real Chromium, through a real SFU subprocess.

One call runs for the whole module (conftest.py): Alice (a 440 Hz tone, RTCRtpScriptTransform)
and Bob (silence, createEncodedStreams), both with a fake camera of four coloured quadrants.
The tests add participants to it in order: Carol with the wrong passphrase, a Python bot,
Dave who leaves; the last test scans the SFU's memory for every media key the browsers used.

What proves decryption (docs/testing.md): `framesDecoded` from getStats and the rendered
colours, not `videoWidth` (the VP8 header that carries the size is in the clear).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.browser.conftest import Call
from tests.browser.support import (
    QUADRANTS,
    BrowserPeer,
    colour_close,
    eventually,
    scan_memory,
)
from tests.conftest import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

BOT_COLOUR = (200, 40, 200)


async def _frames_decoded(viewer: BrowserPeer, sender_id: str, kind: str = "video") -> int:
    entry = await viewer.inbound(sender_id, kind)
    if entry is None:
        return 0
    return int(entry["framesDecoded"] or 0) if kind == "video" else int(entry["packetsReceived"])


async def _decoding(
    viewer: BrowserPeer, sender_id: str, frames: int = 15, within: float = 20
) -> int:
    """Wait until `viewer` has decoded `frames` more video frames of `sender_id`."""
    start = await _frames_decoded(viewer, sender_id)

    async def grown() -> int:
        now = await _frames_decoded(viewer, sender_id)
        return now if now >= start + frames else 0

    return int(
        await eventually(grown, within, f"{viewer.name} decoding {frames} frames of {sender_id}")
    )


async def _colours_match(viewer: BrowserPeer, sender: BrowserPeer, sender_id: str) -> None:
    """The sender's local preview and the viewer's rendering of it agree, quadrant by quadrant,
    and both show the fake camera's colours."""
    local = await sender.sample("local")
    remote = await viewer.sample(sender_id)
    assert local is not None, "no local preview"
    assert remote is not None, f"{viewer.name} shows no video of {sender_id}"
    for expected, mine, theirs in zip(
        QUADRANTS, local["quadrants"], remote["quadrants"], strict=True
    ):
        assert colour_close(mine, expected, 25), (local, expected)
        # Decrypted VP8 of flat colours comes back within a few levels; ciphertext decoded as
        # VP8 would be grey-ish noise (about 130-150 per channel).
        assert colour_close(theirs, mine, 12), (remote, local)


async def _status(viewer: BrowserPeer, sender_id: str, status: str) -> dict[str, Any]:
    """Wait for `viewer`'s decrypt status of `sender_id` (the worker reports once a second)."""

    async def reached() -> dict[str, Any] | None:
        peer = (await viewer.peers()).get(sender_id)
        return peer if peer is not None and peer["status"] == status else None

    return dict(await eventually(reached, 10, f"{viewer.name}: {sender_id} {status}"))


async def _banner(peer: BrowserPeer, participant: str) -> str:
    selector = f'.tile[data-participant="{participant}"] .banner'
    element = await peer.page.query_selector(selector)
    if element is None or not await element.is_visible():
        return ""
    return str(await element.text_content())


# --- a. two browsers --------------------------------------------------------------------------


async def test_two_browsers_decrypt_each_other(call: Call) -> None:
    for viewer, sender, sender_id in (
        (call.alice, call.bob, call.bob_id),
        (call.bob, call.alice, call.alice_id),
    ):
        await _decoding(viewer, sender_id)

        async def audio_flowing(v: BrowserPeer = viewer, s: str = sender_id) -> Any:
            # Counted over time, not read once: a busy machine may not have 20 packets yet.
            entry = await v.inbound(s, "audio")
            return entry if entry is not None and entry["packetsReceived"] > 20 else None

        audio = await eventually(audio_flowing, 10, f"{viewer.name}: audio of {sender_id}")
        assert audio["codec"] == "audio/opus"
        video = await viewer.inbound(sender_id, "video")
        assert video is not None
        assert video["codec"] == "video/VP8"
        await _colours_match(viewer, sender, sender_id)

        await _status(viewer, sender_id, "ok")

        async def opened(v: BrowserPeer = viewer, s: str = sender_id) -> dict[str, Any] | None:
            # The worker reports once a second: "ok" can come with fewer frames counted.
            peer = (await v.peers()).get(s)
            return peer if peer is not None and peer["counts"]["ok"] > 20 else None

        peer = await eventually(opened, 10, f"{viewer.name} opening 20 frames of {sender_id}")
        assert peer["verified"], peer
        assert peer["rejected"] is None, peer
        assert peer["counts"]["authFailed"] == peer["counts"]["malformed"] == 0, peer
        assert await _banner(viewer, sender_id) == ""

    # Both transform APIs are in use, so this also shows they interoperate.
    assert await call.alice.eval("() => window.blindfoldTest.transformApi") == "script"
    assert await call.bob.eval("() => window.blindfoldTest.transformApi") == "streams"
    # Every frame each one sent was encrypted: nothing went out under no key.
    stats = await call.alice.stats()
    assert stats["e2ee"]["totals"]["encrypt"]["ok"] > 50
    assert stats["e2ee"]["totals"]["encrypt"]["unsupported"] == 0
    # The page runs under the server's strict CSP without a single refusal or uncaught error.
    for peer in (call.alice, call.bob):
        assert peer.problems() == [], peer.log()


# --- e. active speaker -------------------------------------------------------------------------


async def test_active_speaker_follows_sound(call: Call) -> None:
    async def speaker_is(peer: BrowserPeer, who: str | None) -> bool:
        speakers = await peer.eval("() => window.blindfoldTest.speakers()")
        return (speakers[0] if speakers else None) == who

    # Alice's microphone plays a tone, Bob's is silent. Alice joined first, so her page saw
    # her become the speaker. (Bob joined after that change and is not told the current
    # speaker: the server sends active_speaker only on changes.)
    await eventually(lambda: speaker_is(call.alice, call.alice_id), 15, "Alice as speaker")

    # Alice mutes: her track now sends silence, and the speaker goes away for everyone.
    await call.alice.eval("() => window.blindfoldTest.setMuted('audio', true)")
    for peer in (call.alice, call.bob):
        await eventually(lambda p=peer: speaker_is(p, None), 10, "silence after Alice muted")
    badge = f'.tile[data-participant="{call.alice_id}"] .mic-muted'
    await call.bob.page.wait_for_selector(badge, state="visible", timeout=5000)

    # She unmutes: the tone makes her the speaker again, shown on her tile.
    await call.alice.eval("() => window.blindfoldTest.setMuted('audio', false)")
    for peer in (call.alice, call.bob):
        await eventually(lambda p=peer: speaker_is(p, call.alice_id), 10, "Alice speaking again")
    await call.bob.page.wait_for_selector(badge, state="hidden", timeout=5000)
    tile = f'.tile.speaking[data-participant="{call.alice_id}"]'
    await call.bob.page.wait_for_selector(tile, timeout=5000)
    await call.alice.page.wait_for_selector("#local-tile.speaking", timeout=5000)

    # Silent Bob never led the list.
    for peer in (call.alice, call.bob):
        events = await peer.eval("() => window.blindfoldTest.events()")
        leaders = {
            e["speakers"][0] for e in events if e["type"] == "active_speaker" and e["speakers"]
        }
        assert leaders == {call.alice_id}, events


# --- b. the wrong passphrase -----------------------------------------------------------------


async def test_wrong_passphrase_receives_but_cannot_decrypt(call: Call) -> None:
    alice_keys = len(await call.alice.send_keys())
    carol = await call.launch("Carol", video=call.media.quadrants, audio=call.media.silence)
    carol_id = (await carol.join(call.server.base, call.room, secrets.token_urlsafe(16)))["id"]

    async def packets_flowing() -> dict[str, Any] | None:
        entry = await carol.inbound(call.alice_id, "video")
        return entry if entry is not None and entry["packetsReceived"] > 40 else None

    await eventually(packets_flowing, 20, "Alice's packets reaching Carol")
    for sender_id in (call.alice_id, call.bob_id):

        async def cannot_decrypt(s: str = sender_id) -> bool:
            # The "could not be verified" banner may show first: the key exchange fails
            # before enough frames have failed to open for the decrypt status to turn.
            return "Cannot decrypt" in await _banner(carol, s)

        await eventually(cannot_decrypt, 10, f"Carol's cannot-decrypt banner for {sender_id}")
        video = await carol.inbound(sender_id, "video")
        assert video is not None
        assert video["packetsReceived"] > 20
        assert video["framesDecoded"] == 0, video
        peer = (await carol.peers())[sender_id]
        assert peer["rejected"] == "unverified", peer
        assert not peer["verified"], peer
        assert peer["status"] == "cannot-decrypt", peer
        assert peer["counts"]["ok"] == 0, peer

    # Nothing reached Carol's decoder for audio either (Opus would decode ciphertext as noise).
    async def unknown_kids() -> Any:
        stats = await carol.stats()
        return stats if stats["e2ee"]["totals"]["decrypt"]["unknownKid"] > 20 else None

    carol_stats = await eventually(unknown_kids, 10, "Carol counting frames under unknown KIDs")
    assert carol_stats["e2ee"]["totals"]["decrypt"]["ok"] == 0

    # The others see Carol as unverified and cannot decrypt her either...
    await eventually(lambda: _banner(call.alice, carol_id), 10, "Alice's banner for Carol")
    peer = (await call.alice.peers())[carol_id]
    assert peer["rejected"] == "unverified", peer
    assert peer["status"] == "cannot-decrypt", peer
    # ...and keep decoding each other.
    await _decoding(call.alice, call.bob_id, frames=10)
    await _decoding(call.bob, call.alice_id, frames=10)
    await call.collect_keys(carol)

    await carol.leave()
    await carol.close()
    await asyncio.sleep(1.5)
    # Carol never held Alice's key, so her leaving is no reason to rotate.
    assert len(await call.alice.send_keys()) == alice_keys


# --- c. a Python participant -----------------------------------------------------------------


class Bot:
    """A room participant on aiortc with the same key exchange and frame format."""

    def __init__(self, call: Call) -> None:
        from sfu.client.e2ee import E2eeConfig, E2eeContext

        self.call = call
        self.context = E2eeContext(E2eeConfig())
        self.kx: Any = None
        self.client: Any = None
        self.backlog: list[dict[str, Any]] = []
        self.outbox: asyncio.Queue[tuple[str | None, str]] = asyncio.Queue()
        self.frames: dict[str, int] = {"audio": 0, "video": 0}
        self.last_video: np.ndarray | None = None
        self.rejected: list[tuple[str, str]] = []
        self.keys: dict[str, bytes] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> str:
        from sfu.client.keyexchange import KeyExchange
        from sfu.client.room import RoomClient
        from tests.media.harness import ColourTrack, ToneTrack

        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.call.server.base}/dev/token",
                json={"room": self.call.room, "identity": "bot", "name": "Bot"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            token = (await response.json())["token"]
        self.client = RoomClient(
            self.call.server.base,
            token,
            name="Bot",
            e2ee=self.context,
            on_event=self.on_event,
            on_track=self.on_track,
        )
        joined = await self.client.connect()
        me = joined["participant"]

        def on_send_key(kid: int, key: bytes) -> None:
            self.keys[f"bot send {kid:#x}"] = key
            self.context.set_send_key(kid, key)

        def on_key(sender: str, kid: int, key: bytes) -> None:
            self.keys[f"bot receive {kid:#x}"] = key
            self.context.add_receive_key(kid, key)

        self.kx = KeyExchange(
            self.call.room,
            me["id"],
            self.call.passphrase,
            lambda to, payload: self.outbox.put_nowait((to, payload)),
            on_key,
            lambda peer, reason: self.rejected.append((peer, reason)),
            slot=me["slot"],
            on_send_key=on_send_key,
            on_key_removed=lambda _sender, kid: self.context.remove_receive_key(kid),
        )
        self.tasks.append(asyncio.create_task(self.send_relay()))
        for participant in joined["participants"]:
            if participant.get("kind") == "rtc":
                self.kx.peer_joined(participant["id"])
        self.kx.start()  # PBKDF2, then our key and a broadcast hello
        for message in self.backlog:
            self.on_event(message)
        self.backlog.clear()
        await self.client.publish([ColourTrack(BOT_COLOUR, size=(320, 240)), ToneTrack()])
        return str(me["id"])

    async def send_relay(self) -> None:
        # One sender task keeps relay messages in order (a key follows its hello).
        while True:
            to, payload = await self.outbox.get()
            with contextlib.suppress(Exception):
                await self.client.relay(payload, to)

    def on_event(self, message: dict[str, Any]) -> None:
        if self.kx is None:
            self.backlog.append(message)
            return
        kind = message.get("type")
        if kind == "relay":
            self.kx.on_relay(message["from"], message["payload"])
        elif kind == "participant_joined" and message["participant"].get("kind") == "rtc":
            self.kx.peer_joined(message["participant"]["id"])
        elif kind == "participant_left":
            self.kx.peer_left(message["participant"])

    def on_track(self, track: Any, _transceiver: Any) -> None:
        async def consume() -> None:
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                self.frames[track.kind] += 1
                if track.kind == "video":
                    self.last_video = frame.to_ndarray(format="rgb24")

        self.tasks.append(asyncio.create_task(consume()))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.leave()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _quadrant_means(image: np.ndarray) -> list[list[int]]:
    h, w = image.shape[:2]
    out = []
    for qy in (0, 1):
        for qx in (0, 1):
            y0, x0 = qy * h // 2 + h // 8, qx * w // 2 + w // 8
            region = image[y0 : y0 + h // 4, x0 : x0 + w // 4]
            out.append([round(float(v)) for v in region.reshape(-1, 3).mean(axis=0)])
    return out


async def test_python_bot_and_browser_exchange_media(
    call: Call, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aioice.ice

    # aioice leaves 127.0.0.1 out of its host candidates; the SFU announces only that.
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    )
    alice_keys = len(await call.alice.send_keys())
    bot = Bot(call)
    try:
        bot_id = await bot.start()
        # Browser side: the bot's VP8 and Opus frames decrypt and decode, in its colour.
        await eventually(
            lambda: _frames_decoded(call.alice, bot_id), 20, "Alice decoding the bot's video"
        )
        await _decoding(call.alice, bot_id, frames=10)
        sample = await call.alice.sample(bot_id)
        assert sample is not None
        for quadrant in sample["quadrants"]:
            assert colour_close(quadrant, BOT_COLOUR, 20), sample
        peer = await _status(call.alice, bot_id, "ok")
        assert peer["verified"], peer
        assert peer["counts"]["authFailed"] == 0, peer

        async def bot_audio_opens() -> bool:
            stats = await call.alice.stats()
            streams = [
                x
                for x in stats["e2ee"]["streams"]
                if x["peerId"] == bot_id and x["kind"] == "audio"
            ]
            return bool(streams) and streams[0]["ok"] > 20 and streams[0]["authFailed"] == 0

        await eventually(bot_audio_opens, 10, "Alice opening the bot's Opus frames")

        # Python side: the browsers' frames open under the keys it received, and decode.
        async def bot_decoding() -> bool:
            return bot.frames["video"] > 20 and bot.frames["audio"] > 20

        try:
            await eventually(bot_decoding, 20, "the bot decoding browser media")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {bot.frames}, {bot.context.counters}") from None
        counters = bot.context.counters
        assert counters.frames_unprotected > 40, counters
        assert counters.auth_failures == 0, counters
        assert bot.rejected == []
        assert bot.last_video is not None
        # The bot receives Alice and Bob; both send the quadrant clip.
        for expected, seen in zip(QUADRANTS, _quadrant_means(bot.last_video), strict=True):
            assert colour_close(seen, expected, 25), (seen, expected)
    finally:
        await bot.stop()
        call.keys.update(bot.keys)

    # The bot held Alice's key: its leaving makes her rotate.
    async def rotated() -> bool:
        return len(await call.alice.send_keys()) > alice_keys

    await eventually(rotated, 10, "Alice rotating after the bot left")


# --- d. rotation on leave -------------------------------------------------------------------


async def test_leaving_rotates_keys_and_the_rest_keep_decoding(call: Call) -> None:
    dave = await call.launch("Dave", video=call.media.quadrants, audio=call.media.silence)
    dave_id = (await dave.join(call.server.base, call.room, call.passphrase))["id"]
    for peer in (call.alice, call.bob):

        async def verified(p: BrowserPeer = peer) -> bool:
            return bool((await p.peers()).get(dave_id, {}).get("verified"))

        await eventually(verified, 10, f"{peer.name} verifying Dave")
    await _decoding(dave, call.alice_id, frames=5)
    before = {p.name: await p.send_keys() for p in (call.alice, call.bob)}
    await call.collect_keys(dave)

    await dave.leave()
    await dave.close()

    # Each of them starts a new key generation (KID = slot << 4 | generation)...
    new_kids: dict[str, str] = {}
    for peer, pid in ((call.alice, call.alice_id), (call.bob, call.bob_id)):
        old = before[peer.name][-1]

        async def next_generation(p: BrowserPeer = peer, last: dict[str, Any] = old) -> Any:
            keys = await p.send_keys()
            return keys[-1] if keys[-1]["generation"] > last["generation"] else None

        latest = await eventually(next_generation, 10, f"{peer.name} rotating")
        assert latest["generation"] == old["generation"] + 1
        slot = int(old["kid"], 16) >> 4
        assert int(latest["kid"], 16) == (slot << 4) | (latest["generation"] % 16)
        new_kids[pid] = latest["kid"]

    # ...and the other one decrypts frames under it.
    for viewer, sender_id in ((call.alice, call.bob_id), (call.bob, call.alice_id)):

        async def on_new_key(v: BrowserPeer = viewer, s: str = sender_id) -> bool:
            stats = await v.stats()
            streams = [
                x for x in stats["e2ee"]["streams"] if x["peerId"] == s and x["kind"] == "video"
            ]
            return any(x["lastKid"] == new_kids[s] for x in streams)

        await eventually(on_new_key, 10, f"{viewer.name} receiving frames under the new key")
        await _decoding(viewer, sender_id, frames=10)
        peer = (await viewer.peers())[sender_id]
        assert new_kids[sender_id] in peer["kids"]
        assert peer["status"] == "ok", peer
        assert peer["counts"]["authFailed"] == 0, peer
        await _colours_match(
            viewer, call.alice if sender_id == call.alice_id else call.bob, sender_id
        )


# --- resuming after the socket dropped ------------------------------------------------------


async def test_dropped_socket_resumes_without_interrupting_media(call: Call) -> None:
    await call.bob.eval("() => window.blindfoldTest.dropConnection()")

    async def resumed() -> bool:
        events = await call.bob.eval("() => window.blindfoldTest.events()")
        return any(e["type"] == "joined" and e["resumed"] for e in events)

    await eventually(resumed, 15, "Bob resuming")
    assert await call.bob.eval("() => window.blindfoldTest.state") == "connected"
    assert (await call.bob.eval("() => window.blindfoldTest.self"))["id"] == call.bob_id
    # Media never stopped, keys still agree, and nobody saw Bob leave.
    await _decoding(call.alice, call.bob_id, frames=10)
    await _decoding(call.bob, call.alice_id, frames=10)
    events = await call.alice.eval("() => window.blindfoldTest.events()")
    assert not any(
        e["type"] == "participant_left" and e["participant"] == call.bob_id for e in events
    )
    # The room socket works again: a mute reaches Alice.
    await call.bob.eval("() => window.blindfoldTest.setMuted('video', true)")
    await call.alice.page.wait_for_selector(
        f'.tile[data-participant="{call.bob_id}"] .placeholder', state="visible", timeout=5000
    )
    await call.bob.eval("() => window.blindfoldTest.setMuted('video', false)")
    await call.alice.page.wait_for_selector(
        f'.tile[data-participant="{call.bob_id}"] .placeholder', state="hidden", timeout=5000
    )


# --- f. the SFU never holds a media key ------------------------------------------------------


async def test_sfu_memory_holds_no_media_key(call: Call) -> None:
    await call.collect_keys()
    keys = dict(call.keys)
    # Alice's and Bob's own generations, each other's, Dave's and the bot's, Carol's.
    assert len(keys) >= 8, sorted(keys)
    assert all(len(k) == 16 for k in keys.values())
    pid = call.server.proc.pid
    assert call.server.proc.poll() is None, "the SFU died"
    markers = {
        # Things the server certainly holds: they prove the scanner reads its heap.
        "marker: room name": call.room.encode(),
        "marker: participant id": call.alice_id.encode(),
    }
    secrets_ = {**keys, "passphrase": call.passphrase.encode()}
    try:
        hits, scanned = await asyncio.to_thread(scan_memory, pid, {**markers, **secrets_})
    except PermissionError as exc:
        unavailable(f"cannot read /proc/{pid}/mem: {exc}")
        return
    assert scanned > 10 << 20, f"scanned only {scanned} bytes"
    for name in markers:
        assert hits[name] > 0, f"the scanner did not find {name}: {json.dumps(hits)}"
    print(f"scanned {scanned >> 20} MiB of the SFU for {len(keys)} keys: {json.dumps(hits)}")
    leaked = {name: n for name, n in hits.items() if name in secrets_ and n > 0}
    assert leaked == {}, f"media keys found in the SFU's memory: {leaked}"
    for peer in (call.alice, call.bob):
        assert peer.problems() == [], peer.log()
