"""Routing the media plane's events (sfu/media/api.py) to the control-plane code that owns
each id: a WHIP/WHEP session or a room participant watches its transports, the tracks it
published and the subscriptions it holds; the room hub watches active speakers.

Handlers of a transport, and of the producers and subscriptions on it, are forgotten when its
TransportClosed event has been delivered, so a long-running server keeps no entry of an ended
session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sfu.media.api import (
    ActiveSpeakers,
    LayerChanged,
    MediaEvent,
    PolicyViolation,
    TransportClosed,
    TransportConnected,
)

log = logging.getLogger(__name__)


class _Watch:
    __slots__ = ("closed", "connected", "layers", "violations")

    def __init__(self) -> None:
        self.connected: Callable[[], None] | None = None
        self.closed: Callable[[TransportClosed], None] | None = None
        self.violations: dict[str, Callable[[PolicyViolation], None]] = {}
        self.layers: dict[str, Callable[[LayerChanged], None]] = {}


class MediaEvents:
    """The control plane's sink for media events (`EventSink`)."""

    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}
        # Producer or subscription id -> the transport it belongs to.
        self._owner: dict[str, str] = {}
        self.speaker_listeners: list[Callable[[ActiveSpeakers], None]] = []

    def watch_transport(
        self,
        transport_id: str,
        *,
        connected: Callable[[], None] | None = None,
        closed: Callable[[TransportClosed], None] | None = None,
    ) -> None:
        watch = self._watches.setdefault(transport_id, _Watch())
        watch.connected, watch.closed = connected, closed

    def unwatch_transport(self, transport_id: str) -> None:
        """Stop listening (e.g. before closing a transport whose session was refused)."""
        watch = self._watches.pop(transport_id, None)
        if watch is not None:
            for key in (*watch.violations, *watch.layers):
                self._owner.pop(key, None)

    def watch_producer(
        self, transport_id: str, producer_id: str, handler: Callable[[PolicyViolation], None]
    ) -> None:
        self._watches.setdefault(transport_id, _Watch()).violations[producer_id] = handler
        self._owner[producer_id] = transport_id

    def watch_subscription(
        self, transport_id: str, subscription_id: str, handler: Callable[[LayerChanged], None]
    ) -> None:
        self._watches.setdefault(transport_id, _Watch()).layers[subscription_id] = handler
        self._owner[subscription_id] = transport_id

    def forget(self, key: str) -> None:
        """A producer or subscription ended while its transport goes on."""
        transport_id = self._owner.pop(key, None)
        watch = self._watches.get(transport_id) if transport_id is not None else None
        if watch is not None:
            watch.violations.pop(key, None)
            watch.layers.pop(key, None)

    def __call__(self, event: MediaEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            # A failing handler must not break the media plane that delivered the event.
            log.exception("handling media event %s failed", type(event).__name__)

    def _dispatch(self, event: MediaEvent) -> None:
        handler: Any = None
        if isinstance(event, TransportConnected):
            watch = self._watches.get(event.transport_id)
            handler = watch.connected if watch is not None else None
            if handler is not None:
                handler()
        elif isinstance(event, TransportClosed):
            watch = self._watches.get(event.transport_id)
            self.unwatch_transport(event.transport_id)
            if watch is not None and watch.closed is not None:
                watch.closed(event)
        elif isinstance(event, PolicyViolation):
            watch = self._watch_of(event.producer_id)
            handler = watch.violations.get(event.producer_id) if watch is not None else None
            if handler is not None:
                handler(event)
        elif isinstance(event, LayerChanged):
            watch = self._watch_of(event.subscription_id)
            handler = watch.layers.get(event.subscription_id) if watch is not None else None
            if handler is not None:
                handler(event)
        elif isinstance(event, ActiveSpeakers):
            for listener in list(self.speaker_listeners):
                listener(event)

    def _watch_of(self, key: str) -> _Watch | None:
        transport_id = self._owner.get(key)
        return self._watches.get(transport_id) if transport_id is not None else None
