"""Publish with WHIP (RFC 9725) and subscribe with WHEP (draft-ietf-wish-whep) over aiortc.

Both are one HTTP exchange: POST an SDP offer (``Content-Type: application/sdp``, bearer
token), get ``201 Created`` with the SDP answer and a ``Location`` for the session, and
DELETE that location to end it. ICE is gathered completely before the POST (aiortc's
``setLocalDescription`` does that), so no trickle ICE (PATCH) is needed. A non-201 answer
raises :class:`WhipError` with the server's problem+json fields.

Only Opus and VP8 are offered (with aiortc's RTX and rtcp-fb for VP8): those are the codecs
the SFU forwards and the only ones with an E2EE clear-prefix rule (``docs/e2ee.md`` §3).
With an :class:`~sfu.client.e2ee.E2eeConfig`, every frame is protected before it leaves and
unprotected after it arrives (``sfu/client/e2ee.py``); the keys never go to the server.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from yarl import URL

from sfu.client.e2ee import E2eeConfig, E2eeContext

__all__ = [
    "OFFERED_CODECS",
    "Publication",
    "Subscription",
    "WhipError",
    "prefer_offered_codecs",
    "publish",
    "subscribe",
]

# MIME types offered per kind, in order of preference; RTX follows the codec it repairs.
OFFERED_CODECS: dict[str, tuple[str, ...]] = {
    "audio": ("audio/opus",),
    "video": ("video/vp8", "video/rtx"),
}

SDP_TYPE = "application/sdp"
DEFAULT_TIMEOUT = 10.0

IceServers = Sequence[RTCIceServer | str] | None
TrackCallback = Callable[[MediaStreamTrack], None]


class WhipError(Exception):
    """The WHIP/WHEP endpoint refused (or answered outside the protocol).

    ``status`` is the HTTP status; ``code``, ``detail``, ``title`` and ``type`` come from an
    RFC 9457 problem+json body when there is one (``problem`` holds all of it).
    """

    def __init__(
        self,
        status: int,
        *,
        code: str | None = None,
        detail: str | None = None,
        title: str | None = None,
        type: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title
        self.type = type
        self.problem = problem or {}
        parts = [str(status)]
        if code:
            parts.append(code)
        super().__init__(": ".join([" ".join(parts), detail or title or "request failed"]))

    @classmethod
    def from_response(cls, status: int, content_type: str, body: bytes) -> WhipError:
        text = body.decode("utf-8", "replace").strip()
        problem: dict[str, Any] = {}
        if "json" in content_type:
            with contextlib.suppress(ValueError):
                parsed = json.loads(text)
                if isinstance(parsed, dict):
                    problem = parsed

        def member(name: str) -> str | None:
            value = problem.get(name)
            return value if isinstance(value, str) else None

        return cls(
            status,
            code=member("code"),
            detail=member("detail") or (None if problem else text[:500] or None),
            title=member("title"),
            type=member("type"),
            problem=problem,
        )


def _ice_configuration(ice_servers: IceServers) -> RTCConfiguration:
    # None means none at all: aiortc would otherwise add a public STUN server, which a client
    # of an SFU on a reachable address does not need and which stalls gathering when offline.
    servers = [RTCIceServer(urls=s) if isinstance(s, str) else s for s in ice_servers or ()]
    return RTCConfiguration(iceServers=servers)


def prefer_offered_codecs(transceiver: RTCRtpTransceiver) -> None:
    """Limit ``transceiver`` to :data:`OFFERED_CODECS` (aiortc keeps VP8's RTX and rtcp-fb)."""
    wanted = OFFERED_CODECS[transceiver.kind]
    capabilities = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    preferred = [c for c in capabilities if c.mimeType.lower() in wanted]
    preferred.sort(key=lambda c: wanted.index(c.mimeType.lower()))
    transceiver.setCodecPreferences(preferred)


class _Session:
    """An established WHIP or WHEP session: the peer connection and its HTTP resource."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        resource_url: URL,
        token: str,
        http: aiohttp.ClientSession,
        owns_http: bool,
        e2ee: E2eeContext | None,
    ) -> None:
        self.pc = pc
        self.resource_url = resource_url
        self.e2ee = e2ee
        self._token = token
        self._http = http
        self._owns_http = owns_http
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """DELETE the session resource, then close the peer connection (both always run).

        Raises :class:`WhipError` if the server answers the DELETE with a non-2xx status.
        """
        if self._closed:
            return
        self._closed = True
        error: WhipError | None = None
        try:
            async with self._http.delete(self.resource_url, headers=_auth(self._token)) as response:
                body = await response.read()
                if not 200 <= response.status < 300:
                    error = WhipError.from_response(response.status, response.content_type, body)
        finally:
            await self.pc.close()
            if self._owns_http:
                await self._http.close()
        if error is not None:
            raise error

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Publication(_Session):
    """A WHIP session sending ``tracks``; ``e2ee.counters`` counts protected frames."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        resource_url: URL,
        token: str,
        http: aiohttp.ClientSession,
        owns_http: bool,
        e2ee: E2eeContext | None,
        senders: list[RTCRtpSender],
    ) -> None:
        super().__init__(pc, resource_url, token, http, owns_http, e2ee)
        self.senders = senders


class Subscription(_Session):
    """A WHEP session receiving audio and video; ``tracks`` fills as they arrive."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        resource_url: URL,
        token: str,
        http: aiohttp.ClientSession,
        owns_http: bool,
        e2ee: E2eeContext | None,
        tracks: list[MediaStreamTrack],
    ) -> None:
        super().__init__(pc, resource_url, token, http, owns_http, e2ee)
        self.tracks = tracks


# Redirects followed per POST (a cluster sends a request on to the room's node once).
MAX_REDIRECTS = 3


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _offer_answer(
    pc: RTCPeerConnection,
    url: str,
    token: str,
    http: aiohttp.ClientSession,
) -> URL:
    """Gather, POST the offer, apply the answer; return the session resource URL."""
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    headers = {**_auth(token), "Content-Type": SDP_TYPE, "Accept": SDP_TYPE}
    endpoint = URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        # Redirects are followed here, not by aiohttp: it drops Authorization when the
        # redirect leaves the origin, which a cluster node sending the client to the room's
        # node always does (the token is for the whole deployment).
        async with http.post(
            endpoint, data=offer.encode(), headers=headers, allow_redirects=False
        ) as response:
            body = await response.read()
            target = response.headers.get("Location")
            if response.status in (307, 308) and target:
                endpoint = endpoint.join(URL(target))
                continue
            if response.status != 201:
                raise WhipError.from_response(response.status, response.content_type, body)
            if not target:
                raise WhipError(
                    response.status, code="missing_location", detail="201 without Location"
                )
            break
    else:
        raise WhipError(307, code="too_many_redirects", detail=f"over {MAX_REDIRECTS} redirects")
    # RFC 9725 section 4.2: a relative Location is resolved against the endpoint URL (after
    # redirects, the one that answered).
    resource = endpoint.join(URL(target))
    answer = body.decode("utf-8", "replace")
    try:
        if not answer.strip():
            raise WhipError(201, code="empty_answer", detail="201 without an SDP answer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    except Exception:
        with contextlib.suppress(Exception):
            async with http.delete(resource, headers=_auth(token)):
                pass
        raise
    return resource


def _http_session(
    session: aiohttp.ClientSession | None, http_timeout: float
) -> tuple[aiohttp.ClientSession, bool]:
    if session is not None:
        return session, False
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=http_timeout)), True


async def publish(
    url: str,
    token: str,
    tracks: Sequence[MediaStreamTrack],
    e2ee: E2eeConfig | None,
    ice_servers: IceServers = None,
    *,
    session: aiohttp.ClientSession | None = None,
    http_timeout: float = DEFAULT_TIMEOUT,
) -> Publication:
    """Publish ``tracks`` (send-only) to the WHIP endpoint ``url``.

    With ``e2ee``, every frame is SFrame-protected under ``e2ee.send_kid``/``send_key``
    before packetisation. ``ice_servers``: STUN/TURN URLs or ``RTCIceServer`` objects; ``None``
    means host candidates only. ``session``: an aiohttp session to use (left open);
    ``http_timeout``: seconds per HTTP exchange when this function makes its own session.
    """
    if not tracks:
        raise ValueError("publish needs at least one track")
    if e2ee is not None and not e2ee.can_send:
        raise ValueError("E2eeConfig for publishing needs send_kid and send_key")
    context = E2eeContext(e2ee) if e2ee is not None else None
    pc = RTCPeerConnection(_ice_configuration(ice_servers))
    http, owns_http = _http_session(session, http_timeout)
    try:
        senders = []
        for track in tracks:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            prefer_offered_codecs(transceiver)
            if context is not None:
                context.attach_sender(transceiver.sender)
            senders.append(transceiver.sender)
        resource = await _offer_answer(pc, url, token, http)
    except BaseException:
        await pc.close()
        if owns_http:
            await http.close()
        raise
    return Publication(pc, resource, token, http, owns_http, context, senders)


async def subscribe(
    url: str,
    token: str,
    e2ee: E2eeConfig | None = None,
    on_track: TrackCallback | None = None,
    ice_servers: IceServers = None,
    *,
    session: aiohttp.ClientSession | None = None,
    http_timeout: float = DEFAULT_TIMEOUT,
) -> Subscription:
    """Subscribe to the WHEP endpoint ``url`` with a receive-only audio + video offer.

    With ``e2ee``, every received frame is unprotected with ``e2ee.receive_keys`` before the
    decoder; frames that do not authenticate are dropped and counted. ``on_track`` is called
    with each remote track as it is negotiated (also collected in ``Subscription.tracks``).
    ``ice_servers``, ``session`` and ``http_timeout`` are as for :func:`publish`.
    """
    context = E2eeContext(e2ee) if e2ee is not None else None
    pc = RTCPeerConnection(_ice_configuration(ice_servers))
    http, owns_http = _http_session(session, http_timeout)
    tracks: list[MediaStreamTrack] = []

    def track_added(track: MediaStreamTrack) -> None:
        tracks.append(track)
        if on_track is not None:
            on_track(track)

    pc.on("track", track_added)
    try:
        for kind in ("audio", "video"):
            transceiver = pc.addTransceiver(kind, direction="recvonly")
            prefer_offered_codecs(transceiver)
            if context is not None:
                context.attach_receiver(transceiver.receiver)
        resource = await _offer_answer(pc, url, token, http)
    except BaseException:
        await pc.close()
        if owns_http:
            await http.close()
        raise
    return Subscription(pc, resource, token, http, owns_http, context, tracks)
