"""Media worker processes (`rtc.workers` > 1): the media API over local channels.

Each worker (sfu/media/worker.py) is a process with its own engine on UDP port
`rtc.udp_port + index`, sharing the server's DTLS certificate. The control plane talks to it
through `RemoteMedia`, which implements the media API by sending commands down the worker's
channel without waiting: it chooses every id itself (transport id, ICE credentials,
subscription SSRCs), so it can describe the result at once, exactly as the worker will
create it. `WorkerPool` is the media API the control plane sees: it places each room on the
least-loaded worker (fewest client transports), keeps it there up to
`rtc.room_transports_per_worker` transports per worker and then spreads it over the others,
and routes every other command by the worker index in the id ("w<index>.<token>"). A
subscriber on one worker receives a track published on another through the relay between
the two (sfu/media/mesh.py).

A worker that exits unexpectedly is restarted on the same port by its supervisor. Its
transports are gone with it: each is reported as closed (reason "media worker N exited"), so
WHIP/WHEP sessions end and room participants are told their transport closed, the same as
any other transport loss. `/metrics` merges the workers' snapshots, each at most
SNAPSHOT_INTERVAL old; a restarted worker's counters start again from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sfu.media import channel
from sfu.media.api import (
    ActiveSpeakers,
    EventSink,
    LayerChanged,
    MediaEvent,
    ProducerInfo,
    SubscriptionInfo,
    TransportClosed,
    TransportConnected,
    TransportInfo,
    UnknownMediaId,
)
from sfu.media.dtls import DtlsCertificate, Fingerprint
from sfu.media.engine import MediaEngine, MediaSettings
from sfu.media.ice import generate_credentials
from sfu.media.mesh import RelayMesh
from sfu.media.producer import TrackCodec
from sfu.media.relay import RelayEnd
from sfu.media.snapshot import MediaSnapshot, build_snapshot, merge
from sfu.media.worker import LogLevel, WorkerStart

log = logging.getLogger(__name__)

# How long a worker may take from spawn to hello (imports, binding, certificate).
START_TIMEOUT = 20.0
# Restart backoff for a worker that keeps dying: doubles from the first to the last.
RESTART_DELAYS = (0.2, 1.0, 5.0, 30.0)
# A worker that ran this long before dying restarts at the first delay again.
STABLE_AFTER = 60.0


class WorkerExited(Exception):
    pass


class RemoteMedia:
    """The media API of one worker process, as seen from the control plane."""

    def __init__(self, index: int, sink: Callable[[RemoteMedia, MediaEvent], None]) -> None:
        self.index = index
        self._sink = sink
        self.pid = 0
        self.bind_host = "127.0.0.1"
        self.fingerprint = ""
        self.candidates: tuple[tuple[str, int], ...] = ()
        self.last_snapshot: MediaSnapshot | None = None
        self.transports: dict[str, TransportInfo] = {}
        # The ends of relays to other workers among `transports` (not clients: no load).
        self.relays: set[str] = set()
        self._ssrcs: dict[str, set[int]] = {}
        # Transport id -> {producer id: kind}, for the subscriptions' descriptions.
        self._kinds: dict[str, dict[str, str]] = {}
        self._writer: asyncio.StreamWriter | None = None

    # -- channel -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._writer is not None

    @property
    def load(self) -> int:
        """Client transports on this worker (what placement balances)."""
        return len(self.transports) - len(self.relays)

    def relay_address(self) -> tuple[str, int] | None:
        """Where another worker on this host reaches this one's UDP port: its bound port on
        loopback (a wildcard bind accepts loopback too)."""
        if not self.candidates:
            return None
        host = self.bind_host
        if host in ("", "0.0.0.0"):  # noqa: S104 (recognising a wildcard, not binding one)
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return host, self.candidates[0][1]

    def attach(self, writer: asyncio.StreamWriter, hello: tuple[Any, ...]) -> None:
        _, self.pid, self.fingerprint, candidates = hello
        self.candidates = tuple((str(ip), int(port)) for ip, port in candidates)
        self._writer = writer

    def detach(self) -> list[str]:
        """The worker is gone: its transports with it (their ids, to report closed)."""
        self._writer = None
        # Relays between this pool's workers are the mesh's business; every other transport
        # (clients', and relay ends to other nodes) is reported closed.
        gone = [t for t in self.transports if not RelayMesh.is_relay_id(t)]
        self.transports.clear()
        self.relays.clear()
        self._ssrcs.clear()
        self._kinds.clear()
        return gone

    def on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":
            event = message[1]
            if isinstance(event, TransportClosed):
                self.transports.pop(event.transport_id, None)
                self.relays.discard(event.transport_id)
                self._ssrcs.pop(event.transport_id, None)
                self._kinds.pop(event.transport_id, None)
            self._sink(self, event)
        elif kind == "snapshot":
            self.last_snapshot = MediaSnapshot.from_dict(message[1])
        elif kind == "failed":
            log.info("media worker %d: %s failed: %s", self.index, message[1], message[2])

    def _call(self, method: str, **kwargs: Any) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise UnknownMediaId(f"media worker {self.index} is not running")
        writer.write(channel.encode(("call", method, kwargs)))

    def _known(self, transport_id: str) -> TransportInfo:
        info = self.transports.get(transport_id)
        if info is None:
            raise UnknownMediaId(f"no transport {transport_id!r}")
        return info

    # -- the media API -----------------------------------------------------------------------

    def create_transport(
        self,
        role: str,
        remote_ufrag: str | None,
        remote_pwd: str | None,
        fingerprints: Sequence[Fingerprint],
        *,
        group: str | None = None,
    ) -> TransportInfo:
        transport_id = f"w{self.index}.{secrets.token_urlsafe(9)}"
        ufrag, pwd = generate_credentials()
        self._call(
            "create_transport",
            role=role,
            remote_ufrag=remote_ufrag,
            remote_pwd=remote_pwd,
            fingerprints=list(fingerprints),
            group=group,
            transport_id=transport_id,
            local=(ufrag, pwd),
        )
        info = TransportInfo(
            transport_id, role, ufrag, pwd, self.fingerprint, self.candidates, remote_ufrag
        )
        self.transports[transport_id] = info
        self._ssrcs[transport_id] = set()
        return info

    def set_remote(
        self, transport_id: str, ufrag: str, pwd: str, fingerprints: Sequence[Fingerprint]
    ) -> TransportInfo:
        info = replace(self._known(transport_id), remote_ufrag=ufrag)
        self._call(
            "set_remote",
            transport_id=transport_id,
            ufrag=ufrag,
            pwd=pwd,
            fingerprints=list(fingerprints),
        )
        self.transports[transport_id] = info
        return info

    def restart_ice(self, transport_id: str, ufrag: str, pwd: str) -> TransportInfo:
        local_ufrag, local_pwd = generate_credentials()
        info = replace(
            self._known(transport_id),
            ice_ufrag=local_ufrag,
            ice_pwd=local_pwd,
            remote_ufrag=ufrag,
        )
        self._call(
            "restart_ice",
            transport_id=transport_id,
            ufrag=ufrag,
            pwd=pwd,
            local=(local_ufrag, local_pwd),
        )
        self.transports[transport_id] = info
        return info

    def create_relay(self, end: RelayEnd, transport_id: str | None = None) -> TransportInfo:
        transport_id = transport_id or f"w{self.index}.{secrets.token_urlsafe(9)}"
        self._call("create_relay", end=end, transport_id=transport_id)
        info = TransportInfo(
            transport_id,
            "relay",
            end.local[0],
            end.local[1],
            self.fingerprint,
            self.candidates,
            end.remote_ufrag,
        )
        self.transports[transport_id] = info
        self.relays.add(transport_id)
        return info

    def close_transport(self, transport_id: str, reason: str) -> None:
        if transport_id in self.transports and self._writer is not None:
            self._call("close_transport", transport_id=transport_id, reason=reason)

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
        self._known(transport_id)
        self._call(
            "add_producer",
            transport_id=transport_id,
            kind=kind,
            mid=mid,
            codec=codec,
            ext_ids=dict(ext_ids),
            ssrc=ssrc,
            rtx_ssrc=rtx_ssrc,
            rids=tuple(rids),
            e2ee_required=e2ee_required,
            group=group,
            owner=owner,
        )
        producer_id = f"{transport_id}:{mid}"
        self._kinds.setdefault(transport_id, {})[producer_id] = kind
        return ProducerInfo(producer_id, transport_id, kind, mid, codec, dict(ext_ids), tuple(rids))

    def set_publisher_extensions(
        self,
        transport_id: str,
        *,
        mid: int | None,
        rid: int | None,
        repaired_rid: int | None,
        transport_cc: int | None,
    ) -> None:
        self._known(transport_id)
        self._call(
            "set_publisher_extensions",
            transport_id=transport_id,
            mid=mid,
            rid=rid,
            repaired_rid=repaired_rid,
            transport_cc=transport_cc,
        )

    def close_producer(self, producer_id: str) -> None:
        self._kinds.get(producer_id.partition(":")[0], {}).pop(producer_id, None)
        self._call("close_producer", producer_id=producer_id)

    def request_keyframe(self, producer_id: str) -> None:
        self._call("request_keyframe", producer_id=producer_id)

    def _new_ssrc(self, transport_id: str) -> int:
        taken = self._ssrcs.setdefault(transport_id, set())
        while True:
            ssrc = secrets.randbits(32)
            if ssrc and ssrc not in taken:
                taken.add(ssrc)
                return ssrc

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
        self._known(transport_id)
        kind = self._kinds.get(producer_id.partition(":")[0], {}).get(producer_id)
        if kind is None:
            raise UnknownMediaId(f"no producer {producer_id!r} on media worker {self.index}")
        if ssrcs is not None:
            ssrc, rtx_ssrc = ssrcs
            self._ssrcs.setdefault(transport_id, set()).update(s for s in ssrcs if s)
        else:
            ssrc = self._new_ssrc(transport_id)
            rtx_ssrc = self._new_ssrc(transport_id) if rtx_payload_type is not None else None
        self._call(
            "add_subscription",
            transport_id=transport_id,
            producer_id=producer_id,
            payload_type=payload_type,
            rtx_payload_type=rtx_payload_type,
            ext_map=dict(ext_map),
            paused=paused,
            max_size=max_size,
            ssrcs=(ssrc, rtx_ssrc),
        )
        return SubscriptionInfo(
            f"{transport_id}/{ssrc}",
            transport_id,
            producer_id,
            kind,
            ssrc,
            rtx_ssrc,
            payload_type,
            rtx_payload_type,
        )

    def set_paused(self, subscription_id: str, paused: bool) -> None:
        self._call("set_paused", subscription_id=subscription_id, paused=paused)

    def set_video_size(self, subscription_id: str, width: int, height: int) -> None:
        self._call("set_video_size", subscription_id=subscription_id, width=width, height=height)

    def negotiated(self, subscription_id: str, *, extension_ids: set[int], rtx: bool) -> None:
        self._call(
            "negotiated", subscription_id=subscription_id, extension_ids=extension_ids, rtx=rtx
        )

    def enable_bandwidth_estimation(self, transport_id: str, transport_cc: int) -> None:
        self._call(
            "enable_bandwidth_estimation", transport_id=transport_id, transport_cc=transport_cc
        )

    def end_subscription(self, subscription_id: str, *, bye: bool) -> None:
        if self._writer is not None:
            self._call("end_subscription", subscription_id=subscription_id, bye=bye)

    def snapshot(self) -> MediaSnapshot | None:
        return self.last_snapshot


class WorkerPool:
    """The media API over several worker processes: rooms placed, commands routed by id."""

    def __init__(
        self,
        count: int,
        settings: MediaSettings,
        certificate: DtlsCertificate,
        *,
        log_level: LogLevel = "info",
        log_json: bool = False,
        secrets: Sequence[str] = (),
        room_transports_per_worker: int = 0,
    ) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.settings = settings
        self.certificate = certificate
        self._log = (log_level, log_json, tuple(secrets))
        self.sink: EventSink | None = None
        self.workers = [RemoteMedia(i, self._event) for i in range(count)]
        for remote in self.workers:
            remote.bind_host = settings.bind_host
        self.restarts = [0] * count
        self.room_transports_per_worker = room_transports_per_worker
        # Room -> its first worker (whose active-speaker events speak for the room), and
        # how many of its transports each worker has.
        self._rooms: dict[str, int] = {}
        self._room_load: dict[str, dict[int, int]] = {}
        self._transport_rooms: dict[str, str] = {}
        self.mesh = RelayMesh(self.workers, lambda: [self.certificate.fingerprint])
        self._processes: list[asyncio.subprocess.Process | None] = [None] * count
        self._tasks: list[asyncio.Task[None]] = []
        self._dir = Path(tempfile.mkdtemp(prefix="sfu-workers-"))
        self._closing = False
        self._empty: MediaSnapshot | None = None
        # Called when a worker (re)started or exited: metrics keep per-worker state.
        self.on_change: Callable[[], None] | None = None

    def closing(self) -> bool:
        return self._closing

    def port_of(self, index: int) -> int:
        # Port 0 (tests): every worker takes an ephemeral port of its own.
        return self.settings.udp_port + index if self.settings.udp_port else 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn every worker and wait until each has bound its port; OSError names the
        port a worker could not bind."""
        self._dir.chmod(0o700)
        try:
            for index in range(len(self.workers)):
                await self._spawn(index)
        except BaseException:
            await self.close()
            raise
        for index in range(len(self.workers)):
            self._tasks.append(asyncio.create_task(self._supervise(index)))

    async def _spawn(self, index: int) -> None:
        path = str(self._dir / f"worker-{index}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not connected.done():
                connected.set_result((reader, writer))
            else:
                writer.close()

        server = await asyncio.start_unix_server(accept, path)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sfu.media.worker", path, stdin=asyncio.subprocess.DEVNULL
        )
        self._processes[index] = process
        exited: asyncio.Future[Any] = asyncio.ensure_future(process.wait())
        try:
            waiting: list[asyncio.Future[Any]] = [connected, exited]
            done, _ = await asyncio.wait(
                waiting, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if connected not in done:
                raise WorkerExited(
                    f"media worker {index} exited with {process.returncode} before it connected"
                    if process.returncode is not None
                    else f"media worker {index} did not connect within {START_TIMEOUT:g} s"
                )
            reader, writer = connected.result()
            settings = replace(self.settings, udp_port=self.port_of(index))
            level, json_lines, hidden = self._log
            start = WorkerStart(
                index=index,
                settings=settings,
                certificate_pem=self.certificate.certificate_pem(),
                key_pem=self.certificate.private_key_pem(),
                log_level=level,
                log_json=json_lines,
                secrets=hidden,
            )
            writer.write(channel.encode(("start", start)))
            hello = await asyncio.wait_for(channel.read(reader), START_TIMEOUT)
        except WorkerExited:
            self._abandon(index)
            raise
        except (channel.ChannelClosed, TimeoutError):
            self._abandon(index)
            raise OSError(
                f"media worker {index} could not start on UDP "
                f"{self.settings.bind_host}:{self.port_of(index)} (rtc.udp_port + {index}); "
                "see its log line above"
            ) from None
        finally:
            exited.cancel()  # the supervisor waits for the exit from here on
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        remote = self.workers[index]
        remote.attach(writer, hello)
        remote.on_message(("snapshot", (await channel.read(reader))[1]))
        self._tasks.append(asyncio.create_task(self._read(index, reader)))
        log.info(
            "media worker %d (pid %d) forwards on UDP %s:%d",
            index,
            remote.pid,
            self.settings.bind_host,
            remote.candidates[0][1] if remote.candidates else self.port_of(index),
        )
        if self.on_change is not None:
            self.on_change()

    def _abandon(self, index: int) -> None:
        """A worker that failed to start: kill it if it still runs, and forget it."""
        process = self._processes[index]
        self._processes[index] = None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def _read(self, index: int, reader: asyncio.StreamReader) -> None:
        remote = self.workers[index]
        while True:
            try:
                message = await channel.read(reader)
            except channel.ChannelClosed:
                return
            try:
                remote.on_message(message)
            except Exception:
                log.exception("media worker %d: handling %s failed", index, message[0])

    async def _supervise(self, index: int) -> None:
        """Wait for the worker to exit; restart it, again and again with growing delays for
        as long as restarts fail, until the pool closes."""
        failures = 0
        while not self.closing():
            process = self._processes[index]
            if process is not None:
                started = time.monotonic()
                code = await process.wait()
                if self.closing():
                    return
                self._worker_lost(index, code)
                failures = 0 if time.monotonic() - started > STABLE_AFTER else failures + 1
            else:
                failures += 1  # the last restart failed
            await asyncio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)])
            try:
                await self._spawn(index)
            except (OSError, WorkerExited) as exc:
                log.error("media worker %d did not restart: %s (trying again)", index, exc)
                continue
            self.restarts[index] += 1

    def _worker_lost(self, index: int, code: int) -> None:
        how = f"signal {-code}" if code < 0 else f"status {code}"
        remote = self.workers[index]
        gone = remote.detach()
        self.mesh.worker_lost(index)
        log.error(
            "media worker %d (pid %d) exited (%s): its %d transports are closed; restarting it",
            index,
            remote.pid,
            how,
            len(gone),
        )
        reason = f"media worker {index} exited ({how}); reconnect"
        for transport_id in gone:
            self._event(remote, TransportClosed(transport_id, reason, by_client=False))
        if self.on_change is not None:
            self.on_change()

    async def close(self) -> None:
        self._closing = True
        for remote in self.workers:
            writer = remote._writer
            remote.detach()
            if writer is not None:
                writer.close()
        # A worker exits when its channel closes (it ignores SIGTERM, see worker.py).
        for process in self._processes:
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        with contextlib.suppress(OSError):
            self._dir.rmdir()

    # -- events and placement -----------------------------------------------------------------

    def _event(self, remote: RemoteMedia, event: MediaEvent) -> None:
        if isinstance(event, TransportConnected) and self.mesh.is_relay(event.transport_id):
            self.mesh.relay_connected(event.transport_id, remote.index)
            return
        if isinstance(event, TransportClosed):
            if not self.mesh.is_relay(event.transport_id) and RelayMesh.is_relay_id(
                event.transport_id
            ):
                return  # a relay the mesh closed itself (idle, or its other end went)
            relay = self.mesh.is_relay(event.transport_id)
            orphans = self.mesh.transport_closed(event.transport_id)
            if relay:
                log.warning(
                    "relay %s on media worker %d closed (%s): %d subscriber transports "
                    "received through it and are closed too",
                    event.transport_id,
                    remote.index,
                    event.reason,
                    len(orphans),
                )
                for transport_id, index in orphans:
                    self.workers[index].close_transport(
                        transport_id,
                        f"relay between media workers lost ({event.reason}); reconnect",
                    )
                return
            self._unplace(event.transport_id)
        elif isinstance(event, LayerChanged) and self.mesh.is_mirror(event.producer_id):
            event = replace(event, producer_id=self.mesh.original(event.producer_id))
        elif isinstance(event, ActiveSpeakers) and self._rooms.get(event.group) not in (
            None,
            remote.index,
        ):
            # Every worker the room spans detects its speakers; its first worker speaks for
            # it (the others' subscribers' audio reaches it through the relays too).
            return
        if self.sink is not None:
            self.sink(event)

    def _unplace(self, transport_id: str) -> None:
        room = self._transport_rooms.pop(transport_id, None)
        if room is None:
            return
        load = self._room_load.get(room, {})
        index = self._route(transport_id).index
        load[index] = load.get(index, 1) - 1
        if load[index] <= 0:
            del load[index]
        if not load:
            self._room_load.pop(room, None)
            self._rooms.pop(room, None)

    def _place(self, group: str | None) -> RemoteMedia:
        live = [r for r in self.workers if r.running]
        if not live:
            raise UnknownMediaId("no media worker is running")
        least = min(live, key=lambda r: (r.load, r.index))
        if group is None:
            return least
        home = self._rooms.get(group)
        if home is None or not self.workers[home].running:
            self._rooms[group] = least.index
            return least
        limit = self.room_transports_per_worker
        load = self._room_load.get(group, {})
        if not limit or load.get(home, 0) < limit:
            return self.workers[home]
        # The room's first worker is full: the least-loaded worker that still has room for
        # it, else the least-loaded one.
        open_ = [r for r in live if load.get(r.index, 0) < limit] or live
        return min(open_, key=lambda r: (r.load, r.index))

    def _route(self, media_id: str) -> RemoteMedia:
        head = media_id.partition(".")[0]
        if head[:1] == "w" and head[1:].isdigit() and int(head[1:]) < len(self.workers):
            return self.workers[int(head[1:])]
        raise UnknownMediaId(f"no media object {media_id!r}")

    # -- the media API -----------------------------------------------------------------------

    def create_transport(
        self,
        role: str,
        remote_ufrag: str | None,
        remote_pwd: str | None,
        fingerprints: Sequence[Fingerprint],
        *,
        group: str | None = None,
    ) -> TransportInfo:
        remote = self._place(group)
        info = remote.create_transport(role, remote_ufrag, remote_pwd, fingerprints, group=group)
        if group is not None:
            self._transport_rooms[info.id] = group
            load = self._room_load.setdefault(group, {})
            load[remote.index] = load.get(remote.index, 0) + 1
        return info

    def create_relay(self, end: RelayEnd) -> TransportInfo:
        """A relay end to another node, on the least-loaded worker (the mesh joins it to
        the others like any transport)."""
        return self._place(None).create_relay(end)

    def set_remote(
        self, transport_id: str, ufrag: str, pwd: str, fingerprints: Sequence[Fingerprint]
    ) -> TransportInfo:
        return self._route(transport_id).set_remote(transport_id, ufrag, pwd, fingerprints)

    def restart_ice(self, transport_id: str, ufrag: str, pwd: str) -> TransportInfo:
        return self._route(transport_id).restart_ice(transport_id, ufrag, pwd)

    def close_transport(self, transport_id: str, reason: str) -> None:
        with contextlib.suppress(UnknownMediaId):
            self._route(transport_id).close_transport(transport_id, reason)

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
        info = self._route(transport_id).add_producer(
            transport_id,
            kind=kind,
            mid=mid,
            codec=codec,
            ext_ids=ext_ids,
            ssrc=ssrc,
            rtx_ssrc=rtx_ssrc,
            rids=rids,
            e2ee_required=e2ee_required,
            group=group,
            owner=owner,
        )
        self.mesh.published(info, group, owner)
        return info

    def set_publisher_extensions(
        self,
        transport_id: str,
        *,
        mid: int | None,
        rid: int | None,
        repaired_rid: int | None,
        transport_cc: int | None,
    ) -> None:
        self._route(transport_id).set_publisher_extensions(
            transport_id, mid=mid, rid=rid, repaired_rid=repaired_rid, transport_cc=transport_cc
        )

    def close_producer(self, producer_id: str) -> None:
        self.mesh.producer_closed(producer_id)
        with contextlib.suppress(UnknownMediaId):
            self._route(producer_id).close_producer(producer_id)

    def request_keyframe(self, producer_id: str) -> None:
        with contextlib.suppress(UnknownMediaId):
            self._route(producer_id).request_keyframe(producer_id)

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
        remote = self._route(transport_id)
        # A track on another worker is subscribed through its mirror on this one.
        source = self.mesh.local_source(producer_id, self._route(producer_id), remote)
        info = remote.add_subscription(
            transport_id,
            source,
            payload_type=payload_type,
            rtx_payload_type=rtx_payload_type,
            ext_map=ext_map,
            paused=paused,
            max_size=max_size,
            ssrcs=ssrcs,
        )
        self.mesh.subscribed(info.id, source)
        return replace(info, producer_id=producer_id)

    def set_paused(self, subscription_id: str, paused: bool) -> None:
        self._route(subscription_id).set_paused(subscription_id, paused)

    def set_video_size(self, subscription_id: str, width: int, height: int) -> None:
        self._route(subscription_id).set_video_size(subscription_id, width, height)

    def negotiated(self, subscription_id: str, *, extension_ids: set[int], rtx: bool) -> None:
        self._route(subscription_id).negotiated(
            subscription_id, extension_ids=extension_ids, rtx=rtx
        )

    def enable_bandwidth_estimation(self, transport_id: str, transport_cc: int) -> None:
        self._route(transport_id).enable_bandwidth_estimation(transport_id, transport_cc)

    def end_subscription(self, subscription_id: str, *, bye: bool) -> None:
        with contextlib.suppress(UnknownMediaId):
            self._route(subscription_id).end_subscription(subscription_id, bye=bye)
        self.mesh.subscription_ended(subscription_id)

    def snapshot(self) -> MediaSnapshot:
        """The workers' latest snapshots merged (a dead worker's last one until its
        successor reports)."""
        snapshots = [s for s in (r.snapshot() for r in self.workers) if s is not None]
        if not snapshots:
            # Before the first worker reported (metrics registration): all zeros, with the
            # histogram bounds a worker uses, from an engine that never starts.
            if self._empty is None:
                self._empty = build_snapshot(MediaEngine(self.settings, self.certificate))
            return self._empty
        return merge(snapshots)
