"""A room participant in Python, on aiortc: the room protocol of docs/protocol.md.

Two peer connections, as the protocol defines them: one this client offers to publish, one
the SFU offers (and renegotiates) to deliver every other participant's tracks. Events from the
server arrive on `events` (an asyncio.Queue of dicts) and through `on_event`; E2EE key
messages travel through `relay()` and come back as `relay` events. With an E2eeContext, every
published frame is protected and every received one unprotected (sfu/client/e2ee.py).

A `redirect` answer to a join (a cluster node sending the client to the room's node) is
followed. With `auto_rejoin`, a client whose media transport closed (`transport_closed`: a
media worker or relay went away) or whose socket dropped and could not be resumed (its node
died) joins again by itself, through its URL, then `fallback_urls` and the other nodes the
cluster named in `joined` in turn, republishes the same tracks and takes a fresh receiving
connection; it then reports a `rejoined` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay

from sfu.client.e2ee import E2eeContext
from sfu.client.whip import prefer_offered_codecs

EventCallback = Callable[[dict[str, Any]], None]
TrackCallback = Callable[[MediaStreamTrack, RTCRtpTransceiver], None]


# Redirects followed per join (a room moves at most once between two looks at Redis).
MAX_REDIRECTS = 3
# Between rejoin attempts while no node takes the join (a dead node's rooms are placed afresh
# within cluster.node_ttl, at most 5 s); the last delay repeats until REJOIN_FOR has passed.
REJOIN_DELAYS = (0.0, 0.25, 0.5)
REJOIN_FOR = 30.0


def _configuration() -> RTCConfiguration:
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


class RoomError(Exception):
    """The server refused (an `error` message with fatal set, or a failed join)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RoomClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        name: str | None = None,
        e2ee: E2eeContext | None = None,
        on_event: EventCallback | None = None,
        on_track: TrackCallback | None = None,
        subscribe: str | list[str] = "all",
        auto_rejoin: bool = False,
        fallback_urls: Sequence[str] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Where joins start (a redirect moves base_url to the room's node, not these).
        self.entry_urls = [self.base_url, *(u.rstrip("/") for u in fallback_urls)]
        self.auto_rejoin = auto_rejoin
        self.rejoins = 0
        self._published: list[MediaStreamTrack] = []
        self._leaving = False
        self._rejoining: asyncio.Task[None] | None = None
        self._relay: MediaRelay | None = None
        self.token = token
        self.name = name
        self.e2ee = e2ee
        self.on_event = on_event
        self.on_track = on_track
        self.subscribe_to = subscribe
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.joined: dict[str, Any] = {}
        self.participant_id = ""
        self.resume_token = ""
        self.publisher: RTCPeerConnection | None = None
        # max-bundle: with aiortc's default (balanced) a second section of one kind in an
        # offer stays on a transport aiortc then discards, and its packets are misrouted.
        self.subscriber = RTCPeerConnection(_configuration())
        self.subscriber.on("track", self._track)
        self.remote_tracks: list[MediaStreamTrack] = []
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscriber_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- connection --------------------------------------------------------------------------

    async def connect(self, resume: bool = False) -> dict[str, Any]:
        """Join the room (or resume after a dropped socket); returns the `joined` message."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        url = self.base_url.replace("http", "ws", 1) + "/rtc"
        join: dict[str, Any] = {"type": "join", "version": 1, "token": self.token}
        if self.name:
            join["name"] = self.name
        if resume:
            join["resume"] = self.resume_token
        else:
            join["subscribe"] = self.subscribe_to
        for _ in range(MAX_REDIRECTS + 1):
            self._ws = await self._http.ws_connect(url)
            await self._ws.send_str(json.dumps(join))
            first = await self._ws.receive(timeout=10)
            if first.type is not aiohttp.WSMsgType.TEXT:
                raise RoomError("closed", "the server closed the socket during join")
            message: dict[str, Any] = json.loads(first.data)
            if message.get("type") != "redirect":
                break
            await self._ws.close()
            url = str(message["url"])
            self.base_url = url.removesuffix("/rtc").replace("ws", "http", 1)
        else:
            raise RoomError("too_many_redirects", f"still redirected after {MAX_REDIRECTS}")
        if message.get("type") == "error":
            raise RoomError(message["code"], message["message"])
        self.joined = message
        self.participant_id = message["participant"]["id"]
        self.resume_token = message["resume_token"]
        self._learn_nodes(message.get("nodes"))
        self._reader = asyncio.create_task(self._read(self._ws))
        return message

    def _learn_nodes(self, nodes: Any) -> None:
        """A cluster's `joined` lists its other live nodes: rejoins may go there too, after
        the URLs the application gave (a node that has since died is merely one failed try)."""
        if not isinstance(nodes, list):
            return
        for url in nodes:
            if isinstance(url, str) and url.startswith(("ws://", "wss://")):
                base = url.removesuffix("/rtc").replace("ws", "http", 1).rstrip("/")
                if base not in self.entry_urls:
                    self.entry_urls.append(base)

    async def drop(self) -> None:
        """Lose the socket without leaving, as a network failure would: no close frame
        (a normal close means "I left" to the server), and media continues."""
        if self._ws is not None:
            # aiohttp has no public way to drop a connection without the closing handshake.
            conn = getattr(self._ws, "_conn", None)
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def leave(self) -> None:
        self._leaving = True
        if self._rejoining is not None:
            self._rejoining.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._rejoining
        with contextlib.suppress(Exception):
            await self.send({"type": "leave"})
        await self.drop()
        if self.publisher is not None:
            await self.publisher.close()
        await self.subscriber.close()
        if self._http is not None:
            await self._http.close()

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is None or self._ws.closed:
            raise RoomError("closed", "not connected")
        await self._ws.send_str(json.dumps(message))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await self._read_messages(ws)
        if self.auto_rejoin and not self._leaving and ws is self._ws:
            # The socket dropped under us (its node died, or the network): rejoin.
            self._start_rejoin("the socket closed")

    async def _read_messages(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            kind = message.get("type")
            if kind == "subscribe_offer":
                task = asyncio.create_task(self._answer(message["sdp"]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "publish_answer" or (
                kind == "error"
                and message.get("code")
                in (
                    "invalid_sdp",
                    "no_publish_grant",
                    "no_usable_media",
                    "too_many_tracks",
                )
            ):
                self._answers.put_nowait(message)
            self.events.put_nowait(message)
            if self.on_event is not None:
                self.on_event(message)
            if (
                kind == "error"
                and message.get("code") == "transport_closed"
                and self.auto_rejoin
                and not self._leaving
            ):
                self._start_rejoin(str(message.get("message")))

    # -- rejoining ---------------------------------------------------------------------------

    def _start_rejoin(self, why: str) -> None:
        if self._rejoining is None or self._rejoining.done():
            self._rejoining = asyncio.create_task(self._rejoin(why))

    async def _rejoin(self, why: str) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REJOIN_FOR
        attempt = 0
        error: Exception | None = None
        while not self._leaving and loop.time() < give_up:
            await asyncio.sleep(REJOIN_DELAYS[min(attempt, len(REJOIN_DELAYS) - 1)])
            url = self.entry_urls[attempt % len(self.entry_urls)]
            attempt += 1
            try:
                await self.rejoin(url)
            except (aiohttp.ClientError, OSError, RoomError, TimeoutError) as exc:
                error = exc
                continue
            message: dict[str, Any] = {"type": "rejoined", "reason": why, "node": self.base_url}
            self.events.put_nowait(message)
            if self.on_event is not None:
                self.on_event(message)
            return
        if not self._leaving:
            message = {
                "type": "error",
                "code": "rejoin_failed",
                "message": f"could not rejoin within {REJOIN_FOR:g} s: {error}",
                "fatal": True,
            }
            self.events.put_nowait(message)
            if self.on_event is not None:
                self.on_event(message)

    async def rejoin(self, url: str | None = None) -> dict[str, Any]:
        """Join afresh (at `url`, else where this client last joined), publish the same
        tracks again and take a new receiving connection; the old ones are dropped."""
        old_ws, self._ws = self._ws, None
        if old_ws is not None:
            with contextlib.suppress(Exception):
                await old_ws.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        for pc in (self.publisher, self.subscriber):
            if pc is not None:
                with contextlib.suppress(Exception):
                    await pc.close()
        self.publisher = None
        self.subscriber = RTCPeerConnection(_configuration())
        self.subscriber.on("track", self._track)
        if url is not None:
            self.base_url = url
        joined = await self.connect()
        if self._published:
            await self.publish(self._published)
        self.rejoins += 1
        return joined

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, tracks: Sequence[MediaStreamTrack]) -> list[RTCRtpTransceiver]:
        """Publish `tracks` on the publisher connection (offer → publish_answer)."""
        self._published = list(tracks)
        if self.auto_rejoin:
            # aiortc stops a sender's track when its connection closes: a rejoin could not
            # send the same tracks again. Each connection sends proxies of them instead.
            if self._relay is None:
                self._relay = MediaRelay()
            relay = self._relay
            tracks = [relay.subscribe(track, buffered=False) for track in tracks]
        self.publisher = RTCPeerConnection(_configuration())
        transceivers = []
        for track in tracks:
            transceiver = self.publisher.addTransceiver(track, direction="sendonly")
            prefer_offered_codecs(transceiver)
            if self.e2ee is not None:
                self.e2ee.attach_sender(transceiver.sender)
            transceivers.append(transceiver)
        await self.publisher.setLocalDescription(await self.publisher.createOffer())
        await self.send({"type": "publish_offer", "sdp": self.publisher.localDescription.sdp})
        answer = await asyncio.wait_for(self._answers.get(), timeout=10)
        if answer["type"] == "error":
            raise RoomError(answer["code"], answer["message"])
        await self.publisher.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return transceivers

    async def set_video_size(self, track: str, width: int, height: int) -> None:
        """Tell the SFU the size this participant shows `track` at: it then forwards no
        simulcast layer larger than needed (0, 0: no video for it). aiortc cannot send
        simulcast itself (one encoding per sender), but receives simulcast tracks as one
        ordinary stream."""
        await self.send({"type": "video_size", "track": track, "width": width, "height": height})

    async def relay(self, payload: str, to: str | None = None) -> None:
        message: dict[str, Any] = {"type": "relay", "payload": payload}
        if to is not None:
            message["to"] = to
        await self.send(message)

    # -- subscribing -------------------------------------------------------------------------

    async def _answer(self, sdp: str) -> None:
        subscriber = self.subscriber
        try:
            await self._answer_on(subscriber, sdp)
        except (aiohttp.ClientError, RoomError, ConnectionError):
            rejoining = self._rejoining is not None and not self._rejoining.done()
            if subscriber is self.subscriber and not rejoining:
                raise
            # The connection it answered for was replaced by a rejoin meanwhile.

    async def _answer_on(self, subscriber: RTCPeerConnection, sdp: str) -> None:
        async with self._subscriber_lock:
            await subscriber.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            if self.e2ee is not None:
                for transceiver in subscriber.getTransceivers():
                    receiver = transceiver.receiver
                    if getattr(receiver, "_blindfold_e2ee", False):
                        continue
                    self.e2ee.attach_receiver(receiver)
                    receiver._blindfold_e2ee = True  # type: ignore[attr-defined]
            await subscriber.setLocalDescription(await subscriber.createAnswer())
            await self.send({"type": "subscribe_answer", "sdp": subscriber.localDescription.sdp})

    def _track(self, track: MediaStreamTrack) -> None:
        self.remote_tracks.append(track)
        if self.on_track is not None:
            transceiver = next(
                (t for t in self.subscriber.getTransceivers() if t.receiver.track is track), None
            )
            if transceiver is not None:
                self.on_track(track, transceiver)

    async def next_event(self, kind: str, within: float = 10.0) -> dict[str, Any]:
        """Wait up to `within` seconds for the next event of `kind`, discarding others."""
        async with asyncio.timeout(within):
            while True:
                message = await self.events.get()
                if message.get("type") == kind:
                    return message
