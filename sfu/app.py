"""Wiring and lifecycle: start the control plane, report readiness, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import ssl
from typing import Any

from aiohttp import web

from sfu import __version__
from sfu.cluster import Cluster, ClusterUnavailable
from sfu.config import DEV_API_KEY, DEV_API_SECRET, Config
from sfu.control.admission import REFUSAL_REASONS, Admission
from sfu.control.federation import Federation
from sfu.control.http import ServerLog, create_app
from sfu.control.keys import CLUSTER_KEY, FEDERATION_KEY
from sfu.control.media_events import MediaEvents
from sfu.control.rooms import HUB_KEY, RoomHub
from sfu.lifecycle import Lifecycle
from sfu.media.dtls import DtlsCertificate
from sfu.media.engine import MediaEngine, MediaSettings
from sfu.media.local import LocalMedia
from sfu.media.workers import WorkerPool
from sfu.metrics import (
    ClusterCollector,
    MediaCollector,
    MeshStatus,
    Metrics,
    WorkerCollector,
    WorkerStatus,
    measure_loop_lag,
    stop_task,
)
from sfu.rooms import Rooms

log = logging.getLogger("sfu.app")

EXIT_OK = 0
EXIT_FAILURE = 1


class StartupError(Exception):
    """The server could not start for a reason the operator can fix (message says how)."""


class Server:
    def __init__(self, config: Config, event_loop_name: str = "asyncio") -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        self.metrics = Metrics(event_loop_name)
        rtc = config.rtc
        settings = MediaSettings(
            bind_host=rtc.bind_host,
            udp_port=rtc.udp_port,
            announced_ips=rtc.announced_ips,
            consent_timeout=rtc.consent_timeout,
            handshake_timeout=rtc.handshake_timeout,
            video_buffer=rtc.video_buffer_packets,
            audio_buffer=rtc.audio_buffer_packets,
            keyframe_interval=rtc.keyframe_request_interval,
            subscriber_keyframe_interval=rtc.subscriber_keyframe_interval,
            e2ee_grace_period=config.e2ee.grace_period,
            integrity_sample_every=config.metrics.integrity_sample_every,
            fastpath=rtc.fastpath,
            keyframe_cache=rtc.keyframe_cache,
        )
        certificate = _dtls_certificate(config)
        workers = rtc.worker_count()
        if rtc.udp_port and rtc.udp_port + workers - 1 > 65535:
            raise StartupError(
                f"rtc.udp_port {rtc.udp_port} + rtc.workers {workers} runs past port 65535"
            )
        # The control plane reaches the media plane only through its API (ids, commands,
        # events): in this process with one worker, else over a channel to each worker.
        self.engine: MediaEngine | None = None
        self.pool: WorkerPool | None = None
        self.media: LocalMedia | WorkerPool
        if workers == 1:
            self.engine = MediaEngine(settings, certificate)
            self.media = LocalMedia(self.engine)
        else:
            try:
                self.pool = WorkerPool(
                    workers,
                    settings,
                    certificate,
                    log_level=config.logging.level,
                    log_json=config.logging.json_lines,
                    secrets=log_secrets(config),
                    room_transports_per_worker=rtc.room_transports_per_worker,
                )
            except OSError as exc:
                # A read-only root file system without a tmpfs (Docker's read_only: true).
                raise StartupError(
                    f"rtc.workers {workers} needs a writable directory for the workers' "
                    f"channel sockets and none was usable ({exc.strerror or exc}); mount a "
                    "tmpfs at /tmp (compose: tmpfs: [/tmp]; Kubernetes: an emptyDir) or set "
                    "TMPDIR to a writable directory"
                ) from None
            self.media = self.pool
        self.events = MediaEvents()
        self.media.sink = self.events
        self.rooms = Rooms(config.limits.max_rooms)
        self.hub = RoomHub(config, self.media, self.events, self.rooms)
        self.admission = Admission(
            config.limits,
            self.rooms,
            participants=lambda: len(self.hub.by_resume),
            on_refusal=lambda reason: self.metrics.admission_refusals.labels(reason).inc(),
        )
        for reason in REFUSAL_REASONS:
            self.metrics.admission_refusals.labels(reason)  # every series exported from 0
        self.metrics.registry.register(
            MediaCollector(self.media.snapshot, self.rooms, self.hub, self.admission)
        )
        self.metrics.registry.register(WorkerCollector(self._worker_status, self._mesh_status))
        self.app = create_app(
            config,
            self.lifecycle,
            self.metrics,
            self.media,
            self.events,
            self.rooms,
            self.admission,
        )
        self.app[HUB_KEY] = self.hub
        self.cluster: Cluster | None = None
        self.federation: Federation | None = None
        if config.cluster.enabled:
            self.cluster = Cluster(
                config.cluster,
                load=self.admission.sessions,
                rooms=self.rooms.names,
                accepting=lambda: not self.lifecycle.draining,
            )
            self.app[CLUSTER_KEY] = self.cluster
            if config.cluster.rooms == "span":
                self.federation = Federation(
                    self.cluster,
                    self.hub,
                    self.media,
                    self.rooms,
                    self.events,
                    str(certificate.fingerprint),
                )
                self.app[FEDERATION_KEY] = self.federation
            self.metrics.registry.register(ClusterCollector(self.cluster, self.federation))
        self._runner: web.AppRunner | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._signals = 0

    @property
    def url(self) -> str:
        http = self.config.http
        scheme = "https" if http.tls.cert_file else "http"
        host = f"[{http.host}]" if ":" in http.host else http.host
        return f"{scheme}://{host}:{http.port}"

    async def start(self) -> None:
        http, rtc = self.config.http, self.config.rtc
        try:
            if self.engine is not None:
                await self.engine.start()
            elif self.pool is not None:
                await self.pool.start()
        except OSError as exc:
            hint = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            if self.pool is not None and exc.errno is None:
                hint = str(exc)
            raise StartupError(
                f"cannot bind UDP {rtc.bind_host}:{rtc.udp_port} (rtc.bind_host, rtc.udp_port): "
                f"{hint}"
            ) from None
        if self.cluster is not None:
            try:
                await self.cluster.start()
            except ClusterUnavailable as exc:
                await self._close_media()
                raise StartupError(str(exc)) from None
            if self.federation is not None:
                await self.federation.start()
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=logging.getLogger("sfu.access"),
            logger=ServerLog(self.metrics),
            # The drain already waited for requests that matter; don't wait again here.
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            http.host,
            http.port,
            ssl_context=self._ssl_context(),
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            if self.federation is not None:
                await self.federation.close()
            if self.cluster is not None:
                await self.cluster.close()
            await self._close_media()
            hint = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(
                f"cannot listen on {http.host}:{http.port} (http.host, http.port): {hint}"
            ) from None
        if self.config.metrics.enabled:
            self._lag_task = asyncio.create_task(
                measure_loop_lag(self.metrics.loop_lag, self.config.metrics.loop_lag_interval)
            )
        self.hub.start()
        self.lifecycle.ready = True
        self.metrics.ready.set(1)
        log.info("blindfold %s listening on %s", __version__, self.url)
        self._log_dev_mode()

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.http.tls
        if tls.cert_file is None or tls.key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"cannot load http.tls.cert_file/key_file ({tls.cert_file}, {tls.key_file}): {exc}"
            ) from None
        return context

    def _log_dev_mode(self) -> None:
        if not self.config.dev_mode:
            return
        dev_key = self.config.secret_for(DEV_API_KEY) == DEV_API_SECRET
        log.warning(
            "DEV MODE: loopback only%s. Mint a token with: sfu token --room demo --identity "
            "alice --publish --subscribe. Never run dev mode in production (dev_mode: false).",
            f"; API key '{DEV_API_KEY}' uses the public dev secret" if dev_key else "",
        )

    def request_stop(self, reason: str = "requested") -> None:
        """First call starts a graceful drain; a second one cuts the drain short."""
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown %s: draining for up to %.1fs", reason, self.config.drain_timeout)
        else:
            log.warning("shutdown %s again: skipping the rest of the drain", reason)
        self._stop.set()

    async def run_until_stopped(self) -> int:
        await self._stop.wait()
        self.lifecycle.start_draining()
        self.metrics.ready.set(0)
        self.metrics.draining.set(1)
        self._stop.clear()
        # Ends at whichever comes first: idle, the deadline, or a second signal.
        idle = asyncio.create_task(self.lifecycle.wait_idle())
        forced = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait(
            {idle, forced},
            timeout=self.config.drain_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        forced.cancel()
        idle.cancel()
        if idle not in done:
            log.warning(
                "drain ended with work still active %s; closing it now", self.lifecycle.active()
            )
        await self.close()
        log.info("stopped")
        return EXIT_OK

    async def close(self) -> None:
        self.lifecycle.ready = False
        await stop_task(self._lag_task)
        self._lag_task = None
        await self.hub.close()
        if self.federation is not None:
            await self.federation.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self._close_media()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _worker_status(self) -> list[WorkerStatus]:
        if self.pool is None:
            port = self.engine.candidates[0][1] if self.engine and self.engine.candidates else 0
            transports = len(self.engine.transports) if self.engine else 0
            return [WorkerStatus(0, os.getpid(), port, True, 0, transports)]
        return [
            WorkerStatus(
                remote.index,
                remote.pid,
                remote.candidates[0][1] if remote.candidates else 0,
                remote.running,
                self.pool.restarts[remote.index],
                remote.load,
            )
            for remote in self.pool.workers
        ]

    def _mesh_status(self) -> MeshStatus:
        if self.pool is None:
            return MeshStatus()
        mesh = self.pool.mesh
        return MeshStatus(mesh.relays(), mesh.mirrors(), mesh.relays_opened, mesh.relays_failed)

    async def _close_media(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        if self.pool is not None:
            await self.pool.close()


def log_secrets(config: Config) -> list[str]:
    """Values the log must never show: API secrets and TURN credentials."""
    secrets = [s.get_secret_value() for s in config.auth.keys.values()]
    secrets += [
        server.credential.get_secret_value()
        for server in config.rtc.ice_servers
        if server.credential is not None
    ]
    # A Redis password, whether or not the URL is ever printed whole.
    redis_url = config.cluster.redis_url.get_secret_value()
    password = redis_url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    if password:
        secrets.append(password)
    return secrets


def _dtls_certificate(config: Config) -> DtlsCertificate:
    dtls = config.rtc.dtls
    if dtls.cert_file is None or dtls.key_file is None:
        return DtlsCertificate.generate()
    try:
        return DtlsCertificate.load(dtls.cert_file, dtls.key_file)
    except (OSError, ValueError) as exc:
        raise StartupError(
            f"cannot load rtc.dtls.cert_file/key_file ({dtls.cert_file}, {dtls.key_file}): {exc}"
        ) from None


async def serve(config: Config, event_loop_name: str) -> int:
    try:
        server = Server(config, event_loop_name)
    except StartupError as exc:
        log.error("%s", exc)  # the message is the whole story: no traceback
        return EXIT_FAILURE
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop, sig.name)
    try:
        await server.start()
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    return await server.run_until_stopped()


def run(config: Config) -> int:
    """Run on uvloop when it is installed (it is a dependency; absent only on odd platforms)."""
    factory: Any = None
    name = "asyncio"
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the standard asyncio event loop")
    else:
        factory, name = uvloop.new_event_loop, "uvloop"
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(config, name))
