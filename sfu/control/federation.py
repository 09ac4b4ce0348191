"""Rooms across nodes (`cluster.rooms: span`): one call for participants on several nodes.

Every node serves the participants that reach it. The nodes that have participants (or
WHIP/WHEP sessions) in a room share what the room protocol shows of them through Redis, and
their media planes are joined by relays, one per pair of nodes:

- **State**: each such node keeps `state:<room>:<node>` (its participants as the room
  protocol shows them, its tracks with codec, extension ids and mute state) and its id in the
  set `roomnodes:<room>`, renewed with the cluster heartbeat and expiring `cluster.node_ttl`
  after it stops, and publishes "changed" on the room's channel whenever its part changes.
  The others read it and show those participants and tracks to their own participants as if
  they were local (`MediaSession` of kind "remote": `participant_joined`, `track_published`,
  `track_muted`, `participant_left`).
- **Media**: a node that sees another node's track adds a *mirror* producer on its relay end
  to that node, with SSRCs it chooses, and asks the other node (message `feed` on its inbox
  channel) to subscribe its own relay end to the track with those SSRCs. Its subscribers then
  subscribe to the mirror. So each track crosses to each other node once, as the publisher's
  encrypted frames; NACKs and keyframe requests cross back over the same relay. Relays are
  opened on demand: the node with the larger id dials (sfu/media/relay.py), after one
  request/answer on the inbox channels that exchanges ICE credentials, DTLS fingerprints and
  the answering end's address (its first ICE candidate: `rtc.announced_ips` must be
  reachable from the other nodes).
- **Key exchange**: `relay` messages (the blind E2EE relay) to a participant on another node
  go to that node's inbox channel, broadcasts to the room's channel; the payload is handed on
  unread, as on one node. E2EE sender slots come from a counter in Redis (`slot:<room>`), so
  no two participants of a room share a key id whichever node they joined.
- **One identity, one participant**: a fresh join is announced on the room's channel
  (`replace`, with its slot); every node removes its own older participant of that identity
  and hides other nodes' older ones, as one node replaces a second join of an identity.

A node that dies stops renewing its state: within `node_ttl` the others remove its
participants and tracks (their subscribers see `participant_left`), and close the relay to
it; the calls among the remaining nodes never stop. Its participants' clients rejoin through
another node (auto-rejoin) and reappear. If Redis stops answering, each node keeps what it
has (its own calls and the relays already open) and catches up when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from sfu.cluster import Cluster
from sfu.control.media_events import MediaEvents
from sfu.control.rooms.hub import RoomHub
from sfu.media.api import MediaApi, ProducerInfo, TransportInfo, UnknownMediaId
from sfu.media.dtls import Fingerprint
from sfu.media.ice import generate_credentials
from sfu.media.producer import TrackCodec
from sfu.media.relay import RelayEnd
from sfu.rooms import MediaSession, Room, Rooms

log = logging.getLogger(__name__)

# E2EE slot counters outlive the room's last join by this (a room idle this long may start
# its slots again: nobody holds a key of the old ones any more).
SLOT_TTL = 24 * 3600
# How often a failing Redis is logged (each failure is counted).
_ERROR_LOG_INTERVAL = 10.0


def _placeholder(node: str) -> TransportInfo:
    # A remote participant's session has no transport on this node: its tracks are mirrors
    # on the relay to its node, which the mirrors' producer ids name.
    return TransportInfo(f"node:{node}", "remote", "", "", "", (), None)


@dataclass
class _Link:
    """The relay to one other node."""

    node: str
    transport: TransportInfo | None = None
    # Our ICE credentials: as the dialer, sent with every relay_open of this attempt; as the
    # answerer, sent back in relay_ready (again, if the same request comes again).
    local: tuple[str, str] | None = None
    # Answerer: the dialer's ufrag this end was made for.
    peer_ufrag: str | None = None
    asked_at: float = 0.0


@dataclass
class _RemoteTrack:
    owner: str
    mirror: ProducerInfo
    muted: bool


@dataclass
class _RemoteNode:
    """What this node shows of one other node's part of one room."""

    sessions: dict[str, MediaSession] = field(default_factory=dict)
    tracks: dict[str, _RemoteTrack] = field(default_factory=dict)


class Federation:
    def __init__(
        self,
        cluster: Cluster,
        hub: RoomHub,
        media: MediaApi,
        rooms: Rooms,
        events: MediaEvents,
        fingerprint: str,
    ) -> None:
        self.cluster = cluster
        self.fingerprint = fingerprint
        self.hub = hub
        self.media = media
        self.rooms = rooms
        self.events = events
        self.node = cluster.node_id
        prefix = cluster.config.key_prefix
        self._state_prefix = f"{prefix}state:"
        self._members_prefix = f"{prefix}roomnodes:"
        self._room_channel = f"{prefix}roomch:"
        self._inbox_prefix = f"{prefix}inbox:"
        self._slot_prefix = f"{prefix}slot:"
        self._ttl_ms = round(cluster.config.node_ttl * 1000)
        self._links: dict[str, _Link] = {}
        self._remote: dict[str, dict[str, _RemoteNode]] = {}
        # Feeds we serve: (node, local track id) -> subscription id on our relay end to it.
        self._feeds: dict[tuple[str, str], str] = {}
        self._rooms_listened: set[str] = set()
        # Per room: ids of other nodes' participants that a later join of the same identity
        # replaced. Not shown, even while their node (perhaps dead) still lists them.
        self._superseded: dict[str, set[str]] = {}
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._last_error_log = 0.0
        self._closing = False
        # For /metrics.
        self.errors = 0
        self.links_opened = 0
        self.feeds_served = 0
        hub.on_change = self.local_changed
        hub.remote_relay = self.relay

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        redis = self.cluster.redis
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self._inbox_prefix + self.node)
        self._tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._send()),
            asyncio.create_task(self._tick()),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # redis-py's pub/sub read can swallow a cancellation while it waits on the socket;
            # the loop then sees `_closing` within its one-second read timeout.
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        with contextlib.suppress(RedisError, OSError):
            for room in list(self._rooms_listened):
                await self.cluster.redis.delete(self._state_key(room))
                await self.cluster.redis.srem(self._members_prefix + room, self.node)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None
        links, self._links = list(self._links.values()), {}
        for link in links:
            if link.transport is not None:
                self.events.unwatch_transport(link.transport.id)
                self.media.close_transport(link.transport.id, "node leaving the cluster")

    def links(self) -> int:
        return sum(1 for link in self._links.values() if link.transport is not None)

    def remote_participants(self) -> int:
        return sum(len(n.sessions) for nodes in self._remote.values() for n in nodes.values())

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = loop.time()
            log.warning("cluster rooms: %s failed: %s (retrying)", what, exc)

    # -- this node's part of its rooms -------------------------------------------------------

    def local_changed(self, room: str) -> None:
        """The hub changed this node's part of `room`: publish it (in order with relays)."""
        if room not in self._dirty:
            self._dirty.add(room)
            self._outbox.put_nowait(("flush", room))

    def _state_key(self, room: str) -> str:
        return f"{self._state_prefix}{room}:{self.node}"

    def _local_state(self, room: Room) -> dict[str, Any] | None:
        local = [s for s in room.publications.values() if s.kind != "remote"]
        if not room.members and not local and not room.subscriptions:
            return None
        participants = [m.public() for m in room.members.values()]
        participants += [
            {"id": s.id, "identity": s.identity, "name": None, "kind": "whip"}
            for s in local
            if s.kind == "whip"
        ]
        tracks = []
        for session in local:
            owner = self.hub.owner_of(session)
            muted = self.hub.muted_of(session)
            for producer in session.producers:
                codec = producer.codec
                tracks.append(
                    {
                        "id": producer.id,
                        "owner": owner,
                        "kind": producer.kind,
                        "stream": session.stream,
                        "codec": [
                            codec.name,
                            codec.clock_rate,
                            codec.payload_type,
                            codec.rtx_payload_type,
                            codec.channels,
                            codec.fmtp,
                        ],
                        "ext_ids": dict(producer.ext_ids),
                        "muted": muted.get(producer.id, False),
                    }
                )
        return {"participants": participants, "tracks": tracks}

    async def _flush(self, room_name: str) -> None:
        self._dirty.discard(room_name)
        room = self.rooms.get(room_name)
        state = self._local_state(room) if room is not None else None
        redis = self.cluster.redis
        channel = self._room_channel + room_name
        if state is None:
            await redis.delete(self._state_key(room_name))
            await redis.srem(self._members_prefix + room_name, self.node)
            await redis.publish(channel, json.dumps({"kind": "changed", "node": self.node}))
            self._forget_room(room_name)
            return
        await redis.set(self._state_key(room_name), json.dumps(state), px=self._ttl_ms)
        await redis.sadd(self._members_prefix + room_name, self.node)
        await redis.pexpire(self._members_prefix + room_name, self._ttl_ms)
        await redis.publish(channel, json.dumps({"kind": "changed", "node": self.node}))
        if room_name not in self._rooms_listened:
            assert self._pubsub is not None
            await self._pubsub.subscribe(channel)
            self._rooms_listened.add(room_name)
            await self._resync(room_name)

    def _forget_room(self, room_name: str) -> None:
        """No local participant is left: the other nodes' part is no longer shown here."""
        if room_name in self._rooms_listened:
            self._rooms_listened.discard(room_name)
            if self._pubsub is not None:
                task = asyncio.ensure_future(
                    self._pubsub.unsubscribe(self._room_channel + room_name)
                )
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        for node in list(self._remote.get(room_name, {})):
            self._apply(room_name, node, None)
        self._remote.pop(room_name, None)
        self._superseded.pop(room_name, None)

    def _highest_slot(self, room_name: str) -> int:
        """The highest slot a participant of the room holds, as far as this node knows."""
        room = self.rooms.get(room_name)
        if room is None:
            return 0
        slots = [m.slot for m in room.members.values()]
        slots += [
            int(s.public["slot"])
            for s in room.publications.values()
            if s.kind == "remote" and s.public and isinstance(s.public.get("slot"), int)
        ]
        return max(slots, default=0)

    async def allocate_slot(self, room: str) -> int:
        """The room's next E2EE sender slot, unique across nodes. The counter lives in Redis;
        a counter Redis lost (a restart) starts again above every slot still in the room, and
        without Redis this node counts on from there itself (a collision with a node that
        does the same at that moment stays possible, and is logged as a Redis failure)."""
        key = self._slot_prefix + room
        floor = self._highest_slot(room)
        try:
            slot = int(await self.cluster.redis.incr(key))
            if slot <= floor:
                slot = int(await self.cluster.redis.incrby(key, floor + 1 - slot))
            await self.cluster.redis.expire(key, SLOT_TTL)
        except (RedisError, OSError) as exc:
            self._failed("E2EE slot allocation", exc)
            local = self.rooms.get(room)
            return max(floor + 1, local.next_slot if local is not None else 1)
        return slot

    # -- WHEP viewers of a stream published on another node -----------------------------------

    async def node_publishing(self, room: str, stream: str) -> str | None:
        """The URL of the live node that publishes `stream` in `room` itself, from the nodes'
        shared state; None if none does (or Redis cannot say)."""
        redis = self.cluster.redis
        try:
            nodes = sorted(str(n) for n in await redis.smembers(self._members_prefix + room))
            for node in nodes:
                if node == self.node:
                    continue
                raw = await redis.get(f"{self._state_prefix}{room}:{node}")
                state = json.loads(raw) if raw else {}
                if any(t.get("stream") == stream for t in state.get("tracks", [])):
                    live = next((n for n in self.cluster.nodes if n.id == node), None)
                    if live is not None:
                        return live.url
        except (RedisError, OSError) as exc:
            self._failed("finding a stream's node", exc)
        return None

    # -- one identity, one participant, across nodes -----------------------------------------

    def joined(self, room: Room, identity: str, participant: str, slot: int) -> None:
        """A fresh join here: the same identity elsewhere in the room is replaced, as on one
        node. The other nodes remove their own older participant of that identity; all
        nodes, this one too, stop showing the older ones at once, even one whose node just
        died and still lists it until its entries expire."""
        message = {
            "kind": "replace",
            "room": room.name,
            "identity": identity,
            "participant": participant,
            "slot": slot,
        }
        self._supersede(room, identity, participant, slot)
        self._post(self._room_channel + room.name, {**message, "from": self.node})

    def _supersede(self, room: Room, identity: str, participant: str, slot: int) -> None:
        superseded = self._superseded.setdefault(room.name, set())
        for part in self._remote.get(room.name, {}).values():
            for pid, session in part.sessions.items():
                public = session.public or {}
                older = isinstance(public.get("slot"), int) and int(public["slot"]) < slot
                if pid != participant and session.identity == identity and older:
                    superseded.add(pid)
        if superseded:
            task = asyncio.ensure_future(self._locked_resync(room.name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on_replace(self, message: dict[str, Any]) -> None:
        room = self.rooms.get(str(message["room"]))
        if room is None or not isinstance(message.get("slot"), int):
            return
        identity, slot = str(message["identity"]), int(message["slot"])
        self.hub.replace_identity(room, identity, slot)
        self._supersede(room, identity, str(message["participant"]), slot)

    # -- outgoing, in order ------------------------------------------------------------------

    async def _send(self) -> None:
        while True:
            kind, item = await self._outbox.get()
            try:
                if kind == "flush":
                    async with self._lock:
                        await self._flush(item)
                else:
                    channel, message = item
                    await self.cluster.redis.publish(channel, json.dumps(message))
            except (RedisError, OSError) as exc:
                self._failed(f"publishing ({kind})", exc)
                if kind == "flush":
                    self._dirty.discard(item)  # the next heartbeat republishes the state

    def _post(self, channel: str, message: dict[str, Any]) -> None:
        self._outbox.put_nowait(("publish", (channel, message)))

    def _tell(self, node: str, message: dict[str, Any]) -> None:
        self._post(self._inbox_prefix + node, {**message, "from": self.node})

    # -- periodic renewal and resync ---------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.config.heartbeat_interval)
            try:
                async with self._lock:
                    for room_name in sorted(self._rooms_listened | set(self.rooms.names())):
                        room = self.rooms.get(room_name)
                        if room is None or self._local_state(room) is None:
                            await self._flush(room_name)
                            continue
                        await self._flush(room_name)
                        await self._resync(room_name)
                    self._drop_dead_links()
            except (RedisError, OSError) as exc:
                self._failed("renewal", exc)

    def _drop_dead_links(self) -> None:
        live = {n.id for n in self.cluster.nodes}
        for node in list(self._links):
            if node not in live:
                self._close_link(node, f"node {node} left the cluster")

    async def _resync(self, room_name: str) -> None:
        redis = self.cluster.redis
        nodes = {str(n) for n in await redis.smembers(self._members_prefix + room_name)}
        nodes.discard(self.node)
        states: dict[str, dict[str, Any] | None] = {}
        for node in nodes:
            raw = await redis.get(f"{self._state_prefix}{room_name}:{node}")
            states[node] = json.loads(raw) if raw else None
        for node in set(self._remote.get(room_name, {})) - set(states):
            states[node] = None
        for node, state in states.items():
            self._apply(room_name, node, state)
        superseded = self._superseded.get(room_name)
        if superseded:
            # Forget those no node lists any more.
            listed = {
                str(p.get("id"))
                for state in states.values()
                for p in (state or {}).get("participants", [])
            }
            superseded &= listed

    # -- other nodes' part, shown here -------------------------------------------------------

    def _apply(self, room_name: str, node: str, state: dict[str, Any] | None) -> None:
        room = self.rooms.get(room_name)
        if room_name not in self._rooms_listened or room is None:
            state = None
        nodes = self._remote.setdefault(room_name, {})
        part = nodes.setdefault(node, _RemoteNode())
        hidden = self._superseded.get(room_name, set())
        people = {
            p["id"]: p for p in (state or {}).get("participants", []) if p["id"] not in hidden
        }
        tracks = {
            t["id"]: t for t in (state or {}).get("tracks", []) if t.get("owner") not in hidden
        }
        # The name WHEP viewers ask for: the stream the owner's node publishes it under (a
        # WHIP URL's stream), else, as for local participants, the identity.
        streams = {t.get("owner"): t.get("stream") for t in tracks.values()}
        link = self._links.get(node)
        if state is not None and tracks and (link is None or link.transport is None):
            self._ensure_link(node)
            tracks = {}  # mirrored once the relay exists (it resyncs the rooms then)
        # Tracks that went (or whose owner went) first, then participants, then additions.
        for track_id in [t for t in part.tracks if t not in tracks]:
            self._drop_track(room, node, part, track_id)
        for pid in [p for p in part.sessions if p not in people]:
            session = part.sessions.pop(pid)
            self.rooms.remove(session)
        if state is None:
            nodes.pop(node, None)
            return
        assert room is not None
        for pid, public in people.items():
            if pid in part.sessions or pid in room.members:
                continue
            stream = streams.get(pid)
            if not isinstance(stream, str):
                stream = public.get("identity")
            if not isinstance(stream, str) or not stream or stream in room.publications:
                stream = pid
            session = MediaSession(
                kind="remote",
                room=room_name,
                stream=stream,
                identity=str(public.get("identity", "")),
                transport=_placeholder(node),
                release_drain=lambda: None,
                id=pid,
                public=public,
            )
            part.sessions[pid] = session
            self.rooms.add(session)
        for track_id, track in tracks.items():
            owner = part.sessions.get(track["owner"])
            if owner is None:
                continue
            known = part.tracks.get(track_id)
            if known is None:
                self._add_track(room, node, part, owner, track_id, track)
            elif known.muted != bool(track.get("muted")):
                known.muted = bool(track.get("muted"))
                owner.muted[known.mirror.id] = known.muted
                self.hub.broadcast(
                    room,
                    {
                        "type": "track_muted",
                        "track": known.mirror.id,
                        "participant": owner.id,
                        "muted": known.muted,
                    },
                )

    def _add_track(
        self,
        room: Room,
        node: str,
        part: _RemoteNode,
        owner: MediaSession,
        track_id: str,
        track: dict[str, Any],
    ) -> None:
        link = self._links[node]
        assert link.transport is not None
        name, clock_rate, pt, rtx_pt, channels, fmtp = track["codec"]
        codec = TrackCodec(name, clock_rate, pt, rtx_pt, channels, fmtp)
        kind = str(track["kind"])
        ssrc = secrets.randbits(32) or 1
        rtx_ssrc = (secrets.randbits(32) or 2) if kind == "video" and rtx_pt is not None else None
        ext_ids = {str(k): int(v) for k, v in track.get("ext_ids", {}).items()}
        try:
            mirror = self.media.add_producer(
                link.transport.id,
                kind=kind,
                mid=f"n{secrets.token_hex(4)}",
                codec=codec,
                ext_ids=ext_ids,
                ssrc=ssrc,
                rtx_ssrc=rtx_ssrc,
                group=room.name,
                owner=owner.id,
            )
        except UnknownMediaId:
            return  # the relay closed meanwhile; the next resync tries again
        self._tell(
            node,
            {
                "kind": "feed",
                "track": track_id,
                "ssrcs": [ssrc, rtx_ssrc],
                "pt": pt,
                "rtx_pt": rtx_pt if rtx_ssrc is not None else None,
                "ext": sorted(ext_ids.values()),
            },
        )
        muted = bool(track.get("muted"))
        part.tracks[track_id] = _RemoteTrack(owner.id, mirror, muted)
        owner.muted[mirror.id] = muted
        owner.producers.append(mirror)
        self.hub.tracks_published(room, owner, [mirror])

    def _drop_track(self, room: Room | None, node: str, part: _RemoteNode, track_id: str) -> None:
        track = part.tracks.pop(track_id)
        owner = part.sessions.get(track.owner)
        if owner is not None:
            owner.producers = [p for p in owner.producers if p.id != track.mirror.id]
            if room is not None:
                self.hub.tracks_unpublished(room, owner, [track.mirror])
        self.media.close_producer(track.mirror.id)
        if node in self._links:
            self._tell(node, {"kind": "unfeed", "track": track_id})

    # -- relays between nodes ----------------------------------------------------------------

    def _ensure_link(self, node: str) -> None:
        link = self._links.get(node)
        now = asyncio.get_running_loop().time()
        if link is not None and (link.transport is not None or now - link.asked_at < 2.0):
            return
        link = self._links.setdefault(node, _Link(node))
        link.asked_at = now
        if self.node > node:
            # The same credentials on every retry: an answer to an earlier request still fits.
            if link.local is None:
                link.local = generate_credentials()
            self._tell(
                node,
                {
                    "kind": "relay_open",
                    "ufrag": link.local[0],
                    "pwd": link.local[1],
                    "fingerprint": self.fingerprint,
                },
            )
        else:
            self._tell(node, {"kind": "relay_please"})

    def _watch_link(self, node: str, transport: TransportInfo) -> None:
        self.events.watch_transport(
            transport.id,
            connected=lambda: log.info("cluster rooms: relay to node %s connected", node),
            closed=lambda event: self._link_closed(node, transport.id, event.reason),
        )

    def _link_closed(self, node: str, transport_id: str, reason: str) -> None:
        link = self._links.get(node)
        if link is None or link.transport is None or link.transport.id != transport_id:
            return
        log.warning("cluster rooms: relay to node %s closed: %s", node, reason)
        self._links.pop(node, None)
        self._unmirror(node)

    def _close_link(self, node: str, reason: str) -> None:
        link = self._links.pop(node, None)
        if link is not None and link.transport is not None:
            self.events.unwatch_transport(link.transport.id)
            self.media.close_transport(link.transport.id, reason)
        self._unmirror(node)

    def _unmirror(self, node: str) -> None:
        """The relay to `node` is gone: its tracks are no longer here (its participants stay
        while its state does; the next resync mirrors their tracks over a new relay)."""
        for room_name, nodes in self._remote.items():
            part = nodes.get(node)
            if part is not None:
                for track_id in list(part.tracks):
                    self._drop_track(self.rooms.get(room_name), node, part, track_id)
        for key in [k for k in self._feeds if k[0] == node]:
            del self._feeds[key]

    def _on_relay_open(self, node: str, message: dict[str, Any]) -> None:
        ufrag = str(message["ufrag"])
        current = self._links.get(node)
        if (
            current is not None
            and current.peer_ufrag == ufrag
            and current.transport is not None
            and current.local is not None
        ):
            # A retry of the request we answered (our answer was slow or lost): same answer.
            self._ready(node, current.local, current.transport, ufrag)
            return
        old = self._links.pop(node, None)
        if old is not None and old.transport is not None:
            # The other node restarted (or lost our answer): start over.
            self.events.unwatch_transport(old.transport.id)
            self.media.close_transport(old.transport.id, "replaced by a new relay")
            self._unmirror(node)
        local = generate_credentials()
        transport = self.media.create_relay(
            RelayEnd(
                local, ufrag, str(message["pwd"]), (Fingerprint.parse(str(message["fingerprint"])),)
            )
        )
        self._links[node] = _Link(node, transport, local, ufrag)
        self._watch_link(node, transport)
        self.links_opened += 1
        self._ready(node, local, transport, ufrag)
        self._resync_soon(node)

    def _ready(
        self, node: str, local: tuple[str, str], transport: TransportInfo, dialer: str
    ) -> None:
        host, port = transport.candidates[0]
        self._tell(
            node,
            {
                "kind": "relay_ready",
                "for": dialer,
                "ufrag": local[0],
                "pwd": local[1],
                "fingerprint": transport.fingerprint,
                "address": [host, port],
            },
        )

    def _on_relay_ready(self, node: str, message: dict[str, Any]) -> None:
        link = self._links.get(node)
        if link is None or link.local is None or link.transport is not None:
            return
        if message.get("for") != link.local[0]:
            return  # the answer to an earlier attempt of ours
        host, port = message["address"]
        transport = self.media.create_relay(
            RelayEnd(
                link.local,
                str(message["ufrag"]),
                str(message["pwd"]),
                (Fingerprint.parse(str(message["fingerprint"])),),
                (str(host), int(port)),
            )
        )
        link.transport = transport
        self._watch_link(node, transport)
        self.links_opened += 1
        self._resync_soon(node)

    def _resync_soon(self, node: str) -> None:
        rooms = [r for r, nodes in self._remote.items() if node in nodes]
        for room_name in rooms:
            self._outbox.put_nowait(("flush", room_name))  # a flush resyncs new rooms only
            task = asyncio.ensure_future(self._locked_resync(room_name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _locked_resync(self, room_name: str) -> None:
        async with self._lock:
            try:
                await self._resync(room_name)
            except (RedisError, OSError) as exc:
                self._failed("resync", exc)

    def _on_feed(self, node: str, message: dict[str, Any]) -> None:
        link = self._links.get(node)
        track_id = str(message["track"])
        if link is None or link.transport is None or (node, track_id) in self._feeds:
            return
        if not any(
            p.id == track_id
            for room in (self.rooms.get(r) for r in self._rooms_listened)
            if room is not None
            for s in room.publications.values()
            if s.kind != "remote"
            for p in s.producers
        ):
            return  # not a track of ours (any more)
        ssrc, rtx_ssrc = message["ssrcs"]
        ext = [int(e) for e in message.get("ext", [])]
        try:
            feed = self.media.add_subscription(
                link.transport.id,
                track_id,
                payload_type=int(message["pt"]),
                rtx_payload_type=message.get("rtx_pt"),
                ext_map={e: e for e in ext},
                ssrcs=(int(ssrc), None if rtx_ssrc is None else int(rtx_ssrc)),
            )
            self.media.negotiated(feed.id, extension_ids=set(ext), rtx=rtx_ssrc is not None)
        except UnknownMediaId:
            return
        self._feeds[(node, track_id)] = feed.id
        self.feeds_served += 1

    def _on_unfeed(self, node: str, message: dict[str, Any]) -> None:
        feed = self._feeds.pop((node, str(message["track"])), None)
        if feed is not None:
            self.media.end_subscription(feed, bye=False)

    # -- the blind relay across nodes --------------------------------------------------------

    def relay(self, room: Room, sender: str, to: str | None, payload: str) -> bool:
        """Send a key-exchange payload on to other nodes: True if `to` is on one of them."""
        if room.name not in self._rooms_listened:
            return False
        message = {"kind": "relay", "room": room.name, "sender": sender, "payload": payload}
        if to is None:
            self._post(self._room_channel + room.name, {**message, "from": self.node})
            return True
        for node, part in self._remote.get(room.name, {}).items():
            if to in part.sessions:
                self._tell(node, {**message, "to": to})
                return True
        return False

    async def _on_relay(self, message: dict[str, Any]) -> None:
        room = self.rooms.get(str(message["room"]))
        if room is None:
            return
        sender = str(message["sender"])
        node = str(message["from"])
        if sender not in self._remote.get(room.name, {}).get(node, _RemoteNode()).sessions:
            # Its state has not reached us yet: a payload from someone the clients do not
            # know would be dropped by them, so catch up first.
            await self._locked_resync(room.name)
        to = message.get("to")
        if to is None:
            self.hub.deliver_relay(room, sender, None, str(message["payload"]))
            return
        target = room.members.get(str(to))
        if target is not None:
            self.hub.deliver_relay(room, sender, [target], str(message["payload"]))

    # -- incoming ----------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._pubsub is not None
        while not self._closing:
            try:
                raw = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as exc:
                self._failed("reading", exc)
                await asyncio.sleep(1.0)
                continue
            if raw is None:
                continue
            try:
                message = json.loads(raw["data"])
                node = str(message.get("from") or message.get("node"))
                if node == self.node:
                    continue
                await self._handle(str(raw["channel"]), node, message)
            except Exception:
                log.exception("cluster rooms: a message could not be handled")

    async def _handle(self, channel: str, node: str, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "changed":
            room_name = channel[len(self._room_channel) :]
            if room_name in self._rooms_listened:
                await self._locked_resync(room_name)
        elif kind == "relay":
            await self._on_relay(message)
        elif kind == "replace":
            self._on_replace(message)
        elif kind == "relay_open":
            self._on_relay_open(node, message)
        elif kind == "relay_please":
            self._ensure_link(node)
        elif kind == "relay_ready":
            self._on_relay_ready(node, message)
        elif kind == "feed":
            self._on_feed(node, message)
        elif kind == "unfeed":
            self._on_unfeed(node, message)
