"""Rooms across media workers: the relays between workers and the tracks they carry.

When a subscriber on worker B asks for a track published on worker A, B needs a local copy
of it. `RelayMesh` gives it one, made from the pieces every client already uses:

- one relay per pair of workers (sfu/media/relay.py): a transport on each, over DTLS-SRTP
  on loopback, the higher-numbered worker dialing the lower one;
- on A, a subscription of the track on A's relay end (the *feed*): A forwards the packets to
  B as to any subscriber, answers B's NACKs from its packet cache and passes B's keyframe
  requests on to the publisher;
- on B, a producer on B's relay end (the *mirror*) whose SSRCs are the feed's: B's
  subscribers subscribe to the mirror as to any local track.

A track therefore crosses to a worker once, however many subscribers it has there; the mirror
and its feed go when the last such subscription ends, or with the track. The encrypted
payload is never touched on the way (the feed forwards it like any down-track), and every
header extension crosses unchanged so that B's subscribers get the same ones as A's. A
simulcast track crosses as the one layer the feed selects (its highest, as the relay has no
bandwidth limit); B's subscribers then all receive that layer.

If a relay breaks while both workers live (consent lost, DTLS failed), the subscribers that
received through it are closed with a reason that says so: their clients reconnect, and the
room protocol's resume puts them back in the call. If a worker dies, its relays and the
mirrors of its tracks go with it; the control plane already ends those subscriptions when the
tracks' transports are reported closed.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sfu.media.api import ProducerInfo, UnknownMediaId
from sfu.media.dtls import Fingerprint
from sfu.media.relay import RelayEnd

if TYPE_CHECKING:
    from sfu.media.workers import RemoteMedia as Plane

log = logging.getLogger(__name__)


@dataclass
class _Published:
    info: ProducerInfo
    group: str | None
    owner: str | None
    mirrors: set[int] = field(default_factory=set)


@dataclass
class _Relay:
    key: tuple[int, int]
    ends: dict[int, str]
    connected: set[int] = field(default_factory=set)


@dataclass
class _Mirror:
    producer_id: str
    source: int
    target: int
    relay: tuple[int, int]
    mirror_id: str
    feed_id: str
    subscriptions: set[str] = field(default_factory=set)


class RelayMesh:
    """Relays, feeds and mirrors between the workers of one pool."""

    def __init__(self, planes: Sequence[Plane], fingerprints: Callable[[], list[Fingerprint]]):
        self._planes = planes
        self._fingerprints = fingerprints
        self._published: dict[str, _Published] = {}
        self._by_publisher: dict[str, set[str]] = {}
        self._relays: dict[tuple[int, int], _Relay] = {}
        self._relay_ids: dict[str, tuple[int, int]] = {}
        self._mirrors: dict[tuple[str, int], _Mirror] = {}
        self._mirror_ids: dict[str, _Mirror] = {}
        # Subscriber subscription id -> the mirror it receives from.
        self._via: dict[str, _Mirror] = {}
        self._mids = itertools.count(1)
        # Counters for /metrics.
        self.relays_opened = 0
        self.relays_failed = 0
        self.mirrors_opened = 0

    # -- what the pool asks ------------------------------------------------------------------

    def is_relay(self, transport_id: str) -> bool:
        return transport_id in self._relay_ids

    @staticmethod
    def is_relay_id(transport_id: str) -> bool:
        """A relay end's id, open or already forgotten (its close event still to come)."""
        return ".~relay-" in transport_id

    def relays(self) -> int:
        return len(self._relays)

    def mirrors(self) -> int:
        return len(self._mirrors)

    def original(self, producer_id: str) -> str:
        """The track a mirror copies (its id as the control plane knows it), or the id."""
        mirror = self._mirror_ids.get(producer_id)
        return mirror.producer_id if mirror is not None else producer_id

    def is_mirror(self, producer_id: str) -> bool:
        return producer_id in self._mirror_ids

    def published(self, info: ProducerInfo, group: str | None, owner: str | None) -> None:
        self._published[info.id] = _Published(info, group, owner)
        self._by_publisher.setdefault(info.transport_id, set()).add(info.id)

    def local_source(self, producer_id: str, source: Plane, target: Plane) -> str:
        """The producer a subscriber on `target` subscribes to for `producer_id` (published
        on `source`): the track itself, or its mirror on `target`, made on first use."""
        if source is target:
            return producer_id
        mirror = self._mirrors.get((producer_id, target.index))
        if mirror is None:
            mirror = self._open_mirror(producer_id, source, target)
        return mirror.mirror_id

    def subscribed(self, subscription_id: str, producer_id: str) -> None:
        """A subscriber subscription was made on `producer_id` (from `local_source`)."""
        mirror = self._mirror_ids.get(producer_id)
        if mirror is not None:
            mirror.subscriptions.add(subscription_id)
            self._via[subscription_id] = mirror

    def subscription_ended(self, subscription_id: str) -> None:
        mirror = self._via.pop(subscription_id, None)
        if mirror is None:
            return
        mirror.subscriptions.discard(subscription_id)
        if not mirror.subscriptions:
            self._close_mirror(mirror)

    def producer_closed(self, producer_id: str) -> None:
        published = self._published.pop(producer_id, None)
        if published is None:
            return
        self._by_publisher.get(published.info.transport_id, set()).discard(producer_id)
        for target in list(published.mirrors):
            mirror = self._mirrors.get((producer_id, target))
            if mirror is not None:
                self._close_mirror(mirror)

    def transport_closed(self, transport_id: str) -> list[tuple[str, int]]:
        """A transport closed: forget what it published and what it subscribed through
        mirrors. For a relay, returns the subscriber transports (id, worker) that received
        through it and must now reconnect."""
        for producer_id in list(self._by_publisher.pop(transport_id, ())):
            self.producer_closed(producer_id)
        prefix = transport_id + "/"
        for subscription_id in [s for s in self._via if s.startswith(prefix)]:
            self.subscription_ended(subscription_id)
        key = self._relay_ids.get(transport_id)
        if key is None:
            return []
        relay = self._relays.pop(key)
        for end in relay.ends.values():
            self._relay_ids.pop(end, None)
        if relay.connected != set(key):
            self.relays_failed += 1
        orphans: list[tuple[str, int]] = []
        for mirror in [m for m in self._mirrors.values() if m.relay == key]:
            for subscription_id in mirror.subscriptions:
                orphans.append((subscription_id.rpartition("/")[0], mirror.target))
            mirror.subscriptions.clear()
            self._close_mirror(mirror)
        # The other end, if its worker still runs (closing a closed one is a no-op).
        for index, end in relay.ends.items():
            if self._planes[index].running:
                self._planes[index].close_transport(end, "relay closed at the other end")
        return sorted(set(orphans))

    def relay_connected(self, transport_id: str, index: int) -> None:
        key = self._relay_ids.get(transport_id)
        if key is not None:
            self._relays[key].connected.add(index)

    def worker_lost(self, index: int) -> None:
        """A worker died: its relays, and the mirrors fed from or living on it, are gone."""
        for key in [k for k in self._relays if index in k]:
            relay = self._relays.pop(key)
            for end in relay.ends.values():
                self._relay_ids.pop(end, None)
            other = key[0] if key[1] == index else key[1]
            if self._planes[other].running:
                self._planes[other].close_transport(
                    relay.ends[other], f"relay to media worker {index} lost"
                )
        for mirror in [m for m in self._mirrors.values() if index in (m.source, m.target)]:
            for subscription_id in mirror.subscriptions:
                self._via.pop(subscription_id, None)
            mirror.subscriptions.clear()
            self._close_mirror(mirror)
        for producer_id, published in list(self._published.items()):
            if producer_id.startswith(f"w{index}."):
                self._published.pop(producer_id)
                self._by_publisher.pop(published.info.transport_id, None)

    # -- relays and mirrors ------------------------------------------------------------------

    def _relay(self, a: Plane, b: Plane) -> _Relay:
        key = (min(a.index, b.index), max(a.index, b.index))
        relay = self._relays.get(key)
        if relay is not None:
            return relay
        answering, dialing = self._planes[key[0]], self._planes[key[1]]
        target = answering.relay_address()
        if target is None:
            raise UnknownMediaId(f"media worker {answering.index} has no relay address")
        token = secrets.token_urlsafe(6)
        # "~" never occurs in a client transport's token (URL-safe base64): `is_relay_id`.
        ends = {key[0]: f"w{key[0]}.~relay-{token}", key[1]: f"w{key[1]}.~relay-{token}"}
        answer, dial = RelayEnd.pair(self._fingerprints(), target)
        answering.create_relay(answer, ends[key[0]])
        dialing.create_relay(dial, ends[key[1]])
        relay = _Relay(key, ends)
        self._relays[key] = relay
        for end in ends.values():
            self._relay_ids[end] = key
        self.relays_opened += 1
        log.info("relay between media workers %d and %d opened", key[0], key[1])
        return relay

    def _open_mirror(self, producer_id: str, source: Plane, target: Plane) -> _Mirror:
        published = self._published.get(producer_id)
        if published is None:
            raise UnknownMediaId(f"no producer {producer_id!r}")
        info = published.info
        relay = self._relay(source, target)
        # Every extension crosses under its own id: the mirror declares the same ids, so
        # the subscribers on the target get what they would get on the source.
        identity = {ext_id: ext_id for ext_id in info.ext_ids.values()}
        feed = source.add_subscription(
            relay.ends[source.index],
            producer_id,
            payload_type=info.codec.payload_type,
            rtx_payload_type=info.codec.rtx_payload_type,
            ext_map=identity,
        )
        source.negotiated(
            feed.id, extension_ids=set(identity.values()), rtx=feed.rtx_ssrc is not None
        )
        mirror_info = target.add_producer(
            relay.ends[target.index],
            kind=info.kind,
            mid=f"m{next(self._mids)}",
            codec=info.codec,
            ext_ids=dict(info.ext_ids),
            ssrc=feed.ssrc,
            rtx_ssrc=feed.rtx_ssrc,
            group=published.group,
            owner=published.owner,
        )
        mirror = _Mirror(
            producer_id, source.index, target.index, relay.key, mirror_info.id, feed.id
        )
        self._mirrors[(producer_id, target.index)] = mirror
        self._mirror_ids[mirror.mirror_id] = mirror
        published.mirrors.add(target.index)
        self.mirrors_opened += 1
        return mirror

    def _close_mirror(self, mirror: _Mirror) -> None:
        if self._mirrors.get((mirror.producer_id, mirror.target)) is not mirror:
            return
        del self._mirrors[(mirror.producer_id, mirror.target)]
        self._mirror_ids.pop(mirror.mirror_id, None)
        for subscription_id in mirror.subscriptions:
            self._via.pop(subscription_id, None)
        published = self._published.get(mirror.producer_id)
        if published is not None:
            published.mirrors.discard(mirror.target)
        target, source = self._planes[mirror.target], self._planes[mirror.source]
        if target.running:
            target.close_producer(mirror.mirror_id)
        if source.running:
            source.end_subscription(mirror.feed_id, bye=False)
        if not any(m.relay == mirror.relay for m in self._mirrors.values()):
            # Nothing crosses it any more: a room that spans the two workers again later
            # opens a new one (a handshake on loopback, a few milliseconds).
            self._close_relay(mirror.relay, "no track crosses it any more")

    def _close_relay(self, key: tuple[int, int], reason: str) -> None:
        relay = self._relays.pop(key, None)
        if relay is None:
            return
        for index, end in relay.ends.items():
            self._relay_ids.pop(end, None)
            if self._planes[index].running:
                self._planes[index].close_transport(end, reason)
