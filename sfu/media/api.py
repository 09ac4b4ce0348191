"""The media plane's API: commands by id in, events out, plain data both ways.

The control plane (signaling, rooms, WHIP/WHEP) never holds a transport, producer or
down-track object: it holds the ids and descriptions below and asks the media plane to act
through `MediaApi`. What the media plane has to tell it (a transport connected or closed, a
track broke the room's E2EE policy, a subscription changed simulcast layer, the room's active
speakers changed) arrives as `MediaEvent`s. Everything crossing this boundary is plain,
picklable data, so the media plane can run in a worker process behind a local channel with
the control plane unchanged; in one process `LocalMedia` (sfu/media/local.py) implements it
directly, with no copying or serialisation.

Ids: a transport id is opaque; a producer id is "<transport id>:<mid>" (the track id the room
protocol shows); a subscription id is opaque. A command naming an id the media plane no longer
knows (its transport closed meanwhile) raises `UnknownMediaId`; closing an unknown id is a
no-op, since closing races with the media plane's own closes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from sfu.media.dtls import Fingerprint
from sfu.media.producer import TrackCodec
from sfu.media.relay import RelayEnd
from sfu.media.snapshot import MediaSnapshot


class UnknownMediaId(LookupError):
    """A command named a transport, producer or subscription the media plane does not have
    (any more): the message names the kind and the id."""


@dataclass(frozen=True)
class TransportInfo:
    """One client transport as signaling needs it: the local ICE credentials and DTLS
    fingerprint go into SDP, the candidates too."""

    id: str
    role: str
    ice_ufrag: str
    ice_pwd: str
    fingerprint: str
    candidates: tuple[tuple[str, int], ...]
    # The client's ICE username fragment (None until its answer, for SFU-made offers).
    remote_ufrag: str | None


@dataclass(frozen=True, eq=False)
class ProducerInfo:
    """A published track: what SDP and the room protocol say about it."""

    id: str
    transport_id: str
    kind: str
    mid: str
    codec: TrackCodec
    ext_ids: Mapping[str, int] = field(default_factory=dict)
    # Simulcast layers by RID, lowest first (empty: one stream).
    rids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubscriptionInfo:
    """One subscriber's copy of a track: the SSRCs and payload types its SDP announces."""

    id: str
    transport_id: str
    producer_id: str
    kind: str
    ssrc: int
    rtx_ssrc: int | None
    payload_type: int
    rtx_payload_type: int | None


@dataclass(frozen=True)
class LayerInfo:
    rid: str | None
    width: int
    height: int


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportConnected:
    """ICE and DTLS completed: media can flow."""

    transport_id: str


@dataclass(frozen=True)
class TransportClosed:
    """The transport is gone, with its producers and subscriptions. `by_client`: the client
    closed it (DTLS close_notify), as browsers do when they leave."""

    transport_id: str
    reason: str
    by_client: bool


@dataclass(frozen=True)
class PolicyViolation:
    """A track in an `e2ee: required` room is judged not end-to-end encrypted."""

    producer_id: str
    reason: str


@dataclass(frozen=True)
class LayerChanged:
    """A simulcast subscription now forwards another layer, or its video paused/resumed."""

    subscription_id: str
    producer_id: str
    paused: bool
    reason: str | None
    layer: LayerInfo | None
    # The subscriber transport's send-side estimate (bit/s), None without feedback.
    bandwidth_estimate: int | None


@dataclass(frozen=True)
class ActiveSpeakers:
    """A group's (room's) dominant speaker changed: owners (participant ids) of the audio
    tracks speaking now, loudest first; empty when nobody speaks any more."""

    group: str
    speakers: tuple[str, ...]


MediaEvent: TypeAlias = (
    TransportConnected | TransportClosed | PolicyViolation | LayerChanged | ActiveSpeakers
)
EventSink: TypeAlias = Callable[[MediaEvent], None]


class MediaApi(Protocol):
    """The commands the control plane gives the media plane."""

    def create_transport(
        self,
        role: str,
        remote_ufrag: str | None,
        remote_pwd: str | None,
        fingerprints: Sequence[Fingerprint],
        *,
        group: str | None = None,
    ) -> TransportInfo:
        """A transport for one client. `role`: whip, whep, rtc-pub or rtc-sub. When the SFU
        makes the offer, the client's ICE credentials and fingerprint come later
        (`set_remote`). `group` (the room) keeps a room's transports on one media worker."""
        ...

    def set_remote(
        self, transport_id: str, ufrag: str, pwd: str, fingerprints: Sequence[Fingerprint]
    ) -> TransportInfo:
        """The client's ICE credentials and DTLS fingerprints, from its answer."""
        ...

    def restart_ice(self, transport_id: str, ufrag: str, pwd: str) -> TransportInfo:
        """ICE restart (RFC 8445 §9): new credentials on both sides, same DTLS association."""
        ...

    def close_transport(self, transport_id: str, reason: str) -> None:
        """Close it (a TransportClosed event follows, unless it was closed already)."""
        ...

    def create_relay(self, end: RelayEnd) -> TransportInfo:
        """One end of a relay to another media plane (sfu/media/relay.py). Add producers to
        it (mirrors of the other plane's tracks) and subscriptions (feeds to it) as to a
        client's transport."""
        ...

    def add_producer(
        self,
        transport_id: str,
        *,
        kind: str,
        mid: str,
        codec: TrackCodec,
        ext_ids: Mapping[str, int],
        ssrc: int | None,
        rtx_ssrc: int | None,
        rids: Sequence[str] = (),
        e2ee_required: bool = False,
        group: str | None = None,
        owner: str | None = None,
    ) -> ProducerInfo:
        """A published track. `group` (the room) and `owner` (the participant) name it in
        ActiveSpeakers events; `e2ee_required` makes a plaintext verdict a
        PolicyViolation."""
        ...

    def set_publisher_extensions(
        self,
        transport_id: str,
        *,
        mid: int | None,
        rid: int | None,
        repaired_rid: int | None,
        transport_cc: int | None,
    ) -> None:
        """The publisher's extension ids that bind undeclared SSRCs (MID, RID, repaired RID)
        and that carry its transport-wide numbers (the SFU then sends it feedback)."""
        ...

    def close_producer(self, producer_id: str) -> None: ...

    def request_keyframe(self, producer_id: str) -> None:
        """Ask the publisher for a keyframe (throttled per track)."""
        ...

    def add_subscription(
        self,
        transport_id: str,
        producer_id: str,
        *,
        payload_type: int,
        rtx_payload_type: int | None,
        ext_map: Mapping[int, int],
        paused: bool = False,
        max_size: tuple[int, int] | None = None,
        ssrcs: tuple[int, int | None] | None = None,
    ) -> SubscriptionInfo:
        """Forward the track to the transport. `ext_map`: publisher extension id ->
        subscriber id (absent: dropped). `max_size`: the size the subscriber shows the
        video at, which caps a simulcast track's layer. `ssrcs` (SSRC, RTX SSRC): chosen by
        the caller (a relay's other end, which announced them already), else by the media
        plane."""
        ...

    def set_paused(self, subscription_id: str, paused: bool) -> None: ...

    def set_video_size(self, subscription_id: str, width: int, height: int) -> None: ...

    def negotiated(self, subscription_id: str, *, extension_ids: set[int], rtx: bool) -> None:
        """The subscriber's answer: only these (offered) extension ids, RTX or not."""
        ...

    def enable_bandwidth_estimation(self, transport_id: str, transport_cc: int) -> None:
        """The subscriber takes transport-cc under this id: stamp and estimate (idempotent)."""
        ...

    def end_subscription(self, subscription_id: str, *, bye: bool) -> None:
        """Stop forwarding; with `bye`, tell the subscriber (RTCP BYE) first."""
        ...

    def snapshot(self) -> MediaSnapshot:
        """Counters and gauges as plain data, for /metrics."""
        ...
