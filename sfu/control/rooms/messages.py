"""Client → server messages of the room protocol: one typed definition each, and the table
the socket dispatches by `type`.

`join` is only ever the first message (the socket reads it before anything else, see
`socket._join`); every later message is decoded, parsed into its definition and handled
through `HANDLERS`. A parser checks the message's shape and answers a malformed one with
`invalid_message`; what depends on the room's state (grants, limits, who is there) is
checked by the hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeAlias, TypeVar

from sfu.control.negotiation import require_dtls_offer
from sfu.control.rooms.errors import ProtocolError
from sfu.control.sdp import SdpError, parse_sdp
from sfu.logs import log_context
from sfu.media.layers import MAX_VIDEO_DIMENSION
from sfu.rooms import Participant

if TYPE_CHECKING:
    from sfu.control.rooms.hub import RoomHub

PROTOCOL_VERSION = 1

# What a participant receives: every track, or only the listed track ids.
Tracks: TypeAlias = Literal["all"] | tuple[str, ...]

MUTE_USAGE = "mute needs a published track and muted: true/false"


def loads(text: str | bytes) -> object:
    """JSON as RFC 8259 has it: Python's parser also takes NaN and Infinity, which would
    come back out in echoes (pong) that browsers' JSON.parse refuses. ValueError for those."""
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def decode(text: str) -> tuple[str, dict[str, object]]:
    """A message's `type` and its fields (the `type` included)."""
    try:
        data = loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        raise ProtocolError("invalid_message", "not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("invalid_message", "a message is a JSON object with a type")
    kind: str = data["type"]
    return kind, data


def parse_tracks(value: object) -> Tracks:
    """`subscribe.tracks`, and `join.subscribe`."""
    if value == "all":
        return "all"
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise ProtocolError("invalid_message", 'tracks must be "all" or a list of track ids')


def _sdp_field(data: dict[str, object]) -> str:
    sdp = data.get("sdp")
    if not isinstance(sdp, str):
        raise ProtocolError("invalid_message", "sdp must be a string")
    return sdp


# -- the messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    """The first message. Never refused by parsing: the socket checks version, drain state,
    token and resume in that order, each with its own error code."""

    version: object  # compared with PROTOCOL_VERSION as given (absent: the current one)
    token: str | None
    resume: str | None
    name: str | None
    reuse_sections: bool
    subscribe: object  # parsed by parse_tracks only once the participant has joined

    @classmethod
    def parse(cls, data: dict[str, object]) -> Join:
        token, resume, name = data.get("token"), data.get("resume"), data.get("name")
        return cls(
            version=data.get("version", PROTOCOL_VERSION),
            token=token if isinstance(token, str) else None,
            resume=resume if isinstance(resume, str) else None,
            name=name if isinstance(name, str) else None,
            reuse_sections=data.get("reuse_sections") is True,
            subscribe=data.get("subscribe", "all"),
        )


@dataclass(frozen=True)
class PublishOffer:
    sdp: str

    @classmethod
    def parse(cls, data: dict[str, object]) -> PublishOffer:
        return cls(_sdp_field(data))


@dataclass(frozen=True)
class SubscribeAnswer:
    sdp: str

    @classmethod
    def parse(cls, data: dict[str, object]) -> SubscribeAnswer:
        return cls(_sdp_field(data))


@dataclass(frozen=True)
class Subscribe:
    tracks: Tracks

    @classmethod
    def parse(cls, data: dict[str, object]) -> Subscribe:
        return cls(parse_tracks(data.get("tracks")))


@dataclass(frozen=True)
class Mute:
    # Any JSON value: one that names none of the sender's tracks is answered `unknown_track`
    # with its repr.
    track: object
    muted: bool

    @classmethod
    def parse(cls, data: dict[str, object]) -> Mute:
        muted = data.get("muted")
        if not isinstance(muted, bool):
            raise ProtocolError("invalid_message", MUTE_USAGE)
        return cls(data.get("track"), muted)


VIDEO_SIZE_USAGE = (
    "video_size needs track (a track id) and width and height (integers "
    f"0-{MAX_VIDEO_DIMENSION}; 0 x 0: no video for that track)"
)


@dataclass(frozen=True)
class VideoSize:
    """The largest size the subscriber renders a track at: the SFU forwards no simulcast
    layer larger than needed (0 x 0: no video)."""

    track: str
    width: int
    height: int

    @classmethod
    def parse(cls, data: dict[str, object]) -> VideoSize:
        track = data.get("track")
        if not isinstance(track, str):
            raise ProtocolError("invalid_message", VIDEO_SIZE_USAGE)
        return cls(track, _dimension(data.get("width")), _dimension(data.get("height")))


def _dimension(value: object) -> int:
    # bool is an int in Python, not a size in JSON.
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_VIDEO_DIMENSION
    ):
        raise ProtocolError("invalid_message", VIDEO_SIZE_USAGE)
    return value


@dataclass(frozen=True)
class Relay:
    to: str | None  # None: everyone else in the room
    payload: str  # not yet checked for size and base64: the hub does, in that order

    @classmethod
    def parse(cls, data: dict[str, object]) -> Relay:
        payload, to = data.get("payload"), data.get("to")
        if not isinstance(payload, str) or not payload:
            raise ProtocolError("invalid_message", "relay payload must be a base64 string")
        if to is not None and not isinstance(to, str):
            # str() of a list or number would name nobody, or by accident someone.
            raise ProtocolError("invalid_message", "relay to must be a participant id (string)")
        return cls(to, payload)


@dataclass(frozen=True)
class Ping:
    ts: object  # any JSON value, echoed in the pong

    @classmethod
    def parse(cls, data: dict[str, object]) -> Ping:
        return cls(data.get("ts"))


@dataclass(frozen=True)
class IceCandidate:
    @classmethod
    def parse(cls, data: dict[str, object]) -> IceCandidate:
        return cls()


@dataclass(frozen=True)
class Leave:
    @classmethod
    def parse(cls, data: dict[str, object]) -> Leave:
        return cls()


# -- the handlers: what each message does; True when the participant left ---------------------


def _publish_offer(hub: RoomHub, participant: Participant, msg: PublishOffer) -> bool:
    try:
        offer = parse_sdp(msg.sdp)
        require_dtls_offer(offer)
    except SdpError as exc:
        raise ProtocolError("invalid_sdp", str(exc)) from None
    participant.send({"type": "publish_answer", "sdp": hub.publish(participant, offer)})
    return False


def _subscribe_answer(hub: RoomHub, participant: Participant, msg: SubscribeAnswer) -> bool:
    hub.subscribe_answer(participant, msg.sdp)
    return False


def _subscribe(hub: RoomHub, participant: Participant, msg: Subscribe) -> bool:
    hub.set_subscriptions(participant, msg.tracks)
    return False


def _mute(hub: RoomHub, participant: Participant, msg: Mute) -> bool:
    hub.mute(participant, msg.track, msg.muted)
    return False


def _video_size(hub: RoomHub, participant: Participant, msg: VideoSize) -> bool:
    hub.video_size(participant, msg.track, msg.width, msg.height)
    return False


def _relay(hub: RoomHub, participant: Participant, msg: Relay) -> bool:
    hub.relay(participant, msg.to, msg.payload)
    return False


def _ping(hub: RoomHub, participant: Participant, msg: Ping) -> bool:
    participant.send({"type": "pong", "ts": msg.ts})
    return False


def _ice_candidate(hub: RoomHub, participant: Participant, msg: IceCandidate) -> bool:
    return False  # ICE-lite: client addresses are learnt from its connectivity checks


def _leave(hub: RoomHub, participant: Participant, msg: Leave) -> bool:
    hub.remove(participant, "left")
    return True


M = TypeVar("M")


class Handler(Protocol):
    def run(self, hub: RoomHub, participant: Participant, data: dict[str, object]) -> bool: ...


@dataclass(frozen=True)
class Route(Generic[M]):
    """How one message type is parsed, and what is done with it."""

    parse: Callable[[dict[str, object]], M]
    handle: Callable[[RoomHub, Participant, M], bool]

    def run(self, hub: RoomHub, participant: Participant, data: dict[str, object]) -> bool:
        return self.handle(hub, participant, self.parse(data))


# Every message a joined participant may send, by `type` (docs/protocol.md lists them all).
HANDLERS: Mapping[str, Handler] = MappingProxyType(
    {
        "publish_offer": Route(PublishOffer.parse, _publish_offer),
        "subscribe_answer": Route(SubscribeAnswer.parse, _subscribe_answer),
        "subscribe": Route(Subscribe.parse, _subscribe),
        "mute": Route(Mute.parse, _mute),
        "video_size": Route(VideoSize.parse, _video_size),
        "relay": Route(Relay.parse, _relay),
        "ping": Route(Ping.parse, _ping),
        "ice_candidate": Route(IceCandidate.parse, _ice_candidate),
        "leave": Route(Leave.parse, _leave),
    }
)


def dispatch(hub: RoomHub, participant: Participant, kind: str, data: dict[str, object]) -> bool:
    """Handle one message; True when the participant left."""
    with log_context(room=participant.room, participant=participant.id):
        handler = HANDLERS.get(kind)
        if handler is None:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}")
        return handler.run(hub, participant, data)
