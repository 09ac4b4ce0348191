"""Domain state: rooms, the streams published in them, and the sessions that carry media.

A WHIP session publishes one named stream (its audio and video tracks); a WHEP session
subscribes to one. A participant of the room protocol (one WebSocket, sfu/control/rooms/)
publishes and receives over its own transports. Rooms isolate everything: a stream name is
only looked up inside the room the token grants.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sfu.media.api import ProducerInfo, SubscriptionInfo, TransportInfo

if TYPE_CHECKING:
    # Types only: the domain state imports nothing of the control plane at run time.
    from sfu.control.auth import Grants
    from sfu.control.subscriber import SubscriberOffers

# Messages queued for one participant's socket before it counts as not reading.
OUTBOX_LIMIT = 256


class LimitExceeded(Exception):
    """A configured limit refuses the request; the message names the limit."""


@dataclass(eq=False)
class MediaSession:
    """A WHIP (publish) or WHEP (subscribe) session: one transport and its tracks, known
    by the ids and descriptions the media plane gave (sfu/media/api.py)."""

    kind: str  # "whip", "whep", "rtc" (a room participant's publisher) or "remote"
    room: str
    stream: str
    identity: str
    transport: TransportInfo
    release_drain: Callable[[], None]
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    created_at: float = field(default_factory=time.monotonic)
    producers: list[ProducerInfo] = field(default_factory=list)
    subscriptions: list[SubscriptionInfo] = field(default_factory=list)
    etag: str = field(default_factory=lambda: f'"{secrets.token_hex(8)}"')
    # A participant on another node of the cluster (kind "remote"): what the room protocol
    # shows of it (`Participant.public()` there), and its tracks' mute state by local id.
    public: dict[str, Any] | None = None
    muted: dict[str, bool] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.room}/{self.stream}/{self.id}"

    @property
    def publishes(self) -> bool:
        """WHIP sessions and room participants' publisher transports carry producers, and so
        do other nodes' participants (their tracks mirrored here)."""
        return self.kind in ("whip", "rtc", "remote")


@dataclass(eq=False)
class Participant:
    """A participant of the room protocol: its socket's outbox and its media transports."""

    id: str
    room: str
    identity: str
    name: str | None
    grants: Grants
    resume_token: str
    stream: str
    slot: int
    outbox: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    connected: bool = True
    left: bool = False
    overflowed: bool = False
    disconnected_at: float | None = None
    publication: MediaSession | None = None
    subscriber: TransportInfo | None = None
    offers: SubscriberOffers | None = None
    subscribe_all: bool = True
    wanted: set[str] = field(default_factory=set)
    # Track id -> the (width, height) its video is shown at (`video_size`), for simulcast.
    video_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    muted: dict[str, bool] = field(default_factory=dict)
    release_drain: Callable[[], None] = lambda: None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "identity": self.identity,
            "name": self.name,
            "kind": "rtc",
            "slot": self.slot,
        }

    def send(self, message: dict[str, Any]) -> None:
        if self.left or not self.connected:
            return  # a resuming client gets a fresh snapshot instead of a backlog
        if self.outbox.qsize() >= OUTBOX_LIMIT:
            # A client that stops reading must not make the server buffer without bound:
            # its socket is closed (1008) and it may resume with a fresh snapshot.
            self.overflowed = True
            self.outbox.put_nowait(None)
            return
        self.outbox.put_nowait(message)


@dataclass(eq=False)
class Room:
    name: str
    publications: dict[str, MediaSession] = field(default_factory=dict)
    subscriptions: dict[str, MediaSession] = field(default_factory=dict)
    # Participants of the room protocol (WebSocket), by participant id; kept by the hub.
    members: dict[str, Participant] = field(default_factory=dict)
    # E2EE sender slots (KID = slot << 4 | generation, docs/e2ee.md §4): never reused within
    # a room's life, so a late frame of someone who left can never pass for a newcomer's.
    next_slot: int = 1

    def allocate_slot(self) -> int:
        slot = self.next_slot
        self.next_slot += 1
        return slot

    @property
    def empty(self) -> bool:
        return not self.publications and not self.subscriptions and not self.members


class RoomListener(Protocol):
    """Told when WHIP/WHEP or room sessions start and end (the room hub listens)."""

    def session_added(self, session: MediaSession) -> None: ...

    def session_removed(self, session: MediaSession) -> None: ...


@dataclass(frozen=True)
class Ended:
    """Why the server ended a session, kept so the client learns it on its next request."""

    kind: str
    room: str
    stream: str
    code: str
    detail: str


MAX_ENDED = 1000


class Rooms:
    def __init__(self, max_rooms: int) -> None:
        self.max_rooms = max_rooms
        self._rooms: dict[str, Room] = {}
        self.sessions: dict[str, MediaSession] = {}
        self._by_kind: dict[str, int] = {}
        # Bounded: oldest first out, so a flood of terminations cannot grow memory.
        self.ended: dict[str, Ended] = {}
        self.listeners: list[RoomListener] = []

    def record_ended(self, session: MediaSession, code: str, detail: str) -> None:
        self.ended[session.id] = Ended(session.kind, session.room, session.stream, code, detail)
        while len(self.ended) > MAX_ENDED:
            del self.ended[next(iter(self.ended))]

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def names(self) -> list[str]:
        """Rooms with at least one session or participant here."""
        return list(self._rooms)

    def get_or_create(self, name: str) -> Room:
        room = self._rooms.get(name)
        if room is None:
            if len(self._rooms) >= self.max_rooms:
                raise LimitExceeded(f"the server has reached limits.max_rooms ({self.max_rooms})")
            room = self._rooms[name] = Room(name)
        return room

    def add(self, session: MediaSession) -> None:
        room = self.get_or_create(session.room)
        if session.publishes:
            room.publications[session.stream] = session
        else:
            room.subscriptions[session.id] = session
        self.sessions[session.id] = session
        self._by_kind[session.kind] = self._by_kind.get(session.kind, 0) + 1
        for listener in self.listeners:
            listener.session_added(session)

    def remove(self, session: MediaSession) -> bool:
        """Forget a session; False if it was already gone (closing is idempotent)."""
        if self.sessions.pop(session.id, None) is None:
            return False
        self._by_kind[session.kind] -= 1
        room = self._rooms.get(session.room)
        if room is not None:
            if room.publications.get(session.stream) is session:
                del room.publications[session.stream]
            room.subscriptions.pop(session.id, None)
            self.drop_if_empty(room)
        for listener in self.listeners:
            listener.session_removed(session)
        return True

    def count(self, kind: str) -> int:
        """Sessions of one kind ("whip", "whep", "rtc") now open."""
        return self._by_kind.get(kind, 0)

    def drop_if_empty(self, room: Room) -> None:
        if room.empty and self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    def all_sessions(self) -> list[MediaSession]:
        return list(self.sessions.values())
