"""Janus's HTTP/JSON API for the load generator: sessions, the VideoRoom plugin, SDP answers.

One `JanusSession` per generator process holds every handle of that process (one handle per
publisher and one per subscriber x publisher, so that each is its own PeerConnection, as each
WHIP/WHEP session is for Blindfold). Requests are POSTs; the replies of asynchronous requests
(join, joinandconfigure, start) come as events on the session's long poll, matched by
transaction. A keepalive every KEEPALIVE seconds holds the session past Janus's 60 s timeout.

The VideoRoom flow the bench uses (docs: https://janus.conf.meetecho.com/docs/videoroom):

- publisher: `joinandconfigure` (ptype publisher, our `id`) with our offer, `"e2ee": true` in
  the jsep; the `joined` event carries Janus's answer;
- subscriber: `join` (ptype subscriber, streams [{feed}]) -> an `attached` event with Janus's
  offer; we answer with `start` and our answer as jsep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import secrets
import urllib.request
from collections import Counter
from typing import Any

import aiohttp

from bench.loadgen_peer import Peer, Ssrcs, candidate_lines
from sfu.control import sdp

PLUGIN = "janus.plugin.videoroom"
KEEPALIVE = 20.0
REQUEST_TIMEOUT = 30.0
FEED_BASE = 1000  # publisher i joins as feed FEED_BASE + i, so subscribers know its id
_ids = itertools.count(1)


class JanusError(RuntimeError):
    """Janus answered a request with an error (core or plugin)."""


def transaction() -> str:
    return f"t{next(_ids)}-{secrets.token_hex(4)}"


def check_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply itself when it is not an error; JanusError with Janus's reason otherwise.

    A core error is `{"janus": "error", "error": {"code", "reason"}}`; a plugin error is a
    success or event whose `plugindata.data` has `error_code` and `error`.
    """
    kind = reply.get("janus")
    if kind == "error":
        error = reply.get("error") or {}
        raise JanusError(f"janus error {error.get('code')}: {error.get('reason')}")
    data = plugin_data(reply)
    if "error_code" in data or "error" in data:
        raise JanusError(f"videoroom error {data.get('error_code')}: {data.get('error')}")
    return reply


def plugin_data(reply: dict[str, Any]) -> dict[str, Any]:
    """`plugindata.data` of a plugin reply or event ({} when there is none)."""
    plugindata = reply.get("plugindata")
    if not isinstance(plugindata, dict):
        return {}
    data = plugindata.get("data")
    return data if isinstance(data, dict) else {}


def room_request(room: int, publishers: int) -> dict[str, Any]:
    """The VideoRoom `create` body: an E2EE-only room for `publishers` feeds, no bitrate cap."""
    return {
        "request": "create",
        "room": room,
        "description": "blindfold bench",
        "publishers": max(publishers, 1),
        "require_e2ee": True,
        "bitrate": 0,
        "fir_freq": 0,
        "audiocodec": "opus",
        "videocodec": "vp8",
        "notify_joining": False,
        "permanent": False,
    }


# -- SDP: our answer to Janus's subscriber offer ---------------------------------------------
#
# Janus's offer is parsed with the SFU's own parser (sfu.control.sdp); only the answer, which
# is the client's side of the negotiation, is built here.


def _wanted_codecs(section: sdp.MediaSection) -> list[sdp.Codec]:
    """The codec we send for this kind (VP8 / Opus) and the RTX that repairs it, if offered."""
    wanted = {"video": "vp8", "audio": "opus"}.get(section.kind)
    if wanted is None:
        return []
    codecs = section.codecs()
    main = [c for c in codecs if c.key == wanted]
    if not main:
        return []
    apt = f"apt={main[0].payload_type}"
    rtx = [c for c in codecs if c.key == sdp.RTX_CODEC and c.fmtp == apt]
    # No rtcp-fb accepted: the answer lists rtpmap and fmtp only.
    return [dataclasses.replace(c, rtcp_fb=[]) for c in main[:1] + rtx[:1]]


def build_answer(
    offer: str, *, ufrag: str, pwd: str, fingerprint: str, port: int
) -> tuple[str, list[str]]:
    """A recvonly, BUNDLEd answer to a subscriber offer, and the mids it accepted.

    One answer section per offered one: VP8 (+ its RTX) for video, Opus for audio, nothing
    else (so no header extensions and no data channel); sections we cannot take get port 0.
    We are the DTLS client (`setup:active`), our one host candidate is in the first section.
    SdpError (a ValueError) if the offer cannot be parsed or has nothing we can take.
    """
    sections = sdp.parse_sdp(offer).media
    wanted = [_wanted_codecs(s) if s.port != 0 else [] for s in sections]
    accepted = [s.mid or "" for s, codecs in zip(sections, wanted, strict=True) if codecs]
    if not accepted:
        raise sdp.SdpError("offer has no VP8 or Opus section")
    lines = ["v=0", f"o=- {secrets.randbits(62)} 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    lines.append("a=group:BUNDLE " + " ".join(accepted))
    lines.append("a=msid-semantic: WMS *")
    first = True
    for section, codecs in zip(sections, wanted, strict=True):
        if not codecs:
            lines += sdp.rejected_section(section)
            continue
        formats = " ".join(str(c.payload_type) for c in codecs)
        lines += [
            f"m={section.kind} 9 UDP/TLS/RTP/SAVPF {formats}",
            "c=IN IP4 0.0.0.0",
            f"a=ice-ufrag:{ufrag}",
            f"a=ice-pwd:{pwd}",
            f"a=fingerprint:{fingerprint}",
            "a=setup:active",
            f"a=mid:{section.mid or ''}",
            "a=recvonly",
            "a=rtcp-mux",
        ]
        lines += sdp.codec_lines(codecs)
        if first:
            lines += candidate_lines(port)
            first = False
    return sdp.render(lines), accepted


# -- the API ---------------------------------------------------------------------------------


def post_blocking(url: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One synchronous API request (for the orchestrating process, which has no loop)."""
    body = {**body, "transaction": transaction()}
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply: dict[str, Any] = json.loads(response.read())
    return check_reply(reply)


def create_room_blocking(url: str, room: int, publishers: int) -> None:
    """Create the bench's room from a short-lived session (rooms outlive their creator)."""
    session = post_blocking(url, {"janus": "create"})["data"]["id"]
    try:
        handle = post_blocking(f"{url}/{session}", {"janus": "attach", "plugin": PLUGIN})
        reply = post_blocking(
            f"{url}/{session}/{handle['data']['id']}",
            {"janus": "message", "body": room_request(room, publishers)},
        )
        if plugin_data(reply).get("videoroom") != "created":
            raise JanusError(f"unexpected reply to create: {reply}")
    finally:
        with contextlib.suppress(OSError, JanusError):
            post_blocking(f"{url}/{session}", {"janus": "destroy"})


class JanusSession:
    """One Janus session: attach handles, send plugin requests, receive their events."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.id: int | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Events nobody waits for, by kind (webrtcup, media, hangup, slowlink, ...): context
        # for the report; a hangup during the window means a PeerConnection went away.
        self.events: Counter[str] = Counter()
        self.hangups: list[str] = []
        self.closed = False

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with self.http.post(self.url + path, json=body, timeout=timeout) as response:
            reply: dict[str, Any] = await response.json(content_type=None)
        return reply

    async def create(self) -> None:
        reply = check_reply(await self._post("", {"janus": "create", "transaction": transaction()}))
        self.id = int(reply["data"]["id"])
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll()), loop.create_task(self._keepalive())]

    async def attach(self) -> int:
        body = {"janus": "attach", "plugin": PLUGIN, "transaction": transaction()}
        reply = check_reply(await self._post(f"/{self.id}", body))
        return int(reply["data"]["id"])

    async def message(
        self, handle: int, body: dict[str, Any], jsep: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(plugin data, jsep) of the reply: the synchronous `success`, or for an `ack` the
        event with the same transaction that the long poll delivers."""
        tid = transaction()
        request: dict[str, Any] = {"janus": "message", "body": body, "transaction": tid}
        if jsep is not None:
            request["jsep"] = jsep
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[tid] = waiter  # before the POST: the event may beat the ack
        try:
            reply = check_reply(await self._post(f"/{self.id}/{handle}", request))
            if reply.get("janus") == "ack":
                reply = check_reply(await asyncio.wait_for(waiter, REQUEST_TIMEOUT))
        finally:
            self._pending.pop(tid, None)
        return plugin_data(reply), reply.get("jsep")

    async def detach(self, handle: int) -> None:
        body = {"janus": "detach", "transaction": transaction()}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, JanusError):
            check_reply(await self._post(f"/{self.id}/{handle}", body))

    async def _poll(self) -> None:
        """Long poll: GET /janus/<session>?maxev=N returns a list of up to N events, or a
        keepalive after 30 s without any."""
        timeout = aiohttp.ClientTimeout(total=60)
        while not self.closed:
            try:
                async with self.http.get(
                    f"{self.url}/{self.id}", params={"maxev": "50"}, timeout=timeout
                ) as response:
                    payload = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                await asyncio.sleep(0.2)
                continue
            for event in payload if isinstance(payload, list) else [payload]:
                self._dispatch(event)

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = str(event.get("janus"))
        waiter = self._pending.get(str(event.get("transaction")))
        if waiter is not None and not waiter.done() and kind in ("event", "error"):
            waiter.set_result(event)
            return
        if kind == "keepalive":
            return
        self.events[kind] += 1
        if kind == "hangup":
            self.hangups.append(f"handle {event.get('sender')}: {event.get('reason')}")

    async def _keepalive(self) -> None:
        while not self.closed:
            await asyncio.sleep(KEEPALIVE)
            body = {"janus": "keepalive", "transaction": transaction()}
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                await self._post(f"/{self.id}", body)

    async def destroy(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.id is not None:
            body = {"janus": "destroy", "transaction": transaction()}
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                await asyncio.wait_for(self._post(f"/{self.id}", body), 5)


async def publish(session: JanusSession, room: int, index: int, offer: str) -> tuple[int, str]:
    """Join `room` as publisher FEED_BASE + index with `offer`; (handle, Janus's answer)."""
    handle = await session.attach()
    body = {
        "request": "joinandconfigure",
        "room": room,
        "ptype": "publisher",
        "id": FEED_BASE + index,
        "display": f"p{index}",
        "audio": True,
        "video": True,
    }
    data, jsep = await session.message(handle, body, {"type": "offer", "sdp": offer, "e2ee": True})
    if data.get("videoroom") != "joined" or not jsep or jsep.get("type") != "answer":
        raise JanusError(f"publisher {index}: no answer in {data}")
    return handle, str(jsep["sdp"])


async def subscribe(
    session: JanusSession,
    room: int,
    publisher: int,
    peer: Peer,
) -> tuple[int, str]:
    """Subscribe `peer` to publisher `publisher`'s feed on a handle of its own: Janus offers,
    we answer with `start`. Returns (handle, Janus's offer) -- the remote description."""
    port = peer.open()
    handle = await session.attach()
    body = {
        "request": "join",
        "room": room,
        "ptype": "subscriber",
        "streams": [{"feed": FEED_BASE + publisher}],
        "use_msid": False,
    }
    data, jsep = await session.message(handle, body)
    if data.get("videoroom") != "attached" or not jsep or jsep.get("type") != "offer":
        raise JanusError(f"subscription to p{publisher}: no offer in {data}")
    offer = str(jsep["sdp"])
    answer, _mids = build_answer(
        offer,
        ufrag=peer.local_ufrag,
        pwd=peer.local_pwd,
        fingerprint=str(peer.fingerprint),
        port=port,
    )
    data, _ = await session.message(
        handle, {"request": "start"}, {"type": "answer", "sdp": answer, "e2ee": True}
    )
    if data.get("started") != "ok":
        raise JanusError(f"subscription to p{publisher}: start gave {data}")
    return handle, offer


class JanusSignaling:
    """The load generator's signaling against Janus (see bench/loadgen.py's worker): one
    session per generator process, one handle per PeerConnection."""

    # Janus is a full ICE agent: the offerer controls. It offers to subscribers.
    subscriber_controlling = False

    def __init__(self, http: aiohttp.ClientSession, url: str, room: int) -> None:
        self.session = JanusSession(http, url)
        self.room = room

    async def start(self) -> None:
        await self.session.create()

    async def publish(self, index: int, peer: Peer, ssrcs: Ssrcs) -> str:
        offer = peer.offer(send=True, ssrcs=ssrcs, port=peer.open())
        _handle, answer = await publish(self.session, self.room, index, offer)
        return answer

    async def subscribe(self, _subscriber: int, publisher: int, peer: Peer, _token: str) -> str:
        _handle, offer = await subscribe(self.session, self.room, publisher, peer)
        return offer

    async def close(self) -> None:
        # Destroying the session hangs up every PeerConnection and detaches every handle.
        await self.session.destroy()

    def stats(self) -> dict[str, Any]:
        return {"events": dict(self.session.events), "hangups": self.session.hangups[:20]}
