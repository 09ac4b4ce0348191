"""Media worker processes (`rtc.workers: 2`): real worker processes behind the media API's
channel, real aiortc peers, E2EE frames end to end.

Rooms are placed on the least-loaded worker, each worker forwards on its own UDP port, the
encrypted frames arrive byte for byte, /metrics merges the workers' snapshots, and a worker
killed with SIGKILL is restarted on its port while its sessions end and the other worker's
calls go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sfu.app import Server, StartupError
from sfu.client.e2ee import E2eeConfig, EncryptedFrame
from sfu.client.sframe import compose_kid
from sfu.client.whip import Publication, Subscription, WhipError, publish, subscribe
from sfu.control.sdp import parse_sdp
from tests.media.harness import (
    ColourTrack,
    Counter,
    ToneTrack,
    make_config,
    metric_value,
    metrics_text,
    running_server,
    token,
    wait_for,
)

KID = compose_kid(5, 0)
KEY = bytes(range(32, 48))


@pytest.fixture
async def sfu() -> AsyncIterator[Server]:
    async with running_server(SFU_RTC__WORKERS="2") as server:
        yield server


class Call:
    """One room: an E2EE publisher and a keyed subscriber, through the SFU."""

    def __init__(self, room: str) -> None:
        self.room = room
        self.sent: list[EncryptedFrame] = []
        self.received: list[EncryptedFrame] = []
        self.decoded = Counter()
        self.publication: Publication | None = None
        self.subscription: Subscription | None = None

    async def start(self, sfu: Server) -> None:
        self.publication = await publish(
            f"{sfu.url}/whip/{self.room}/cam",
            token(sfu, self.room, f"pub-{self.room}", publish=True),
            [ColourTrack((200, 40, 90)), ToneTrack()],
            E2eeConfig(send_kid=KID, send_key=KEY, on_frame=self.sent.append),
        )
        self.subscription = await subscribe(
            f"{sfu.url}/whep/{self.room}/cam",
            token(sfu, self.room, f"sub-{self.room}", subscribe=True),
            E2eeConfig(receive_keys={KID: KEY}, on_frame=self.received.append),
            on_track=self.decoded.on_track,
        )

    def ports(self) -> set[int]:
        """The UDP ports the SFU's answers offered (its host candidates)."""
        ports = set()
        for session in (self.publication, self.subscription):
            assert session is not None
            sdp = session.pc.remoteDescription.sdp
            for media in parse_sdp(sdp).media:
                for value in media.values("candidate"):
                    ports.add(int(value.split()[5]))
        return ports

    def decoding(self, video: int = 20, audio: int = 30) -> bool:
        return self.decoded.frames["video"] >= video and self.decoded.frames["audio"] >= audio

    async def close(self) -> None:
        for session in (self.publication, self.subscription):
            if session is not None:
                await session.close()


async def test_rooms_spread_over_workers_and_frames_arrive_unchanged(sfu: Server) -> None:
    assert sfu.pool is not None
    assert sfu.engine is None
    pids = {remote.pid for remote in sfu.pool.workers}
    assert len(pids) == 2
    assert os.getpid() not in pids
    calls = [Call("room-a"), Call("room-b")]
    try:
        for call in calls:
            await call.start(sfu)
        await wait_for(lambda: all(c.decoding() for c in calls), timeout=25, what="both rooms")
        # Each room on its own worker, each worker on its own port; a room's sessions share it.
        ports = [call.ports() for call in calls]
        assert all(len(p) == 1 for p in ports), ports
        assert ports[0] != ports[1]
        worker_ports = {port for remote in sfu.pool.workers for _, port in remote.candidates}
        assert ports[0] | ports[1] == worker_ports
        # The encrypted frames arrive exactly as the publisher protected them.
        for call in calls:
            sent = {bytes(f.data) for f in call.sent}
            got = [bytes(f.data) for f in call.received]
            assert len(got) >= 50
            assert sum(frame in sent for frame in got) >= len(got) - 2
        # /metrics merges both workers' snapshots (sent every second).
        await wait_for(
            lambda: (
                all(r.snapshot() is not None and r.snapshot().rtp_by_kind for r in sfu.pool.workers)
                if sfu.pool
                else False
            ),
            timeout=5,
            what="both workers' snapshots",
        )
        await asyncio.sleep(1.2)
        text = await metrics_text(sfu)
        merged = sfu.media.snapshot()
        assert metric_value(text, "sfu_media_workers") == 2
        assert metric_value(text, 'sfu_rtp_packets_total{direction="out",kind="video"}') > 0
        per_worker = [r.snapshot() for r in sfu.pool.workers]
        assert all(s is not None and s.rtp_by_kind["video"][2] > 0 for s in per_worker)
        assert merged.rtp_by_kind["video"][2] == sum(
            s.rtp_by_kind["video"][2] for s in per_worker if s is not None
        )
        # A SIGTERM to the process group (a service manager stopping the unit) is the
        # server's to act on: the workers ignore it and keep forwarding.
        os.kill(sfu.pool.workers[0].pid, signal.SIGTERM)
        before = [c.decoded.frames["video"] for c in calls]
        await asyncio.sleep(1.0)
        assert {remote.pid for remote in sfu.pool.workers} == pids
        assert sfu.pool.restarts == [0, 0]
        assert all(c.decoded.frames["video"] > b + 5 for c, b in zip(calls, before, strict=True))
    finally:
        for call in calls:
            await call.close()


async def test_a_killed_worker_is_restarted_and_the_other_rooms_go_on(sfu: Server) -> None:
    assert sfu.pool is not None
    calls = [Call("room-a"), Call("room-b")]
    try:
        for call in calls:
            await call.start(sfu)
        await wait_for(lambda: all(c.decoding() for c in calls), timeout=25, what="both rooms")
        victim_port = next(iter(calls[0].ports()))
        victim = next(
            r for r in sfu.pool.workers if any(port == victim_port for _, port in r.candidates)
        )
        old_pid = victim.pid
        survivor = calls[1]
        before = survivor.decoded.frames["video"]
        os.kill(old_pid, signal.SIGKILL)

        # Its sessions end (the room forgets them) and the worker comes back on its port.
        await wait_for(
            lambda: sfu.rooms.get("room-a") is None, timeout=5, what="room-a's sessions ended"
        )
        await wait_for(
            lambda: victim.pid != old_pid and victim.snapshot() is not None,
            timeout=10,
            what="the worker restarted",
        )
        assert any(port == victim_port for _, port in victim.candidates)
        assert sfu.pool.restarts[victim.index] == 1
        # Its WHIP/WHEP clients see their sessions gone (the URL answers 404).
        for session in (calls[0].publication, calls[0].subscription):
            assert session is not None
            with pytest.raises(WhipError, match="404 session_not_found"):
                await session.close()
        calls[0].publication = calls[0].subscription = None
        # The other room never stopped.
        await asyncio.sleep(1.0)
        assert survivor.decoded.frames["video"] > before + 10

        # The room works again on the restarted worker (or wherever it is placed now).
        again = Call("room-a")
        try:
            await again.start(sfu)
            await wait_for(again.decoding, timeout=25, what="room-a again")
        finally:
            await again.close()
        text = await metrics_text(sfu)
        assert metric_value(text, "sfu_media_worker_restarts_total") == 1
    finally:
        for call in calls:
            await call.close()


async def test_room_participants_call_through_a_worker_and_hear_when_it_dies(sfu: Server) -> None:
    """The room protocol over a worker: publish, the SFU-offered subscriber connection and
    its renegotiation, speaker events; a killed worker's participants are told their media
    transports closed (the client then rejoins)."""
    from sfu.client.room import RoomClient

    assert sfu.pool is not None
    seen = Counter()
    alice = RoomClient(sfu.url, token(sfu, "talk", "alice", publish=True, subscribe=True))
    bob = RoomClient(
        sfu.url, token(sfu, "talk", "bob", publish=True, subscribe=True), on_track=seen.on_track
    )
    try:
        await alice.connect()
        await alice.publish([ColourTrack(), ToneTrack()])
        await bob.connect()
        await wait_for(
            lambda: seen.frames["video"] >= 10 and seen.frames["audio"] >= 20,
            timeout=25,
            what="bob decoding alice through a worker",
        )
        placed = sfu.pool._rooms["talk"]
        victim = sfu.pool.workers[placed]
        assert len(victim.transports) == 3  # both receive sides and alice publishing
        os.kill(victim.pid, signal.SIGKILL)
        for participant in (alice, bob):
            error = await participant.next_event("error", within=5)
            assert error["code"] == "transport_closed", error
            assert f"media worker {placed} exited" in error["message"]
    finally:
        for participant in (alice, bob):
            with contextlib.suppress(Exception):
                await participant.leave()


async def test_a_worker_whose_restart_fails_is_tried_again(sfu: Server) -> None:
    """Its port is taken when the supervisor first tries to restart it: the supervisor keeps
    trying (with growing delays) and brings it back once the port is free."""
    assert sfu.pool is not None
    victim = sfu.pool.workers[1]
    port = victim.candidates[0][1]
    old_pid = victim.pid
    os.kill(old_pid, signal.SIGKILL)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        deadline = asyncio.get_running_loop().time() + 2
        while True:
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.005)
        await wait_for(lambda: not victim.running, timeout=5, what="the worker seen dead")
        await asyncio.sleep(2.0)  # past the first restart attempt, which cannot bind
        assert not victim.running
        assert sfu.pool.restarts[1] == 0
    finally:
        squatter.close()
    await wait_for(lambda: victim.running and victim.pid != old_pid, timeout=15, what="the retry")
    assert victim.candidates[0][1] == port
    assert sfu.pool.restarts[1] == 1


async def test_room_participants_rejoin_by_themselves_when_their_worker_dies(sfu: Server) -> None:
    """With auto_rejoin, the Python room client answers `transport_closed` by joining again:
    after SIGKILL of the room's worker both participants are back in the call (on whichever
    worker the room is placed now) without anyone calling them back."""
    from sfu.client.room import RoomClient

    assert sfu.pool is not None
    seen = [Counter(), Counter()]
    people = [
        RoomClient(
            sfu.url,
            token(sfu, "again", name, publish=True, subscribe=True),
            on_track=counter.on_track,
            auto_rejoin=True,
        )
        for name, counter in zip(("ann", "ben"), seen, strict=True)
    ]
    try:
        for person, colour in zip(people, ((200, 0, 0), (0, 0, 200)), strict=True):
            await person.connect()
            await person.publish([ColourTrack(colour), ToneTrack()])
        await wait_for(
            lambda: all(c.frames["video"] >= 10 for c in seen), timeout=25, what="both decoding"
        )
        victim = sfu.pool.workers[sfu.pool._rooms["again"]]
        os.kill(victim.pid, signal.SIGKILL)
        for person in people:
            rejoined = await person.next_event("rejoined", within=15)
            assert "exited" in rejoined["reason"]
        before = [c.frames["video"] for c in seen]
        await wait_for(
            lambda: all(c.frames["video"] >= b + 10 for c, b in zip(seen, before, strict=True)),
            timeout=20,
            what="both decoding again after the rejoin",
        )
        assert all(person.rejoins == 1 for person in people)
    finally:
        for person in people:
            with contextlib.suppress(Exception):
                await person.leave()


def test_no_writable_directory_for_the_channel_sockets_is_a_clear_start_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A read-only root without a tmpfs (Docker's read_only: true) leaves no directory for the
    workers' sockets: the start fails with what to do, not a traceback."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "read-only"))
    with pytest.raises(StartupError) as failure:
        Server(make_config(SFU_RTC__WORKERS="2"))
    message = str(failure.value)
    assert "rtc.workers 2" in message
    assert "tmpfs at /tmp" in message
    assert "TMPDIR" in message
