"""Nodes coordinated by Redis (`cluster.enabled`): a registry of live nodes and where each
room lives.

Keys (all under `cluster.key_prefix`, all expiring `cluster.node_ttl` after the last renewal):
- `node:<id>`: a live node, as JSON (its advertised URL, its load, when it started). Each node
  renews its own every `heartbeat_interval`; a node that stops (crash, kill -9, partition)
  disappears within `node_ttl`.
- `room:<name>` (`cluster.rooms: redirect`): the id of the node the room lives on. The node
  renews the rooms it has sessions or participants in with the same heartbeat, so a dead
  node's rooms are free again within `node_ttl` too.

With `cluster.rooms: span` (the default) rooms span nodes: sfu/control/federation.py shares
them through this registry and Redis. With `cluster.rooms: redirect` a room lives on one
node: placement (`Cluster.place`) runs once per WHIP/WHEP POST and per room join; if the room
lives on a live node, that node serves it, otherwise it is placed on the least-loaded live
node, atomically (a Lua script, so two nodes placing the same room at once agree). A request
that reached another node is redirected there: WHIP and WHEP answer 307 (RFC 9725 lets clients
follow it), the room protocol sends a `redirect` message (docs/protocol.md).

Redis trouble never stops calls on a node: a failed heartbeat or placement is logged and
counted (`sfu_cluster_redis_errors_total`), and requests are then served where they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sfu.config import ClusterConfig

log = logging.getLogger(__name__)

# Placement, atomically: KEYS[1] room key; ARGV: this node's id, the chosen node's id, the TTL
# in ms, the node key prefix. Returns the node the room lives on now.
_PLACE = """
local owner = redis.call('GET', KEYS[1])
if owner and (owner == ARGV[1] or redis.call('EXISTS', ARGV[4] .. owner) == 1) then
  return owner
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return ARGV[2]
"""
# Renewal of this node's rooms: KEYS = room keys; ARGV: node id, TTL in ms. A room another
# live node holds is left to it (returned, for the log).
_RENEW = """
local taken = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if not owner or owner == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    table.insert(taken, key)
  end
end
return taken
"""
# Removal of this node's own rooms on a clean stop: KEYS = room keys; ARGV[1] node id.
_RELEASE = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""
# How often a failing Redis is logged (every failure is counted).
_ERROR_LOG_INTERVAL = 10.0


class ClusterUnavailable(Exception):
    """Redis could not be reached at start; the message names the URL (without password)."""


@dataclass(frozen=True)
class NodeInfo:
    id: str
    url: str
    load: int
    started: float
    # Shutting down: keeps its rooms, takes no new ones.
    draining: bool = False


def default_node_id() -> str:
    return socket.gethostname().split(".")[0][:64] or f"node-{os.getpid()}"


def redacted(url: str) -> str:
    """A Redis URL fit for a log line: any password replaced."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ':'}***@{host}"


class Cluster:
    """This node's membership in the cluster."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        load: Callable[[], int],
        rooms: Callable[[], Iterable[str]],
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.node_id = config.node_id or default_node_id()
        self.url = config.advertised_url.rstrip("/")
        self._load = load
        self._rooms = rooms
        self._accepting = accepting
        prefix = config.key_prefix
        self._node_prefix = f"{prefix}node:"
        self._room_prefix = f"{prefix}room:"
        self._ttl_ms = round(config.node_ttl * 1000)
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self.started = time.time()
        self.nodes: list[NodeInfo] = []
        # For /metrics.
        self.up = False
        self.redis_errors = 0
        self.placements = {"local": 0, "redirect": 0, "unavailable": 0}
        self.rooms_taken = 0
        self._last_error_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and register; ClusterUnavailable when Redis cannot be reached, or when a
        live node already has this node id."""
        url = self.config.redis_url.get_secret_value()
        timeout = max(0.5, self.config.heartbeat_interval)
        self._redis = aioredis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        try:
            await self._redis.ping()
            fresh = await self._redis.set(
                self._node_prefix + self.node_id, self._record(), px=self._ttl_ms, nx=True
            )
        except (RedisError, OSError) as exc:
            await self._close_client()
            raise ClusterUnavailable(
                f"cluster.redis_url: cannot reach Redis at {redacted(url)}: {exc}"
            ) from None
        if not fresh:
            await self._close_client()
            raise ClusterUnavailable(
                f"cluster.node_id: a live node already registered as {self.node_id!r}; give "
                f"each node its own id (or wait {self.config.node_ttl:g} s after stopping it)"
            )
        self.up = True
        await self._refresh_nodes()
        log.info(
            "cluster: node %s registered at %s (Redis %s)", self.node_id, self.url, redacted(url)
        )
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Leave the cluster cleanly: this node's entries go at once (not after the TTL)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            try:
                keys = [self._room_prefix + room for room in self._rooms()]
                if keys:
                    await self._redis.eval(_RELEASE, len(keys), *keys, self.node_id)
                await self._redis.delete(self._node_prefix + self.node_id)
            except (RedisError, OSError) as exc:
                log.warning("cluster: could not remove this node's entries: %s", exc)
        await self._close_client()
        self.up = False

    async def _close_client(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    # -- heartbeat ---------------------------------------------------------------------------

    def _record(self) -> str:
        return json.dumps(
            {
                "url": self.url,
                "load": self._load(),
                "started": self.started,
                "draining": not self._accepting(),
            }
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                await self.heartbeat()
            except (RedisError, OSError) as exc:
                self._failed("heartbeat", exc)

    async def heartbeat(self) -> None:
        redis = self._require()
        await redis.set(self._node_prefix + self.node_id, self._record(), px=self._ttl_ms)
        placed = self.config.rooms == "redirect"
        keys = [self._room_prefix + room for room in self._rooms()] if placed else []
        if keys:
            taken = await redis.eval(_RENEW, len(keys), *keys, self.node_id, self._ttl_ms)
            for key in taken:
                # Redis lost our entry and another node placed the room meanwhile (a
                # partition, a Redis restart): both serve it until our sessions end.
                self.rooms_taken += 1
                log.warning(
                    "cluster: room %r has sessions here but is placed on another node",
                    str(key)[len(self._room_prefix) :],
                )
        await self._refresh_nodes()
        if not self.up:
            log.info("cluster: Redis reachable again")
        self.up = True

    async def _refresh_nodes(self) -> None:
        redis = self._require()
        keys = [key async for key in redis.scan_iter(match=self._node_prefix + "*", count=100)]
        values = await redis.mget(keys) if keys else []
        nodes = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                data: dict[str, Any] = json.loads(value)
                nodes.append(
                    NodeInfo(
                        str(key)[len(self._node_prefix) :],
                        str(data["url"]),
                        int(data["load"]),
                        float(data["started"]),
                        bool(data.get("draining", False)),
                    )
                )
            except (ValueError, KeyError, TypeError):
                log.warning("cluster: ignoring a malformed node entry %s", key)
        self.nodes = sorted(nodes, key=lambda n: n.id)

    @property
    def redis(self) -> aioredis.Redis:
        """The client (after `start`); RedisError before."""
        return self._require()

    def _require(self) -> aioredis.Redis:
        if self._redis is None:
            raise RedisError("not connected")
        return self._redis

    def _failed(self, what: str, exc: BaseException) -> None:
        self.redis_errors += 1
        self.up = False
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.warning(
                "cluster: %s failed (%s); serving requests where they arrive until Redis "
                "answers again",
                what,
                exc,
            )

    # -- placement ---------------------------------------------------------------------------

    async def place(self, room: str) -> NodeInfo | None:
        """Where `room` lives: None for this node, else the node to redirect to."""
        try:
            redis = self._require()
            await self._refresh_nodes()
            live = [n for n in self.nodes if n.id != self.node_id and not n.draining]
            if self._accepting() or not live:
                live.append(NodeInfo(self.node_id, self.url, self._load(), self.started))
            # Least-loaded first, this node winning ties (no redirect when it is as good).
            chosen = min(live, key=lambda n: (n.load, n.id != self.node_id, n.id))
            owner = await redis.eval(
                _PLACE,
                1,
                self._room_prefix + room,
                self.node_id,
                chosen.id,
                self._ttl_ms,
                self._node_prefix,
            )
        except (RedisError, OSError) as exc:
            self._failed("placement", exc)
            self.placements["unavailable"] += 1
            return None
        if owner == self.node_id:
            self.placements["local"] += 1
            return None
        node = next((n for n in self.nodes if n.id == owner), None)
        if node is None:
            # Registered between our SCAN and the script: look it up once more.
            await self._refresh_nodes()
            node = next((n for n in self.nodes if n.id == owner), None)
        if node is None:
            self.placements["unavailable"] += 1
            return None
        self.placements["redirect"] += 1
        return node
