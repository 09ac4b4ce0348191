"""A room participant in Python, on aiortc: the room protocol of docs/protocol.md.

Two peer connections, as the protocol defines them: one this client offers to publish, one
the SFU offers (and renegotiates) to deliver every other participant's tracks. Events from the
server arrive on `events` (an asyncio.Queue of dicts) and through `on_event`; E2EE key
messages travel through `relay()` and come back as `relay` events. With an E2eeContext, every
published frame is protected and every received one unprotected (sfu/client/e2ee.py).
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

from sfu.client.e2ee import E2eeContext
from sfu.client.whip import prefer_offered_codecs

EventCallback = Callable[[dict[str, Any]], None]
TrackCallback = Callable[[MediaStreamTrack, RTCRtpTransceiver], None]


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
    ) -> None:
        self.base_url = base_url.rstrip("/")
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
        self._ws = await self._http.ws_connect(url)
        join: dict[str, Any] = {"type": "join", "version": 1, "token": self.token}
        if self.name:
            join["name"] = self.name
        if resume:
            join["resume"] = self.resume_token
        else:
            join["subscribe"] = self.subscribe_to
        await self._ws.send_str(json.dumps(join))
        first = await self._ws.receive(timeout=10)
        if first.type is not aiohttp.WSMsgType.TEXT:
            raise RoomError("closed", "the server closed the socket during join")
        message: dict[str, Any] = json.loads(first.data)
        if message.get("type") == "error":
            raise RoomError(message["code"], message["message"])
        self.joined = message
        self.participant_id = message["participant"]["id"]
        self.resume_token = message["resume_token"]
        self._reader = asyncio.create_task(self._read(self._ws))
        return message

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

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, tracks: Sequence[MediaStreamTrack]) -> list[RTCRtpTransceiver]:
        """Publish `tracks` on the publisher connection (offer → publish_answer)."""
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
        async with self._subscriber_lock:
            await self.subscriber.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            if self.e2ee is not None:
                for transceiver in self.subscriber.getTransceivers():
                    receiver = transceiver.receiver
                    if getattr(receiver, "_blindfold_e2ee", False):
                        continue
                    self.e2ee.attach_receiver(receiver)
                    receiver._blindfold_e2ee = True  # type: ignore[attr-defined]
            await self.subscriber.setLocalDescription(await self.subscriber.createAnswer())
            await self.send(
                {"type": "subscribe_answer", "sdp": self.subscriber.localDescription.sdp}
            )

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
