"""Support for the multi-node tests: `sfu serve` processes on loopback, and room participants
(the Python client, E2EE with pre-shared keys) that tell whose video they decode by colour.

Keys are pre-shared (each participant's send key known to the others): the key exchange is
not what these tests are about, and a static key makes "decodes" mean the frames came through
unchanged. A keyless observer receives the same frames and decodes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np

from sfu.client.e2ee import E2eeConfig, E2eeContext
from sfu.client.room import RoomClient
from sfu.client.sframe import compose_kid
from sfu.config import Config
from sfu.control.auth import mint_token
from tests.conftest import free_port
from tests.media.harness import ColourTrack, Counter, ToneTrack

COLOURS = {"alice": (220, 30, 30), "bob": (30, 200, 30), "carol": (30, 30, 220)}
KEYS = {name: (compose_kid(i + 1, 0), bytes([i + 1]) * 16) for i, name in enumerate(COLOURS)}
TTL = 2.0


class Reachable(Protocol):
    """A node as a client sees it: a child process (Node) or a container."""

    @property
    def url(self) -> str: ...


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve_nodes(
    redis_url: str,
    logs: Path,
    rooms: str,
    names: tuple[str, ...] = ("n1", "n2", "n3"),
    extra: dict[str, str] | None = None,
) -> Iterator[list[Node]]:
    """`sfu serve` processes with the cluster on (`cluster.rooms`: `rooms`) and `extra`
    overrides; their output goes to `logs`/<name>.log. Stopped (SIGINT, then SIGKILL) on
    exit."""
    started: list[Node] = []
    try:
        for name in names:
            port = free_port()
            env = {
                **os.environ,
                "SFU_HTTP__PORT": str(port),
                "SFU_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM)),
                "SFU_CLUSTER__ENABLED": "true",
                "SFU_CLUSTER__ROOMS": rooms,
                "SFU_CLUSTER__REDIS_URL": redis_url,
                "SFU_CLUSTER__NODE_ID": name,
                "SFU_CLUSTER__ADVERTISED_URL": f"http://127.0.0.1:{port}",
                "SFU_CLUSTER__HEARTBEAT_INTERVAL": "0.5",
                "SFU_CLUSTER__NODE_TTL": str(TTL),
                **(extra or {}),
            }
            log = (logs / f"{name}.log").open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "sfu", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            started.append(Node(name, port, process))
        yield started
    finally:
        for node in started:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGINT)
        for node in started:
            try:
                node.process.wait(15)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()


async def ready(http: aiohttp.ClientSession, node: Node, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(f"{node.url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if node.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"node {node.name} did not become ready")
        await asyncio.sleep(0.1)


def _colour_of(frame: Any) -> str | None:
    pixels = frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
    best = min(COLOURS, key=lambda n: float(np.abs(pixels - np.array(COLOURS[n])).sum()))
    return best if float(np.abs(pixels - np.array(COLOURS[best])).sum()) < 90 else None


@dataclass
class Participant:
    name: str
    client: RoomClient
    context: E2eeContext
    # Decoded video frames by whose colour they show.
    seen: dict[str, int] = field(default_factory=dict)
    decoded: Counter = field(init=False)
    rejoined_at: float | None = None

    def __post_init__(self) -> None:
        self.decoded = Counter(on_video=self._saw)

    def _saw(self, frame: Any) -> None:
        who = _colour_of(frame)
        if who is not None:
            self.seen[who] = self.seen.get(who, 0) + 1

    def on_track(self, track: Any, *_: Any) -> None:
        self.decoded.on_track(track)

    def on_event(self, message: dict[str, Any]) -> None:
        if message.get("type") == "rejoined" and self.rejoined_at is None:
            self.rejoined_at = time.monotonic()


def participant(
    name: str,
    entry: Reachable,
    others: list[Reachable],
    keyed: bool = True,
    server_config: Config | None = None,
) -> Participant:
    """`name` joining room "failover" through `entry` (rejoining through `others`), with a
    token of `server_config`'s key (default: the dev key every test node accepts)."""
    if keyed:
        kid, key = KEYS[name]
        config = E2eeConfig(
            send_kid=kid,
            send_key=key,
            receive_keys={k: v for n, (k, v) in KEYS.items() if n != name},
        )
    else:
        config = E2eeConfig()
    context = E2eeContext(config)
    token = mint_token(
        server_config or Config(),
        room="failover",
        identity=name,
        publish=keyed,
        subscribe=True,
        ttl=300,
    )
    holder: list[Participant] = []
    client = RoomClient(
        entry.url,
        token,
        e2ee=context,
        auto_rejoin=True,
        fallback_urls=[n.url for n in others],
        on_track=lambda track, *rest: holder[0].on_track(track, *rest),
        on_event=lambda message: holder[0].on_event(message),
    )
    participant = Participant(name, client, context)
    holder.append(participant)
    return participant


async def until(condition: Any, what: str, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def left(people: list[Participant]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for person in people:
            with contextlib.suppress(Exception):
                await person.client.leave()
            for task in person.decoded.tasks:
                task.cancel()


async def cluster_formed(http: aiohttp.ClientSession, nodes: list[Node]) -> None:
    """Wait until every node is ready and lists every node in its registry (a node learns the
    others at its next heartbeat), so a `joined` names all the others."""
    for node in nodes:
        await ready(http, node)
    wanted = {f'sfu_cluster_node_load{{node="{n.name}"}}' for n in nodes}
    deadline = time.monotonic() + 10
    for node in nodes:
        while True:
            async with http.get(f"{node.url}/metrics") as response:
                text = await response.text()
            known = {line.rsplit(" ", 1)[0] for line in text.splitlines()}
            if wanted <= known:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name} knows only {sorted(known & wanted)}")
            await asyncio.sleep(0.1)


def cast(
    nodes: list[Node], *, alice_fallbacks: bool = True
) -> tuple[list[Participant], Participant]:
    """alice, bob and carol entering through n1, n2 and n3 (each falling back to the other
    two; alice to none without `alice_fallbacks`, so she knows the others only from the
    `nodes` of her `joined`), and eve, a keyless observer, through n2."""
    n1, n2, n3 = nodes
    people = [
        participant("alice", n1, [n2, n3] if alice_fallbacks else []),
        participant("bob", n2, [n3, n1]),
        participant("carol", n3, [n1, n2]),
    ]
    return people, participant("eve", n2, [n3, n1], keyed=False)


async def join_all(people: list[Participant], observer: Participant) -> None:
    """Everyone joins in turn; the keyed ones publish a video of their colour and a tone."""
    for person in [*people, observer]:
        await person.client.connect()
        if person is not observer:
            await person.client.publish([ColourTrack(COLOURS[person.name]), ToneTrack()])
