"""`RoomHub`: the participants of every room, and what the room protocol does with them.

Join, resume and leave; publishing over the participant's own peer connection; the
subscriber connection the SFU offers and renegotiates as tracks come and go; mute; the blind
relay of E2EE key-exchange payloads; active-speaker events. The socket (`socket.py`) and the
message handlers (`messages.py`) call in; WHIP/WHEP sessions reach it as a `RoomListener`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from sfu.config import Config, IceServer
from sfu.control.auth import Grants
from sfu.control.media_events import MediaEvents
from sfu.control.negotiation import (
    NegotiationError,
    plan_publisher,
    render_answer,
)
from sfu.control.publishing import open_producers
from sfu.control.rooms.errors import ProtocolError
from sfu.control.rooms.messages import MUTE_USAGE, PROTOCOL_VERSION, Tracks
from sfu.control.sdp import LocalTransport, SdpError, SessionDescription, parse_sdp
from sfu.control.subscriber import SubscriberOffers
from sfu.logs import log_context
from sfu.media.api import (
    ActiveSpeakers,
    LayerChanged,
    MediaApi,
    ProducerInfo,
    TransportClosed,
    TransportInfo,
)
from sfu.media.dtls import Fingerprint
from sfu.names import room_name_problem
from sfu.rooms import MediaSession, Participant, Room, Rooms

log = logging.getLogger(__name__)

# How often participants that did not reconnect in time are removed.
TIMER_INTERVAL = 0.3


class RoomHub:
    """Participants of every room, and what the room protocol does with them."""

    def __init__(self, config: Config, media: MediaApi, events: MediaEvents, rooms: Rooms) -> None:
        self.config = config
        self.media = media
        self.events = events
        self.rooms = rooms
        self.participants: dict[str, Participant] = {}
        self.by_resume: dict[str, Participant] = {}
        self.relay_messages = 0
        self.relay_bytes = 0
        # Each room's speakers as the media plane last announced them (loudest first).
        self.speakers: dict[str, tuple[str, ...]] = {}
        self._timer: asyncio.Task[None] | None = None
        # With rooms across nodes (sfu/control/federation.py): told the name of a room whose
        # local participants or tracks changed, and given relay messages for participants on
        # other nodes (to None: everyone there).
        self.on_change: Callable[[str], None] | None = None
        self.remote_relay: Callable[[Room, str, str | None, str], bool] | None = None
        rooms.listeners.append(self)
        events.speaker_listeners.append(self._speakers_changed)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._timer = asyncio.create_task(self._run_timer())

    async def close(self) -> None:
        for participant in list(self.participants.values()):
            self.remove(participant, "server shutting down")
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def _run_timer(self) -> None:
        while True:
            await asyncio.sleep(TIMER_INTERVAL)
            try:
                self._tick(time.monotonic())
            except Exception:
                log.exception("room timer failed (continuing)")

    def _tick(self, now: float) -> None:
        window = self.config.rooms.reconnect_window
        for participant in list(self.participants.values()):
            gone = participant.disconnected_at
            if gone is not None and now - gone > window:
                self.remove(participant, "did not reconnect in time")
        for room_name in [r for r in self.speakers if self.rooms.get(r) is None]:
            del self.speakers[room_name]

    def _speakers_changed(self, event: ActiveSpeakers) -> None:
        """The media plane's detector (RFC 6464 levels) picked a new dominant speaker."""
        room = self.rooms.get(event.group)
        if room is None:
            return
        self.speakers[event.group] = event.speakers
        self._broadcast(room, {"type": "active_speaker", "speakers": list(event.speakers)})

    # -- room state --------------------------------------------------------------------------

    def _members(self, room: Room) -> list[Participant]:
        return list(room.members.values())  # a copy: removing a member may change the room

    def participant_identities(self) -> list[tuple[str, str]]:
        """(room, identity) of every participant, for the metrics (`RoomsView`)."""
        return [(p.room, p.identity) for p in self.participants.values()]

    def _owner_id(self, session: MediaSession) -> str:
        """Participant id of a publication: the room participant's, or the WHIP session's."""
        for participant in self.participants.values():
            if participant.publication is session:
                return participant.id
        return session.id

    def owner_of(self, session: MediaSession) -> str:
        return self._owner_id(session)

    def muted_of(self, session: MediaSession) -> dict[str, bool]:
        """Mute state of a publication's tracks, by track id."""
        for participant in self.participants.values():
            if participant.publication is session:
                return participant.muted
        return session.muted

    def broadcast(self, room: Room, message: dict[str, Any]) -> None:
        self._broadcast(room, message)

    def _changed(self, room: str) -> None:
        if self.on_change is not None:
            self.on_change(room)

    def _track_info(self, session: MediaSession, producer: ProducerInfo) -> dict[str, Any]:
        owner = self._owner_id(session)
        participant = self.participants.get(owner)
        if participant is not None:
            muted = participant.muted.get(producer.id, False)
        else:
            muted = session.muted.get(producer.id, False)
        return {
            "id": producer.id,
            "participant": owner,
            "kind": producer.kind,
            "codec": producer.codec.name,
            "stream": session.stream,
            "muted": muted,
        }

    def _tracks(self, room: Room) -> list[dict[str, Any]]:
        return [
            self._track_info(session, producer)
            for session in room.publications.values()
            for producer in session.producers
        ]

    def _participants(self, room: Room) -> list[dict[str, Any]]:
        people = [p.public() for p in self._members(room)]
        people += [
            {"id": s.id, "identity": s.identity, "name": None, "kind": "whip"}
            for s in room.publications.values()
            if s.kind == "whip"
        ]
        people += [s.public for s in room.publications.values() if s.kind == "remote" and s.public]
        return people

    def _broadcast(self, room: Room, message: dict[str, Any], exclude: str | None = None) -> None:
        for member in self._members(room):
            if member.id != exclude:
                member.send(message)

    # -- RoomListener: WHIP/WHEP and room publications --------------------------------------

    def session_added(self, session: MediaSession) -> None:
        room = self.rooms.get(session.room)
        if room is None or not session.publishes:
            return
        if session.kind == "whip":
            self._broadcast(
                room,
                {
                    "type": "participant_joined",
                    "participant": {
                        "id": session.id,
                        "identity": session.identity,
                        "name": None,
                        "kind": "whip",
                    },
                },
            )
            self._changed(room.name)
        elif session.kind == "remote" and session.public:
            self._broadcast(room, {"type": "participant_joined", "participant": session.public})
        self.tracks_published(room, session, session.producers)

    def session_removed(self, session: MediaSession) -> None:
        room = self.rooms.get(session.room)
        if room is None or not session.publishes:
            return
        self.tracks_unpublished(room, session, session.producers)
        if session.kind in ("whip", "remote"):
            self._broadcast(room, {"type": "participant_left", "participant": session.id})
        if session.kind == "whip":
            self._changed(room.name)

    def tracks_published(
        self, room: Room, session: MediaSession, producers: list[ProducerInfo]
    ) -> None:
        owner = self._owner_id(session)
        for producer in producers:
            self._broadcast(
                room, {"type": "track_published", "track": self._track_info(session, producer)}
            )
        for member in self._members(room):
            if member.id != owner:
                self._sync_subscriptions(member)
        if session.kind != "remote":
            self._changed(room.name)

    def tracks_unpublished(
        self, room: Room, session: MediaSession, producers: list[ProducerInfo]
    ) -> None:
        for producer in producers:
            self._broadcast(room, {"type": "track_unpublished", "track": producer.id})
            for member in self._members(room):
                if member.offers is not None and self._end(member, producer.id):
                    self.send_offer(member)
        if session.kind != "remote":
            self._changed(room.name)

    def _end(self, member: Participant, producer_id: str) -> bool:
        """End the member's subscription to a track, if it has one."""
        assert member.offers is not None
        ended = member.offers.end(producer_id)
        if ended is not None:
            self.events.forget(ended.subscription.id)
        return ended is not None

    # -- subscriptions -----------------------------------------------------------------------

    def _available(self, member: Participant) -> list[tuple[MediaSession, ProducerInfo]]:
        room = self.rooms.get(member.room)
        if room is None:
            return []
        return [
            (session, producer)
            for session in room.publications.values()
            if session is not member.publication
            for producer in session.producers
        ]

    def _sync_subscriptions(self, member: Participant) -> None:
        if member.offers is None or member.subscriber is None:
            return
        offered = {t.producer.id for t in member.offers.live()}
        transport_id = member.subscriber.id
        for session, producer in self._available(member):
            if producer.id in offered:
                continue
            if not member.subscribe_all and producer.id not in member.wanted:
                continue
            rtx = producer.codec.rtx_payload_type if producer.kind == "video" else None
            # Paused until the client's answer: before it, the client does not know the SSRC.
            subscription = self.media.add_subscription(
                transport_id,
                producer.id,
                payload_type=producer.codec.payload_type,
                rtx_payload_type=rtx,
                ext_map=member.offers.ext_map_for(producer),
                paused=True,
                max_size=member.video_sizes.get(producer.id),
            )
            if producer.rids:
                self.events.watch_subscription(
                    transport_id, subscription.id, functools.partial(self._video_layer, member)
                )
            member.offers.add(producer, session.stream, subscription)
        if not member.subscribe_all:
            for track in member.offers.live():
                if track.producer.id not in member.wanted:
                    self._end(member, track.producer.id)
        self.send_offer(member)

    def send_offer(self, member: Participant) -> None:
        if member.offers is None:
            return
        sdp = member.offers.next_offer()
        if sdp is not None:
            member.send({"type": "subscribe_offer", "sdp": sdp})

    # -- participants ------------------------------------------------------------------------

    def new_participant(
        self,
        grants: Grants,
        name: str | None,
        lifecycle_hold: Callable[[], None],
        reuse_sections: bool = False,
        slot: int | None = None,
    ) -> Participant:
        """`slot`: the E2EE sender slot when the cluster allocates it (rooms across nodes
        must not give two participants one), else the room's next."""
        room = self.rooms.get_or_create(grants.room)
        limit = self.config.limits.max_participants_per_room
        # The same identity joining again (a second tab, a crashed client) replaces the old
        # participant rather than appearing twice.
        self.replace_identity(room, grants.identity, None)
        # Removing the last member dropped the room: join the live one, not the dropped one.
        room = self.rooms.get_or_create(grants.room)
        if len(self._members(room)) >= limit:
            self.rooms.drop_if_empty(room)
            raise ProtocolError(
                "room_full", f"the room has limits.max_participants_per_room ({limit})", fatal=True
            )
        pid = "p-" + secrets.token_urlsafe(9)
        # The identity doubles as the WHEP stream name when it is a valid, free one.
        usable = room_name_problem(grants.identity) is None
        stream = grants.identity if usable and grants.identity not in room.publications else pid
        participant = Participant(
            id=pid,
            room=grants.room,
            identity=grants.identity,
            name=name or grants.name,
            grants=grants,
            resume_token=secrets.token_urlsafe(24),
            stream=stream,
            slot=slot if slot is not None else room.allocate_slot(),
            release_drain=lifecycle_hold,
        )
        room.members[pid] = participant
        self.participants[pid] = participant
        self.by_resume[participant.resume_token] = participant
        self._changed(room.name)
        if grants.can_subscribe:
            transport = self.media.create_transport("rtc-sub", None, None, [], group=room.name)
            self.events.watch_transport(
                transport.id,
                connected=lambda: self._subscriber_connected(participant),
                closed=lambda event: self._transport_closed(participant, event),
            )
            participant.subscriber = transport
            participant.offers = SubscriberOffers(
                self._local(transport), self.media, transport.id, recycle=reuse_sections
            )
        self._broadcast(
            room, {"type": "participant_joined", "participant": participant.public()}, exclude=pid
        )
        return participant

    @staticmethod
    def _local(transport: TransportInfo) -> LocalTransport:
        return LocalTransport(
            transport.ice_ufrag, transport.ice_pwd, transport.fingerprint, transport.candidates
        )

    def joined_message(self, participant: Participant, resumed: bool) -> dict[str, Any]:
        room = self.rooms.get(participant.room)
        assert room is not None
        return {
            "type": "joined",
            "version": PROTOCOL_VERSION,
            "resumed": resumed,
            "participant": participant.public(),
            "resume_token": participant.resume_token,
            "participants": [p for p in self._participants(room) if p["id"] != participant.id],
            "tracks": [t for t in self._tracks(room) if t["participant"] != participant.id],
            "ice_servers": [self._ice_server(s) for s in self.config.rtc.ice_servers],
            "e2ee_policy": self.config.e2ee.policy_for(participant.room),
            # active_speaker events announce changes only; a newcomer needs the current state.
            "speakers": self._current_speakers(participant.room),
            "limits": {
                "max_message_bytes": self.config.limits.max_message_bytes,
                "max_relay_payload_bytes": self.config.limits.max_relay_payload_bytes,
            },
        }

    def _current_speakers(self, room: str) -> list[str]:
        # The dominant one; someone who left since is not announced again.
        return [
            s
            for s in self.speakers.get(room, ())[:1]
            if s in self.participants or s in self.rooms.sessions
        ]

    @staticmethod
    def _ice_server(server: IceServer) -> dict[str, Any]:
        entry: dict[str, Any] = {"urls": list(server.urls)}
        if server.username is not None and server.credential is not None:
            entry["username"] = server.username
            entry["credential"] = server.credential.get_secret_value()
        return entry

    def _subscriber_connected(self, participant: Participant) -> None:
        if participant.offers is None:
            return
        for track in participant.offers.live():
            self.media.request_keyframe(track.producer.id)

    def _transport_closed(self, participant: Participant, event: TransportClosed) -> None:
        if participant.left:
            return
        if event.by_client:
            # A client closes its peer connection (DTLS close_notify) when it leaves: the
            # others should see it go now, not after the reconnect window.
            self.remove(participant, "closed its media connection")
            return
        reason = event.reason
        if participant.subscriber is not None and participant.subscriber.id == event.transport_id:
            participant.subscriber = None
            participant.offers = None
        participant.send(
            {
                "type": "error",
                "code": "transport_closed",
                "message": f"media transport closed: {reason}",
            }
        )

    def replace_identity(self, room: Room, identity: str, below_slot: int | None) -> None:
        """Remove the room's participants with `identity` (only those whose E2EE slot is below
        `below_slot` when given: slots grow with join order across nodes, so of two joins
        that cross the later one stays); each is told `replaced`."""
        for existing in self._members(room):
            if existing.identity != identity:
                continue
            if below_slot is not None and existing.slot >= below_slot:
                continue
            existing.send(
                {"type": "error", "code": "replaced", "message": "joined elsewhere", "fatal": True}
            )
            self.remove(existing, "replaced by a new connection")

    def remove(self, participant: Participant, reason: str) -> None:
        if participant.left:
            return
        participant.left = True
        with log_context(room=participant.room, participant=participant.id):
            log.info("participant %s (%s) left: %s", participant.id, participant.identity, reason)
        self.participants.pop(participant.id, None)
        self.by_resume.pop(participant.resume_token, None)
        if participant.publication is not None:
            self.media.close_transport(
                participant.publication.transport.id, f"participant left: {reason}"
            )
        if participant.subscriber is not None:
            self.media.close_transport(participant.subscriber.id, f"participant left: {reason}")
        room = self.rooms.get(participant.room)
        if room is not None:
            room.members.pop(participant.id, None)
            self._broadcast(room, {"type": "participant_left", "participant": participant.id})
            self.rooms.drop_if_empty(room)
        self._changed(participant.room)
        participant.outbox.put_nowait(None)
        participant.release_drain()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, participant: Participant, offer: SessionDescription) -> str:
        if not participant.grants.can_publish:
            raise ProtocolError("no_publish_grant", "this token does not grant publish")
        try:
            plan = plan_publisher(offer)
        except NegotiationError as exc:
            raise ProtocolError(exc.code, exc.detail) from None
        limit = self.config.limits.max_tracks_per_participant
        if len(plan.tracks) > limit:
            raise ProtocolError(
                "too_many_tracks",
                f"{len(plan.tracks)} tracks exceed limits.max_tracks_per_participant ({limit})",
            )
        first = next(m for m in offer.media if not m.rejected)
        try:
            ufrag, pwd = offer.ice_credentials(first)
            algorithm, digest = offer.fingerprint(first)
            fingerprints = [Fingerprint(algorithm, digest)]
        except (SdpError, ValueError) as exc:
            raise ProtocolError("invalid_sdp", str(exc)) from None
        room = self.rooms.get_or_create(participant.room)
        session = participant.publication
        if session is None and participant.stream in room.publications:
            participant.stream = participant.id  # a WHIP publisher took the name meanwhile
        if session is None:
            transport = self.media.create_transport(
                "rtc-pub", ufrag, pwd, fingerprints, group=participant.room
            )
            session = MediaSession(
                kind="rtc",
                room=participant.room,
                stream=participant.stream,
                identity=participant.identity,
                transport=transport,
                release_drain=lambda: None,
            )
            participant.publication = session
            publication = session
            self.events.watch_transport(
                transport.id,
                closed=lambda event: self._publication_closed(participant, publication, event),
            )
            self.rooms.add(session)
        elif session.transport.remote_ufrag != ufrag:
            session.transport = self.media.restart_ice(session.transport.id, ufrag, pwd)
        transport = session.transport
        by_mid = {p.mid: p for p in session.producers}
        wanted = {t.mid for t in plan.tracks}
        ended = [p for mid, p in by_mid.items() if mid not in wanted]
        for producer in ended:
            self.media.close_producer(producer.id)
            self.events.forget(producer.id)
        session.producers = [p for p in session.producers if p.mid in wanted]
        added = open_producers(
            self.media,
            transport.id,
            [t for t in plan.tracks if t.mid not in by_mid],
            e2ee_required=self.config.e2ee.policy_for(participant.room) == "required",
            group=participant.room,
            owner=participant.id,
        )
        for producer in added:
            self.events.watch_producer(
                transport.id,
                producer.id,
                lambda event: self._policy_violation(participant, event.reason),
            )
        session.producers.extend(added)
        if ended:
            self.tracks_unpublished(room, session, ended)
        if added:
            self.tracks_published(room, session, added)
        return render_answer(
            offer, self._local(transport), plan.answer_sections, secrets.randbits(62)
        )

    def _publication_closed(
        self, participant: Participant, session: MediaSession, event: TransportClosed
    ) -> None:
        if participant.publication is session:
            participant.publication = None
        self.rooms.remove(session)
        if not participant.left and event.by_client:
            self.remove(participant, "closed its media connection")
        elif not participant.left:
            participant.send(
                {
                    "type": "error",
                    "code": "transport_closed",
                    "message": f"publish transport closed: {event.reason}",
                }
            )

    def _policy_violation(self, participant: Participant, why: str) -> None:
        with log_context(room=participant.room, participant=participant.id):
            log.warning("stopping publication of %s: %s", participant.id, why)
        participant.send({"type": "error", "code": "e2ee_required", "message": why})
        if participant.publication is not None:
            self.media.close_transport(participant.publication.transport.id, f"e2ee policy: {why}")

    # -- subscribing -------------------------------------------------------------------------

    def subscribe_answer(self, participant: Participant, sdp: str) -> None:
        offers, transport = participant.offers, participant.subscriber
        if offers is None or transport is None:
            if participant.grants.can_subscribe:
                raise ProtocolError(
                    "transport_closed",
                    "the receiving connection is closed; join again to receive media",
                )
            raise ProtocolError(
                "no_subscribe_grant", "this participant has no subscriber transport"
            )
        try:
            answer = parse_sdp(sdp)
            started, rejected = offers.apply_answer(sdp)
            first = next((m for m in answer.media if not m.rejected), None)
            if first is not None and transport.remote_ufrag is None:
                ufrag, pwd = answer.ice_credentials(first)
                algorithm, digest = answer.fingerprint(first)
                participant.subscriber = self.media.set_remote(
                    transport.id, ufrag, pwd, [Fingerprint(algorithm, digest)]
                )
        except (SdpError, ValueError) as exc:
            raise ProtocolError("invalid_sdp", str(exc)) from None
        for track in started:
            self.media.request_keyframe(track.producer.id)
        for track in rejected:
            participant.send(
                {
                    "type": "subscription_failed",
                    "track": track.producer.id,
                    "code": "codec_not_supported",
                    "message": f"the answer rejected {track.producer.codec.name}; the SFU "
                    "forwards the publisher's codec and cannot transcode",
                }
            )
        self.send_offer(participant)

    def set_subscriptions(self, participant: Participant, tracks: Tracks) -> None:
        if isinstance(tracks, tuple):
            participant.subscribe_all = False
            participant.wanted = set(tracks)
        else:
            participant.subscribe_all = True
            participant.wanted = set()
        self._sync_subscriptions(participant)

    def video_size(self, participant: Participant, track_id: str, width: int, height: int) -> None:
        """The size the participant shows a track at: caps its simulcast layer (0 x 0: no
        video). Kept for later subscriptions to the same track too."""
        if not any(track_id == producer.id for _, producer in self._available(participant)):
            raise ProtocolError("unknown_track", f"{track_id!r} is not a track you can receive")
        participant.video_sizes[track_id] = (width, height)
        for offered in participant.offers.live() if participant.offers is not None else ():
            if offered.producer.id == track_id and offered.producer.rids:
                self.media.set_video_size(offered.subscription.id, width, height)

    def _video_layer(self, member: Participant, event: LayerChanged) -> None:
        """Tell a subscriber which layer of a simulcast track it now gets, or that its video
        is paused (no layer fits its bandwidth, or it asked for none)."""
        layer = event.layer
        member.send(
            {
                "type": "video_layer",
                "track": event.producer_id,
                "paused": event.paused,
                "reason": event.reason,
                "layer": None
                if layer is None
                else {"rid": layer.rid, "width": layer.width, "height": layer.height},
                "bandwidth_estimate": event.bandwidth_estimate,
            }
        )

    def mute(self, participant: Participant, track_id: object, muted: bool) -> None:
        session = participant.publication
        if session is None:
            raise ProtocolError("invalid_message", MUTE_USAGE)
        if not any(p.id == track_id for p in session.producers):
            raise ProtocolError("unknown_track", f"{track_id!r} is not one of your tracks")
        participant.muted[str(track_id)] = muted
        room = self.rooms.get(participant.room)
        if room is not None:
            self._broadcast(
                room,
                {
                    "type": "track_muted",
                    "track": track_id,
                    "participant": participant.id,
                    "muted": muted,
                },
                exclude=participant.id,
            )
            self._changed(room.name)

    # -- blind relay -------------------------------------------------------------------------

    def relay(self, participant: Participant, to: str | None, payload: str) -> None:
        limit = self.config.limits.max_relay_payload_bytes
        if len(payload) > limit:
            raise ProtocolError("relay_too_large", f"relay payload exceeds {limit} bytes")
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_message", "relay payload is not base64") from None
        room = self.rooms.get(participant.room)
        if room is None:
            return
        if to is None:
            targets = [m for m in self._members(room) if m.id != participant.id]
            if self.remote_relay is not None:
                self.remote_relay(room, participant.id, None, payload)
        else:
            target = room.members.get(to)
            if (
                target is None
                and self.remote_relay is not None
                and self.remote_relay(room, participant.id, to, payload)
            ):
                self.relay_messages += 1
                self.relay_bytes += len(payload)
                return
            if target is None or target.id == participant.id:
                raise ProtocolError("unknown_participant", "no such participant in this room")
            targets = [target]
        self.deliver_relay(room, participant.id, targets, payload)

    def deliver_relay(
        self, room: Room, sender: str, targets: list[Participant] | None, payload: str
    ) -> None:
        """Hand a key-exchange payload to `targets` (None: every member of the room)."""
        if targets is None:
            targets = [m for m in self._members(room) if m.id != sender]
        message = {"type": "relay", "from": sender, "payload": payload}
        for target in targets:
            target.send(message)
        # Only how much, never what: the payload is neither logged nor kept.
        self.relay_messages += len(targets)
        self.relay_bytes += len(payload) * len(targets)
