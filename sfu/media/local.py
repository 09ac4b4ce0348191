"""`LocalMedia`: the media API (api.py) implemented by the engine in this process.

It keeps the id -> object tables, turns the media objects' callbacks into `MediaEvent`s for
the control plane's sink, and runs the active-speaker detector over each group's audio
producers (the levels never leave the media plane; only changes of the dominant speaker do).
Commands run synchronously and events are delivered synchronously, in order, so one process
behaves exactly as before the boundary existed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence

from sfu.media.api import (
    ActiveSpeakers,
    EventSink,
    LayerChanged,
    LayerInfo,
    MediaEvent,
    PolicyViolation,
    ProducerInfo,
    SubscriptionInfo,
    TransportClosed,
    TransportConnected,
    TransportInfo,
    UnknownMediaId,
)
from sfu.media.downtrack import DownTrack, JoinTimer
from sfu.media.dtls import Fingerprint
from sfu.media.engine import MediaEngine
from sfu.media.producer import TrackCodec
from sfu.media.relay import RelayEnd
from sfu.media.simulcast import AnyProducer, SimulcastDownTrack
from sfu.media.snapshot import MediaSnapshot, build_snapshot
from sfu.media.speaker import SpeakerDetector
from sfu.media.transport import Transport, TransportState

log = logging.getLogger(__name__)

# How often each group's active speaker is re-evaluated (seconds).
SPEAKER_INTERVAL = 0.3
SUBSCRIBER_ROLES = ("whep", "rtc-sub")


class _Track:
    """A producer and where it belongs, for the speaker detector and for events."""

    __slots__ = ("group", "owner", "producer", "transport_id")

    def __init__(
        self, producer: AnyProducer, transport_id: str, group: str | None, owner: str | None
    ) -> None:
        self.producer = producer
        self.transport_id = transport_id
        self.group = group
        self.owner = owner


class LocalMedia:
    """The in-process media plane behind `MediaApi`."""

    def __init__(self, engine: MediaEngine) -> None:
        self.engine = engine
        self.sink: EventSink | None = None
        self._tracks: dict[str, _Track] = {}
        self._subscriptions: dict[str, DownTrack] = {}
        # Transport id -> the ids of its producers and subscriptions, so that a closing
        # transport forgets its own without scanning everyone's (churn on a busy server).
        self._owned: dict[str, set[str]] = {}
        self._joins: dict[str, JoinTimer] = {}
        self._speakers: dict[str, SpeakerDetector] = {}
        self._next_speakers = 0.0
        engine.tick_hooks.append(self._on_tick)

    def _emit(self, event: MediaEvent) -> None:
        if self.sink is not None:
            self.sink(event)

    # -- lookups -----------------------------------------------------------------------------

    def _transport(self, transport_id: str) -> Transport:
        transport = self.engine.transports.get(transport_id)
        if transport is None or transport.state is TransportState.CLOSED:
            raise UnknownMediaId(f"no transport {transport_id!r}")
        return transport

    def _producer(self, producer_id: str) -> AnyProducer:
        track = self._tracks.get(producer_id)
        if track is None:
            raise UnknownMediaId(f"no producer {producer_id!r}")
        return track.producer

    def _subscription(self, subscription_id: str) -> DownTrack:
        downtrack = self._subscriptions.get(subscription_id)
        if downtrack is None:
            raise UnknownMediaId(f"no subscription {subscription_id!r}")
        return downtrack

    def _info(self, transport: Transport) -> TransportInfo:
        return TransportInfo(
            id=transport.id,
            role=transport.role,
            ice_ufrag=transport.ice.local_ufrag,
            ice_pwd=transport.ice.local_pwd,
            fingerprint=self.engine.fingerprint,
            candidates=tuple(self.engine.candidates),
            remote_ufrag=transport.ice.remote_ufrag,
        )

    # -- transports --------------------------------------------------------------------------

    def create_transport(
        self,
        role: str,
        remote_ufrag: str | None,
        remote_pwd: str | None,
        fingerprints: Sequence[Fingerprint],
        *,
        group: str | None = None,
        transport_id: str | None = None,
        local: tuple[str, str] | None = None,
    ) -> TransportInfo:
        # `transport_id` and `local` (ICE ufrag, pwd): chosen by the control plane when this
        # runs in a media worker, so its commands need no reply (sfu/media/workers.py).
        transport = self.engine.create_transport(
            role, remote_ufrag, remote_pwd, fingerprints, transport_id=transport_id, local=local
        )
        if role in SUBSCRIBER_ROLES:
            # Join latency and time to first frame count from the subscribe request.
            self._joins[transport.id] = JoinTimer()
        transport.on_connected = self._connected
        transport.on_closed = self._closed
        return self._info(transport)

    def create_relay(self, end: RelayEnd, transport_id: str | None = None) -> TransportInfo:
        """One end of a relay to another media plane (sfu/media/relay.py): `dial` is the
        other end's address when this end dials it. Its producers mirror the other plane's
        tracks, its subscriptions feed the other plane; the pool that joins the two
        (sfu/media/workers.py) adds both like a client's."""
        transport = self.engine.create_relay(transport_id or secrets.token_urlsafe(9), end)
        transport.on_connected = self._connected
        transport.on_closed = self._closed
        return self._info(transport)

    def _connected(self, transport: Transport) -> None:
        self._emit(TransportConnected(transport.id))

    def _closed(self, transport: Transport) -> None:
        self._joins.pop(transport.id, None)
        for key in self._owned.pop(transport.id, ()):
            self._tracks.pop(key, None)
            self._subscriptions.pop(key, None)
        self._emit(
            TransportClosed(
                transport.id, transport.close_reason or "closed", transport.closed_by_client
            )
        )

    def set_remote(
        self, transport_id: str, ufrag: str, pwd: str, fingerprints: Sequence[Fingerprint]
    ) -> TransportInfo:
        transport = self._transport(transport_id)
        transport.ice.set_remote_credentials(ufrag, pwd)
        transport.set_remote_fingerprints(list(fingerprints))
        return self._info(transport)

    def restart_ice(
        self, transport_id: str, ufrag: str, pwd: str, *, local: tuple[str, str] | None = None
    ) -> TransportInfo:
        transport = self._transport(transport_id)
        self.engine.restart_ice(transport, ufrag, pwd, local)
        return self._info(transport)

    def close_transport(self, transport_id: str, reason: str) -> None:
        transport = self.engine.transports.get(transport_id)
        if transport is not None:
            transport.close(reason)

    # -- producers ---------------------------------------------------------------------------

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
        transport = self._transport(transport_id)
        producer = self.engine.add_producer(
            transport,
            kind=kind,
            mid=mid,
            codec=codec,
            ext_ids=dict(ext_ids),
            ssrc=ssrc,
            rtx_ssrc=rtx_ssrc,
            rids=rids,
        )
        if e2ee_required:
            producer.e2ee_required = True
            producer.on_policy_violation = self._violation
        self._tracks[producer.id] = _Track(producer, transport_id, group, owner)
        self._owned.setdefault(transport_id, set()).add(producer.id)
        if group is not None and kind == "audio":
            self._speakers.setdefault(group, SpeakerDetector())
        return ProducerInfo(
            id=producer.id,
            transport_id=transport_id,
            kind=kind,
            mid=mid,
            codec=codec,
            ext_ids=dict(ext_ids),
            rids=tuple(rids),
        )

    def _violation(self, producer: AnyProducer, reason: str) -> None:
        self._emit(PolicyViolation(producer.id, reason))

    def set_publisher_extensions(
        self,
        transport_id: str,
        *,
        mid: int | None,
        rid: int | None,
        repaired_rid: int | None,
        transport_cc: int | None,
    ) -> None:
        transport = self._transport(transport_id)
        if mid is not None:
            transport.mid_ext_id = mid
        if rid is not None:
            transport.rid_ext_id = rid
        if repaired_rid is not None:
            transport.repaired_rid_ext_id = repaired_rid
        if transport_cc is not None:
            transport.enable_twcc(transport_cc)

    def close_producer(self, producer_id: str) -> None:
        track = self._tracks.pop(producer_id, None)
        if track is None:
            return
        self._owned.get(track.transport_id, set()).discard(producer_id)
        track.producer.close()
        transport = self.engine.transports.get(track.transport_id)
        if transport is not None:
            transport.remove_producer(track.producer)

    def request_keyframe(self, producer_id: str) -> None:
        track = self._tracks.get(producer_id)
        if track is not None:
            track.producer.request_keyframe()

    # -- subscriptions -----------------------------------------------------------------------

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
        transport = self._transport(transport_id)
        producer = self._producer(producer_id)
        downtrack = self.engine.add_downtrack(
            transport,
            producer,
            payload_type=payload_type,
            rtx_payload_type=rtx_payload_type,
            ext_map=dict(ext_map),
            join=self._joins.get(transport_id),
            ssrcs=ssrcs,
        )
        if paused:
            downtrack.paused = True
        subscription_id = f"{transport_id}/{downtrack.ssrc}"
        self._subscriptions[subscription_id] = downtrack
        self._owned.setdefault(transport_id, set()).add(subscription_id)
        if isinstance(downtrack, SimulcastDownTrack):
            if max_size is not None:
                downtrack.max_width, downtrack.max_height = max_size
            downtrack.on_layer = lambda d: self._layer_changed(subscription_id, d)
        return SubscriptionInfo(
            id=subscription_id,
            transport_id=transport_id,
            producer_id=producer_id,
            kind=producer.kind,
            ssrc=downtrack.ssrc,
            rtx_ssrc=downtrack.rtx_ssrc,
            payload_type=payload_type,
            rtx_payload_type=downtrack.rtx_payload_type,
        )

    def _layer_changed(self, subscription_id: str, downtrack: SimulcastDownTrack) -> None:
        layer = None if downtrack.suspended else downtrack.producer
        bwe = downtrack.sink.bwe if isinstance(downtrack.sink, Transport) else None
        self._emit(
            LayerChanged(
                subscription_id=subscription_id,
                producer_id=downtrack.track.id,
                paused=downtrack.suspended,
                reason=downtrack.reason,
                layer=None if layer is None else LayerInfo(layer.rid, layer.width, layer.height),
                bandwidth_estimate=None if bwe is None else round(bwe.estimate_bps),
            )
        )

    def set_paused(self, subscription_id: str, paused: bool) -> None:
        self._subscription(subscription_id).paused = paused

    def set_video_size(self, subscription_id: str, width: int, height: int) -> None:
        downtrack = self._subscription(subscription_id)
        if isinstance(downtrack, SimulcastDownTrack):
            downtrack.max_width, downtrack.max_height = width, height

    def negotiated(self, subscription_id: str, *, extension_ids: set[int], rtx: bool) -> None:
        downtrack = self._subscription(subscription_id)
        downtrack.restrict_extensions(extension_ids)
        if not rtx:
            downtrack.disable_rtx()

    def enable_bandwidth_estimation(self, transport_id: str, transport_cc: int) -> None:
        transport = self._transport(transport_id)
        if transport.bwe is None:
            transport.enable_bwe(transport_cc)

    def end_subscription(self, subscription_id: str, *, bye: bool) -> None:
        downtrack = self._subscriptions.pop(subscription_id, None)
        if downtrack is None:
            return
        # The id is "<transport id>/<ssrc>" (add_subscription).
        transport_id = subscription_id.rpartition("/")[0]
        self._owned.get(transport_id, set()).discard(subscription_id)
        transport = self.engine.transports.get(transport_id)
        if transport is not None and transport.role == "relay":
            self.engine.retire_relay_feeds([downtrack])
        if bye:
            downtrack.stop()
        else:
            downtrack.close()

    # -- state -------------------------------------------------------------------------------

    def snapshot(self) -> MediaSnapshot:
        return build_snapshot(self.engine)

    def _on_tick(self, now: float) -> None:
        if now < self._next_speakers:
            return
        self._next_speakers = now + SPEAKER_INTERVAL
        by_group: dict[str, dict[str, list[AnyProducer]]] = {group: {} for group in self._speakers}
        for track in self._tracks.values():
            if track.group is None or track.producer.kind != "audio" or track.producer.closed:
                continue
            owners = by_group.setdefault(track.group, {})
            owners.setdefault(track.owner or track.transport_id, []).append(track.producer)
        for group, owners in by_group.items():
            detector = self._speakers.setdefault(group, SpeakerDetector())
            if not owners and detector.dominant is None:
                # Nobody publishes audio in it any more: forget the group.
                del self._speakers[group]
                continue
            changed = detector.update(owners, now)
            if changed is not None:
                self._emit(ActiveSpeakers(group, tuple(changed)))
