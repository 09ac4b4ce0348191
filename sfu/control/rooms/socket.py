"""The room protocol's WebSocket endpoint at /rtc: join or resume, then one message at a
time through the handler table (`messages.HANDLERS`), rate-limited; a writer task drains the
participant's outbox to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from sfu.cluster import Cluster
from sfu.control.admission import Refused, request_ip
from sfu.control.auth import AuthError, verify_token
from sfu.control.keys import (
    ADMISSION_KEY,
    CLUSTER_KEY,
    CONFIG_KEY,
    FEDERATION_KEY,
    LIFECYCLE_KEY,
)
from sfu.control.problems import problem_response
from sfu.control.rooms.errors import ProtocolError
from sfu.control.rooms.hub import RoomHub
from sfu.control.rooms.messages import (
    PROTOCOL_VERSION,
    Join,
    decode,
    dispatch,
    loads,
    parse_tracks,
)
from sfu.logs import log_context
from sfu.names import display_name_problem
from sfu.rooms import LimitExceeded, Participant

log = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 §7.4.1) by which a client ends the call on purpose: normal
# closure and "going away" (a closed or reloaded tab). Anything else (1006 on a lost network,
# a missed heartbeat) keeps the participant for the reconnect window.
CLIENT_LEFT_CODES = frozenset({1000, 1001})


class RateLimiter:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = 2 * rate
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


HUB_KEY = web.AppKey("room_hub", RoomHub)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/rtc", rtc_socket)


async def rtc_socket(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    hub: RoomHub = request.app[HUB_KEY]
    admission = request.app[ADMISSION_KEY]
    ip = request_ip(request, config.http.trusted_proxies)
    if not admission.open_pending(ip):
        # Refused before the upgrade: an unauthenticated socket costs a task and buffers for
        # up to rooms.join_timeout, so one address may only hold a few at once.
        admission.on_refusal("pending_ip")
        return problem_response(
            429,
            "rate_limited",
            f"too many WebSockets from {ip} waiting to join "
            f"(limits.max_pending_joins_per_ip {config.limits.max_pending_joins_per_ip})",
            headers={"Retry-After": "1"},
        )
    ws = web.WebSocketResponse(max_msg_size=config.limits.max_message_bytes, heartbeat=15.0)
    participant: Participant | None = None
    writer: asyncio.Task[None] | None = None
    queue: object = None
    ws_failed = False
    try:
        try:
            await ws.prepare(request)
            participant = await _join(request, ws, hub, ip)
        finally:
            admission.close_pending(ip)
        if participant is None:
            return ws
        queue = participant.outbox
        writer = asyncio.create_task(_write(ws, participant, queue))
        limiter = RateLimiter(config.limits.max_messages_per_second)
        # Key exchange is bursty by design (a joiner answers every member at once) and a
        # dropped key message leaves someone unable to decrypt: relay gets its own budget,
        # sized to the room.
        relay_limiter = RateLimiter(
            max(config.limits.max_messages_per_second, 2 * config.limits.max_participants_per_room)
        )
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                if msg.type is WSMsgType.ERROR:
                    ws_failed = True
                    break
                participant.send(_error("invalid_message", "messages are JSON text"))
                continue
            kind = "?"
            try:
                kind, data = decode(msg.data)
                if not (relay_limiter if kind == "relay" else limiter).allow():
                    raise ProtocolError("rate_limited", "too many messages; slow down")
                if dispatch(hub, participant, kind, data):
                    break  # the client left
            except ProtocolError as exc:
                participant.send(_error(exc.code, exc.message, exc.fatal))
                if exc.fatal:
                    break
            except Exception:
                # A bug, not the client's fault: the session goes on, and the client learns
                # that this one message had no effect instead of losing its socket.
                with log_context(room=participant.room, participant=participant.id):
                    log.exception("room message of type %r could not be handled", kind)
                participant.send(
                    _error("internal_error", "the server failed to handle this message")
                )
        if ws.close_code == 1009:  # aiohttp closed it: message over max_msg_size
            log.info("closing socket: message larger than limits.max_message_bytes")
    finally:
        if participant is not None and writer is not None:
            # A resumed participant has a new socket and queue: this one's end changes nothing.
            if (
                not participant.left
                and participant.outbox is queue
                and ws.close_code in CLIENT_LEFT_CODES
                and not ws_failed
            ):
                # The client closed its socket on purpose (a closed tab says 1001): it left.
                hub.remove(participant, f"closed its socket ({ws.close_code})")
            elif not participant.left and participant.outbox is queue:
                # Dropped, not left: the others see nothing until the reconnect window ends.
                participant.connected = False
                participant.disconnected_at = time.monotonic()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        await ws.close()
        _release(ws, request)
    return ws


def _release(ws: web.WebSocketResponse, request: web.Request) -> None:
    """Let a closed socket go at once. aiohttp (3.14) keeps it in two ways: it arms the
    heartbeat timer again when the client's close frame arrives while close() waits for it
    (the timer then holds socket, request and handler for one and a half heartbeats and
    pings a dead connection), and the connection keeps the socket's data callback, a
    reference cycle through request and connection that only a full collection frees.
    Under room churn either one holds megabytes of ended sockets. Both are private
    attributes, hence looked up with care."""
    cancel = getattr(ws, "_cancel_heartbeat", None)
    if callable(cancel):
        cancel()
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None


def _error(code: str, message: str, fatal: bool = False) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "fatal": fatal}


def socket_url(base_url: str) -> str:
    """A node's advertised http(s) URL as the WebSocket URL of its /rtc."""
    return "ws" + base_url.removeprefix("http") + "/rtc"


def redirect_message(node: str, base_url: str) -> dict[str, Any]:
    """Join elsewhere: the room's node, as a WebSocket URL for /rtc (docs/protocol.md)."""
    return {"type": "redirect", "node": node, "url": socket_url(base_url)}


def joined_message(
    hub: RoomHub, participant: Participant, resumed: bool, cluster: Cluster | None
) -> dict[str, Any]:
    """`joined`, and in a cluster the other live nodes a client may rejoin through when this
    one dies: its page or configuration may know no other."""
    message = hub.joined_message(participant, resumed)
    if cluster is not None:
        message["nodes"] = [
            socket_url(node.url)
            for node in cluster.nodes
            if node.id != cluster.node_id and not node.draining
        ]
    return message


async def _write(
    ws: web.WebSocketResponse,
    participant: Participant,
    outbox: asyncio.Queue[dict[str, Any] | None],
) -> None:
    """Send queued messages in order; a None ends the socket (left, or not reading)."""
    while True:
        message = await outbox.get()
        if message is None:
            if participant.overflowed:
                participant.overflowed = False
                await ws.close(code=1008, message=b"slow consumer")
            else:
                await ws.close()
            return
        if ws.closed:
            return
        await ws.send_str(json.dumps(message))


async def _join(
    request: web.Request, ws: web.WebSocketResponse, hub: RoomHub, ip: str
) -> Participant | None:
    config = request.app[CONFIG_KEY]
    lifecycle = request.app[LIFECYCLE_KEY]

    async def refuse(code: str, message: str) -> None:
        await ws.send_str(json.dumps(_error(code, message, True)))

    try:
        msg = await ws.receive(timeout=config.rooms.join_timeout)
    except TimeoutError:
        await refuse("join_timeout", "send a join message first")
        return None
    if msg.type is not WSMsgType.TEXT:
        if msg.type is WSMsgType.BINARY:
            await refuse("invalid_message", "messages are JSON text")
        return None
    try:
        data = loads(msg.data)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        await refuse("invalid_message", "not JSON")
        return None
    if not isinstance(data, dict) or data.get("type") != "join":
        await refuse("join_required", 'the first message must be {"type": "join", ...}')
        return None
    join = Join.parse(data)
    # JSON true and 1.0 compare equal to 1 in Python; only the integer is this version.
    if type(join.version) is not int or join.version != PROTOCOL_VERSION:
        await refuse(
            "unsupported_version", f"this server speaks protocol version {PROTOCOL_VERSION}"
        )
        return None
    if not lifecycle.accepting:
        await refuse("draining", "the server is shutting down; try another instance")
        return None
    try:
        if join.token is None:
            raise AuthError(401, "missing_token", "join needs a token (sfu token)")
        grants = verify_token(config, join.token)
    except AuthError as exc:
        await refuse(exc.code, exc.detail)
        return None
    try:
        # Checked before anything is created: a bad field must not leave a participant behind.
        subscribe = parse_tracks(join.subscribe)
    except ProtocolError as exc:
        await refuse(exc.code, f"join.subscribe: {exc.message}")
        return None
    problem = display_name_problem(join.name) if join.name is not None else None
    if problem:
        await refuse("invalid_message", f"join.name: {problem}")
        return None
    local = hub.by_resume.get(join.resume) if join.resume is not None else None
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None and cluster.config.rooms == "redirect" and local is None:
        node = await cluster.place(grants.room)
        if node is not None:
            # The room lives on another node: the client repeats its join there.
            await ws.send_str(json.dumps(redirect_message(node.id, node.url)))
            return None
    if join.resume is not None:
        participant = local
        if (
            participant is not None
            and participant.identity == grants.identity
            and participant.room == grants.room
        ):
            participant.connected = True
            participant.disconnected_at = None
            # An old socket that is still open must not go on speaking for the participant.
            old_outbox, participant.outbox = participant.outbox, asyncio.Queue()
            old_outbox.put_nowait(None)
            participant.send(joined_message(hub, participant, True, cluster))
            if participant.offers is not None and participant.offers.awaiting_answer:
                # The outstanding offer may have been lost with the old socket.
                participant.offers.awaiting_answer = False
                participant.offers.dirty = True
                hub.send_offer(participant)
            with log_context(room=participant.room, participant=participant.id):
                log.info("participant %s resumed", participant.id)
            return participant
        await refuse(
            "resume_failed", "nothing to resume (expired, or another identity); join afresh"
        )
        return None
    try:
        request.app[ADMISSION_KEY].admit_participant(grants.identity, ip)
    except Refused as exc:
        await refuse(exc.code, exc.detail)
        return None
    federation = request.app.get(FEDERATION_KEY)
    # Rooms across nodes: a key id (E2EE slot) unique in the room whichever node is joined.
    slot = await federation.allocate_slot(grants.room) if federation is not None else None
    try:
        participant = hub.new_participant(
            grants,
            join.name,
            lifecycle.hold("room_participant"),
            reuse_sections=join.reuse_sections,
            slot=slot,
        )
    except ProtocolError as exc:
        await refuse(exc.code, exc.message)
        return None
    except LimitExceeded as exc:
        await refuse("limit_reached", str(exc))
        return None
    if federation is not None:
        room = hub.rooms.get(participant.room)
        if room is not None:
            federation.joined(room, participant.identity, participant.id, participant.slot)
    with log_context(room=participant.room, participant=participant.id):
        log.info("participant %s (%s) joined", participant.id, participant.identity)
    participant.send(joined_message(hub, participant, False, cluster))
    hub.set_subscriptions(participant, subscribe)
    return participant
