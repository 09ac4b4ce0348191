"""Admission: whether a new WHIP/WHEP session or room participant may start, before anything
is created for it.

Limits that hold under abuse (each a `limits.*` key, docs/configuration.md):
- a server-wide cap on sessions (WHIP/WHEP sessions plus room participants), which /readyz
  reports as saturation so a load balancer stops sending new work;
- WHIP/WHEP sessions per identity, sessions per room and published streams per room;
- the rate at which one identity, and one client IP, may start sessions (token buckets).

The per-key buckets live in bounded tables: a client that rotates identities or addresses
costs a fixed amount of memory, not one entry per attempt.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from sfu.config import LimitsConfig
from sfu.control.problems import ApiError
from sfu.rooms import MediaSession, Rooms

# Buckets kept per table. Past this, full (idle) buckets are dropped first, then the oldest.
MAX_BUCKETS = 10_000
# Below this size a table is never swept for refilled buckets (a sweep walks the table).
MIN_SWEEP = 64

REFUSAL_REASONS = (
    "server_full",
    "rate_identity",
    "rate_ip",
    "identity_sessions",
    "room_sessions",
    "room_streams",
    "pending_ip",
)


class Refused(ApiError):
    """A limit refuses a new session. `reason` labels sfu_admission_refusals_total;
    `retry_after` (seconds) goes into Retry-After when known."""

    def __init__(
        self, status: int, code: str, detail: str, reason: str, retry_after: float | None = None
    ) -> None:
        super().__init__(status, code, detail)
        self.reason = reason
        self.retry_after = retry_after


class TokenBucket:
    """`rate` tokens per second, at most `burst` held; one token per new session."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now


class RateTable:
    """Token buckets by key, bounded to MAX_BUCKETS entries."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}
        # The size at which a new key first sweeps out refilled buckets. Swept only when
        # full, the table kept a bucket for every identity that ever started a session, up
        # to max_keys: churn of distinct identities grew it for good. Doubling keeps sweeps
        # amortised O(1) per new key and the table near twice the keys active in one refill.
        self._sweep_at = min(max_keys, MIN_SWEEP)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Spend one token for `key`: 0.0 if there was one, else seconds until there is."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: dropping it forgets nothing.
        refill = self.burst / self.rate
        for key in [k for k, b in self._buckets.items() if now - b.stamp >= refill]:
            del self._buckets[key]
        # Still full: drop the oldest half. Those keys start again with a full burst, which
        # bounds memory at the price of some leniency toward a client cycling many keys.
        while len(self._buckets) >= self.max_keys:
            for key in list(self._buckets)[: max(1, self.max_keys // 2)]:
                del self._buckets[key]
        self._sweep_at = min(self.max_keys, max(MIN_SWEEP, 2 * len(self._buckets)))


def request_ip(request: web.BaseRequest, trusted: Sequence[str]) -> str:
    """The client address of an HTTP request or WebSocket upgrade (see `client_ip`)."""
    return client_ip(request.remote, request.headers.get("X-Forwarded-For"), trusted)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[str]) -> str:
    """The address limits apply to: the TCP peer, unless that is a trusted proxy, in which
    case the last X-Forwarded-For hop that is not one (RFC 7239 semantics, the common header).
    """
    if peer is None:
        return "unknown"
    if not forwarded_for or not _in(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop[:64]  # a header value, not an address we parsed: keep it short
    return peer


def _in(address: str, networks: Sequence[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


def _decrement(counts: dict[str, int], key: str) -> None:
    """Count one down; a key at 0 is removed, so churn through many keys leaves nothing."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@dataclass
class Counts:
    """WHIP/WHEP sessions per identity, kept as sessions start and end (a RoomListener)."""

    by_identity: dict[str, int]

    def session_added(self, session: MediaSession) -> None:
        if session.kind in ("whip", "whep"):
            self.by_identity[session.identity] = self.by_identity.get(session.identity, 0) + 1

    def session_removed(self, session: MediaSession) -> None:
        if session.kind in ("whip", "whep"):
            _decrement(self.by_identity, session.identity)


class Admission:
    def __init__(
        self,
        limits: LimitsConfig,
        rooms: Rooms,
        participants: Callable[[], int],
        on_refusal: Callable[[str], None] = lambda _reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.rooms = rooms
        self.participants = participants
        self.on_refusal = on_refusal
        self.clock = clock
        self.by_identity = RateTable(
            limits.session_rate_per_identity, limits.session_burst_per_identity
        )
        self.by_ip = RateTable(limits.session_rate_per_ip, limits.session_burst_per_ip)
        self.counts = Counts({})
        rooms.listeners.append(self.counts)
        # WebSockets that have not joined yet, per client IP (entries removed at 0).
        self.pending: dict[str, int] = {}

    # -- what /readyz and the metrics read ---------------------------------------------------

    def sessions(self) -> int:
        """WHIP/WHEP sessions and room participants now on this server."""
        return self.rooms.count("whip") + self.rooms.count("whep") + self.participants()

    @property
    def saturated(self) -> bool:
        return self.sessions() >= self.limits.max_sessions

    # -- checks ------------------------------------------------------------------------------

    def admit_session(self, kind: str, room: str, identity: str, ip: str) -> None:
        """A new WHIP (`kind` "whip") or WHEP session; raises Refused."""
        self._common(identity, ip)
        limits = self.limits
        held = self.counts.by_identity.get(identity, 0)
        if held >= limits.max_sessions_per_identity:
            self._refuse(
                429,
                "session_limit",
                f"identity {identity!r} already holds {held} WHIP/WHEP sessions "
                f"(limits.max_sessions_per_identity); end one (DELETE) first",
                "identity_sessions",
            )
        existing = self.rooms.get(room)
        if existing is None:
            return
        in_room = len(existing.publications) + len(existing.subscriptions)
        if in_room >= limits.max_sessions_per_room:
            self._refuse(
                429,
                "session_limit",
                f"room {room!r} has {in_room} sessions (limits.max_sessions_per_room)",
                "room_sessions",
            )
        if kind == "whip" and len(existing.publications) >= limits.max_streams_per_room:
            self._refuse(
                429,
                "session_limit",
                f"room {room!r} has {len(existing.publications)} published streams "
                "(limits.max_streams_per_room)",
                "room_streams",
            )

    def open_pending(self, ip: str) -> bool:
        """A WebSocket from `ip` starts waiting for its join: False if `ip` has too many."""
        held = self.pending.get(ip, 0)
        if held >= self.limits.max_pending_joins_per_ip:
            return False
        self.pending[ip] = held + 1
        return True

    def close_pending(self, ip: str) -> None:
        _decrement(self.pending, ip)

    def admit_participant(self, identity: str, ip: str) -> None:
        """A new room-protocol participant (a resume is not new); raises Refused."""
        self._common(identity, ip)

    def _common(self, identity: str, ip: str) -> None:
        if self.saturated:
            self._refuse(
                503,
                "server_full",
                f"the server holds limits.max_sessions ({self.limits.max_sessions}) sessions; "
                "try another instance",
                "server_full",
                retry_after=5.0,
            )
        now = self.clock()
        wait = self.by_ip.take(ip, now)
        if wait:
            self._refuse(
                429,
                "rate_limited",
                f"too many new sessions from {ip} (limits.session_rate_per_ip "
                f"{self.limits.session_rate_per_ip:g}/s)",
                "rate_ip",
                retry_after=wait,
            )
        wait = self.by_identity.take(identity, now)
        if wait:
            self._refuse(
                429,
                "rate_limited",
                f"too many new sessions for identity {identity!r} "
                f"(limits.session_rate_per_identity {self.limits.session_rate_per_identity:g}/s)",
                "rate_identity",
                retry_after=wait,
            )

    def _refuse(
        self, status: int, code: str, detail: str, reason: str, retry_after: float | None = None
    ) -> None:
        self.on_refusal(reason)
        raise Refused(
            status,
            code,
            detail,
            reason,
            None if retry_after is None else float(max(1, math.ceil(retry_after))),
        )
