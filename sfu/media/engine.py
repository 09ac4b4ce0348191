"""The media plane: one UDP socket, its demultiplexer, and the commands the control plane uses.

`datagram_received` classifies each datagram by its first byte (RFC 7983 §7): 0-3 STUN,
20-63 DTLS, 128-191 RTP/RTCP; anything else is counted and dropped. A DTLS or SRTP datagram is
only looked at if its source address passed an authenticated ICE check, so an off-path sender
can make the server allocate nothing. Nothing raises out of `datagram_received`.

The control plane talks to this module only through `MediaEngine`'s commands (create a
transport, add a producer, add a down-track, close), so the plane can later move into a
worker process per core without the control plane changing shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL

from sfu.media import fastpath
from sfu.media.downtrack import DownTrack, JoinTimer
from sfu.media.dtls import (
    DtlsCertificate,
    DtlsServer,
    Fingerprint,
    create_client_context,
    create_server_context,
)
from sfu.media.ice import Address, IceLiteAgent
from sfu.media.producer import Producer, TrackCodec
from sfu.media.relay import RelayDialer, RelayEnd
from sfu.media.router import Router
from sfu.media.rtp import id_map_list
from sfu.media.simulcast import SimulcastDownTrack, SimulcastProducer, allocate_transport
from sfu.media.stats import MediaStats
from sfu.media.stun import StunError, parse
from sfu.media.transport import Transport, TransportState

log = logging.getLogger(__name__)

TIMER_INTERVAL = 0.05
SENDER_REPORT_INTERVAL = 1.0
# How often each subscriber's simulcast layers are chosen again (simulcast.py, layers.py):
# often enough to follow the estimate within a second, rarely enough to cost nothing.
LAYER_INTERVAL = 0.25
_ERROR_LOG_INTERVAL = 10.0
# The media socket's receive buffer. Everything for every session arrives on one socket, junk
# included: the kernel's default (208 KiB) holds 90-250 datagrams, which a 2000/s junk flood
# fills within 0.1 s of the event loop pausing; the kernel then drops media too, and audio,
# which has no retransmission, loses those frames (docs/reliability.md). 4 MiB holds
# 3,600-10,000, seconds of such a flood. The kernel grants at most net.core.rmem_max.
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class MediaSettings:
    bind_host: str
    udp_port: int
    announced_ips: Sequence[str]
    consent_timeout: float = 30.0
    handshake_timeout: float = 10.0
    video_buffer: int = 500
    audio_buffer: int = 200
    keyframe_interval: float = 0.5
    subscriber_keyframe_interval: float = 2.0
    e2ee_grace_period: float = 5.0
    integrity_sample_every: int = 100
    # "auto": the native fan-out core when it is built, else pure Python; "off": Python.
    fastpath: str = "auto"
    # Start new video copies on the packets since the last keyframe (no PLI round trip).
    keyframe_cache: bool = True


# How often the native core's counters are folded into `stats` while packets flow (the
# timer folds every TIMER_INTERVAL too, and reading `MediaEngine.stats` folds at once).
NATIVE_FOLD_INTERVAL = 0.02
# recvmmsg batches read per wake-up of the native path before other work gets a turn.
READ_BATCHES_PER_WAKEUP = 16


class DemuxStats:
    __slots__ = (
        "datagrams",
        "dropped_unknown_address",
        "dropped_unknown_type",
        "errors",
        "send_errors",
        "stun",
    )

    def __init__(self) -> None:
        self.datagrams = 0
        self.stun = 0
        self.dropped_unknown_address = 0
        self.dropped_unknown_type = 0
        self.errors = 0
        self.send_errors = 0


class MediaEngine(asyncio.DatagramProtocol):
    def __init__(self, settings: MediaSettings, certificate: DtlsCertificate | None = None) -> None:
        self.settings = settings
        self.certificate = certificate or DtlsCertificate.generate()
        self._ssl_context: SSL.Context = create_server_context(self.certificate)
        # Made on the first relay this engine dials (most never dial one).
        self._client_context: SSL.Context | None = None
        self.agent = IceLiteAgent(consent_timeout=settings.consent_timeout)
        self._stats = MediaStats()
        self._fastpath = fastpath.load(settings.fastpath)
        self._next_layers = 0.0
        self._last_tick = 0.0
        self.router: Router = (
            Router(self._stats, settings.integrity_sample_every)
            if self._fastpath is None
            else fastpath.NativeRouter(self._stats, settings.integrity_sample_every, self._fastpath)
        )
        # The native core, once there is a socket (or a capture sink in tests).
        self._core: Any = None
        # The clock batches of the native path are stamped with (tests replace it).
        self.clock: Callable[[], float] = time.monotonic
        self._folded_at = 0.0
        self.demux = DemuxStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None
        self._by_addr: dict[Address, Transport] = {}
        self._by_ufrag: dict[str, Transport] = {}
        self.transports: dict[str, Transport] = {}
        self._timer: asyncio.Task[None] | None = None
        self._last_error_log = 0.0
        self.handshake_timeouts = 0
        # RTP packets and payload bytes sent into relays by feeds that have ended (the live
        # ones are added at snapshot time).
        self.relay_sent = (0, 0)
        self.candidates: list[tuple[str, int]] = []
        # Called with the time at every timer tick (the media API's own periodic work).
        self.tick_hooks: list[Callable[[float], None]] = []

    @property
    def stats(self) -> MediaStats:
        """The media counters, with what the native core counted itself folded in."""
        self._fold_native()
        return self._stats

    def _fold_native(self) -> None:
        if self._core is not None:
            counters = self.router.take_counters()
            self.demux.datagrams += counters["fast_datagrams"]
            self.demux.send_errors += counters["send_errors"]

    @property
    def fastpath_enabled(self) -> bool:
        """Whether packets are forwarded by the native core (rtc.fastpath)."""
        return self._core is not None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._fastpath is not None:
            # The native core reads the socket itself (recvmmsg): no asyncio transport, just
            # a reader callback per readable event.
            host, port = self.settings.bind_host, self.settings.udp_port
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            self._adopt_socket(sock)
            loop.add_reader(sock.fileno(), self._on_readable)
            port = sock.getsockname()[1]
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(self.settings.bind_host, self.settings.udp_port)
            )
            port = transport.get_extra_info("sockname")[1]
        ips = list(self.settings.announced_ips) or [self.settings.bind_host]
        self.candidates = [(ip, port) for ip in ips if ip not in ("0.0.0.0", "::")]  # noqa: S104
        if not self.candidates:
            log.warning(
                "rtc.bind_host is a wildcard and rtc.announced_ips is empty: clients get no "
                "usable ICE candidate; set rtc.announced_ips to the address clients can reach"
            )
        self._timer = asyncio.create_task(self._run_timers())
        for ip, cport in self.candidates:
            log.info("media: ICE candidate udp %s:%d (host)", ip, cport)
        log.info(
            "media: forwarding with the %s",
            "native fast path" if self._core is not None else "pure-Python path",
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._udp = transport  # type: ignore[assignment]
        # Sending straight on the socket skips the event loop's transport layer (buffering,
        # bookkeeping) that UDP does not need: a full socket buffer means the datagram is
        # dropped, as the network would have done anyway.
        raw = transport.get_extra_info("socket") if hasattr(transport, "get_extra_info") else None
        if raw is not None:
            self._adopt_socket(socket.socket(raw.family, raw.type, fileno=os.dup(raw.fileno())))
        elif self._fastpath is not None:
            # No socket (the engine test harness): the core hands each datagram it would
            # send to the same sender the Python path uses, in order.
            self._start_core(-1)

    def _adopt_socket(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        # Linux reports twice what it granted (the doubling covers its bookkeeping).
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        if granted < RECEIVE_BUFFER_BYTES:
            log.info(
                "media: UDP receive buffer is %d KiB, not the %d KiB asked for (capped by "
                "net.core.rmem_max); a busy moment under heavy traffic may drop packets",
                granted // 1024,
                RECEIVE_BUFFER_BYTES // 1024,
            )
        if self._fastpath is not None:
            self._start_core(sock.fileno())

    def _start_core(self, fd: int) -> None:
        functions = fastpath.srtp_functions()
        # Both checked by fastpath.load() before the engine chose the native router.
        assert self._fastpath is not None
        assert functions is not None
        protect, unprotect = functions
        self._core = self._fastpath.Core(
            fd,
            protect,
            unprotect,
            self.settings.integrity_sample_every,
            self._sendto if fd < 0 else None,
        )
        assert isinstance(self.router, fastpath.NativeRouter)
        self.router.core = self._core

    async def close(self) -> None:
        for transport in list(self.transports.values()):
            transport.close("server shutting down")
        if self._core is not None and self._sock is not None and self._udp is None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._udp is not None:
            self._udp.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- commands ----------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return str(self.certificate.fingerprint)

    def create_transport(
        self,
        role: str,
        remote_ufrag: str | None,
        remote_pwd: str | None,
        fingerprints: Sequence[Fingerprint],
        *,
        transport_id: str | None = None,
        local: tuple[str, str] | None = None,
    ) -> Transport:
        """A transport for one client. When the SFU makes the offer, the client's ICE
        credentials and fingerprint come later with its answer (None and [] until then).
        `transport_id` and `local` (ICE ufrag, pwd) when the control plane chose them."""
        if transport_id is not None and transport_id in self.transports:
            raise ValueError(f"transport id {transport_id!r} is already in use")
        session = self.agent.create_session(remote_ufrag, remote_pwd, local)
        dtls = DtlsServer(self._ssl_context, remote_fingerprints=fingerprints)
        peer = self._fastpath.Peer() if self._fastpath is not None else None
        transport = Transport(
            transport_id or secrets.token_urlsafe(9),
            role,
            session,
            dtls,
            self._sendto,
            self._stats,
            peer,
        )
        self.transports[transport.id] = transport
        self._by_ufrag[session.local_ufrag] = transport
        return transport

    def create_relay(self, transport_id: str, end: RelayEnd) -> Transport:
        """One end of an SFU-to-SFU relay (sfu/media/relay.py). With `end.dial`, this end
        checks that address and is the DTLS client; without, it answers like any client
        transport."""
        transport = self.create_transport(
            "relay",
            end.remote_ufrag,
            end.remote_pwd,
            end.fingerprints,
            transport_id=transport_id,
            local=end.local,
        )
        dial = end.dial
        if dial is not None:
            if self._client_context is None:
                self._client_context = create_client_context(self.certificate)
            transport.dtls = DtlsServer(
                self._client_context, remote_fingerprints=end.fingerprints, client=True
            )
            transport.dialer = RelayDialer(dial, end.local[0], end.remote_ufrag, end.remote_pwd)
            # Its answers, handshake and media all come from the address it dials.
            transport.ice.addresses.add(dial)
            self._by_addr[dial] = transport
            self._map_native(dial, transport)
            transport.dial(time.monotonic())
        return transport

    def add_producer(
        self,
        transport: Transport,
        *,
        kind: str,
        mid: str,
        codec: TrackCodec,
        ext_ids: dict[str, int],
        ssrc: int | None,
        rtx_ssrc: int | None,
        rids: Sequence[str] = (),
    ) -> Producer | SimulcastProducer:
        """A published track: one producer, or with `rids` (simulcast) one producer per
        layer grouped in a SimulcastProducer; each layer's SSRC is learnt from its RID."""
        producer_id = f"{transport.id}:{mid}"
        if rids:
            track = SimulcastProducer(
                producer_id,
                mid,
                codec,
                ext_ids,
                rids,
                lambda layer_id, rid: self._new_producer(
                    transport, layer_id, kind, mid, codec, ext_ids, None, None, rid
                ),
            )
            transport.producers.append(track)
            transport.producers_by_mid[mid] = track
            return track
        producer = self._new_producer(
            transport, producer_id, kind, mid, codec, ext_ids, ssrc, rtx_ssrc
        )
        transport.producers.append(producer)
        transport.producers_by_mid[mid] = producer
        if ssrc is not None:
            transport.producers_by_ssrc[ssrc] = producer
            transport.routes_changed()
        if rtx_ssrc is not None:
            transport.rtx_by_ssrc[rtx_ssrc] = producer
        return producer

    def _new_producer(
        self,
        transport: Transport,
        producer_id: str,
        kind: str,
        mid: str,
        codec: TrackCodec,
        ext_ids: dict[str, int],
        ssrc: int | None,
        rtx_ssrc: int | None,
        rid: str | None = None,
    ) -> Producer:
        return Producer(
            producer_id,
            kind,
            mid,
            codec,
            ext_ids,
            transport,
            ssrc=ssrc,
            rtx_ssrc=rtx_ssrc,
            buffer_size=self.settings.video_buffer
            if kind == "video"
            else self.settings.audio_buffer,
            keyframe_interval=self.settings.keyframe_interval,
            envelope_totals=self._stats.e2ee_frames.setdefault(kind, [0, 0]),
            keyframe_totals=self._stats.keyframe_requests,
            router=self.router,
            keyframe_cache=self.settings.keyframe_cache,
            rid=rid,
        )

    def add_downtrack(
        self,
        transport: Transport,
        producer: Producer | SimulcastProducer,
        *,
        payload_type: int,
        rtx_payload_type: int | None,
        ext_map: dict[int, int],
        join: JoinTimer | None = None,
        ssrcs: tuple[int, int | None] | None = None,
    ) -> DownTrack:
        """A subscriber's copy of `producer`; `ssrcs` (media, RTX) when the control plane
        chose them, else fresh random ones."""
        for pt in (payload_type, rtx_payload_type):
            # Negotiation refuses others; the header rewrite packs the value into 7 bits.
            if pt is not None and not 0 <= pt <= 127:
                raise ValueError(f"payload type {pt} is outside 0-127")
        if ssrcs is not None:
            ssrc, rtx_ssrc = ssrcs
            if rtx_payload_type is None:
                rtx_ssrc = None
            taken = transport.downtracks_by_ssrc
            if not ssrc or ssrc in taken or (rtx_ssrc is not None and rtx_ssrc in taken):
                raise ValueError(f"SSRC {ssrc} or {rtx_ssrc} is taken on this transport")
        else:
            ssrc = self._new_ssrc(transport)
            rtx_ssrc = self._new_ssrc(transport) if rtx_payload_type is not None else None
        kind: type[DownTrack] = DownTrack
        if isinstance(producer, SimulcastProducer):
            kind = SimulcastDownTrack
        downtrack = kind(
            producer,  # type: ignore[arg-type]
            transport,
            ssrc=ssrc,
            payload_type=payload_type,
            ext_map=id_map_list(ext_map),
            rtx_ssrc=rtx_ssrc,
            rtx_payload_type=rtx_payload_type,
            stats=self._stats,
            join=join,
            keyframe_interval=self.settings.subscriber_keyframe_interval,
        )
        producer.attach(downtrack)
        transport.downtracks_by_ssrc[ssrc] = downtrack
        if rtx_ssrc is not None:
            transport.downtracks_by_ssrc[rtx_ssrc] = downtrack
        return downtrack

    def restart_ice(
        self,
        transport: Transport,
        remote_ufrag: str,
        remote_pwd: str,
        local: tuple[str, str] | None = None,
    ) -> None:
        """ICE restart (RFC 8445 §9): new credentials on both sides, same DTLS association.

        The old session is dropped at once: its addresses stay mapped until the new
        session's checks arrive, so media keeps flowing from where it was flowing, and
        consent is now judged by the new credentials only.
        """
        old = transport.ice
        session = self.agent.create_session(remote_ufrag, remote_pwd, local)
        session.addresses.update(old.addresses)
        session.selected = old.selected
        session.last_check = old.last_check
        transport.ice = session
        self._by_ufrag.pop(old.local_ufrag, None)
        self.agent.remove(old.local_ufrag)
        self._by_ufrag[session.local_ufrag] = transport

    def close_transport(self, transport: Transport, reason: str) -> None:
        transport.close(reason)

    @staticmethod
    def _new_ssrc(transport: Transport) -> int:
        while True:
            ssrc = secrets.randbits(32)
            if ssrc and ssrc not in transport.downtracks_by_ssrc:
                return ssrc

    def retire_relay_feeds(self, downtracks: Iterable[DownTrack]) -> None:
        """Fold ended relay feeds' counts into `relay_sent`, so the counter never goes back."""
        packets, octets = self.relay_sent
        for downtrack in downtracks:
            packets += downtrack.packets_sent
            octets += downtrack.octets_sent
        self.relay_sent = (packets, octets)

    def _forget(self, transport: Transport) -> None:
        if transport.role == "relay":
            self.retire_relay_feeds(
                {id(d): d for d in transport.downtracks_by_ssrc.values()}.values()
            )
        self.transports.pop(transport.id, None)
        self._by_ufrag.pop(transport.ice.local_ufrag, None)
        self.agent.remove(transport.ice.local_ufrag)
        for addr in list(transport.ice.addresses):
            if self._by_addr.get(addr) is transport:
                del self._by_addr[addr]
                self._map_native(addr, None)

    # -- packet path -------------------------------------------------------------------------

    def _sendto(self, data: bytes, addr: Address) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.sendto(data, addr)
            except OSError:  # buffer full (BlockingIOError), unreachable: UDP drops it
                self.demux.send_errors += 1
        elif self._udp is not None:
            self._udp.sendto(data, addr)

    def _on_readable(self) -> None:
        """The socket has datagrams (native path): the core reads them in batches, forwards
        what it can and hands the rest back, in arrival order."""
        core = self._core
        budget = READ_BATCHES_PER_WAKEUP
        while True:
            now = self.clock()
            try:
                events = core.receive(now, budget > 0)
            except Exception:
                self._count_error(None)
                break
            if events is None:
                break
            budget -= 1
            self._dispatch(events, now)
            if core.drained:
                # A short batch means the socket was empty a moment ago: asking again
                # costs a system call per wake-up that nearly always finds nothing, and
                # the reader fires again if something has arrived since.
                break
        # Counters read through a kept reference to `stats` lag the core by at most this.
        if now - self._folded_at >= NATIVE_FOLD_INTERVAL:
            self._folded_at = now
            self._fold_native()

    def deliver(self, data: bytes, addr: Address) -> None:
        """One datagram as if read from the socket, through whichever path is active (the
        engine test harness sends with this)."""
        core = self._core
        if core is None:
            self.datagram_received(data, addr)
            return
        core.inject(data, addr)
        while True:
            now = self.clock()
            events = core.receive(now, False)
            if events is None:
                break
            self._dispatch(events, now)
        self._fold_native()

    def _dispatch(self, events: list[tuple[Any, ...]], now: float) -> None:
        for event in events:
            if len(event) == 2:
                self.datagram_received(event[0], event[1])
                continue
            transport, producer, plain, wire_len, attention = event
            if transport is None:
                continue  # closed since the core read the datagram
            try:
                transport.on_plain_rtp(plain, wire_len, now, producer, attention)
            except Exception:
                self._count_error(transport.addr)

    def _count_error(self, addr: Address | None) -> None:
        # One bad datagram must never take the socket down or flood the log.
        self.demux.errors += 1
        now = time.monotonic()
        if now - self._last_error_log > _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.exception("media: error handling a datagram from %s (counted)", addr)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.demux.datagrams += 1
        try:
            if not data:
                self.demux.dropped_unknown_type += 1
                return
            first = data[0]
            if 127 < first < 192:
                transport = self._by_addr.get(addr)
                if transport is None:
                    self.demux.dropped_unknown_address += 1
                    return
                transport.on_srtp(data)
            elif first < 4:
                self._on_stun(data, addr)
            elif 19 < first < 64:
                transport = self._by_addr.get(addr)
                if transport is None:
                    self.demux.dropped_unknown_address += 1
                    return
                transport.on_dtls(data, addr)
            else:
                self.demux.dropped_unknown_type += 1
        except Exception:
            self._count_error(addr)

    def _on_stun(self, data: bytes, addr: Address) -> None:
        self.demux.stun += 1
        known = self._by_addr.get(addr)
        if known is not None and known.dialer is not None:
            # Answers to a relay's own checks (ICE-lite answers requests, never sends them).
            known.on_relay_answer(data, addr, time.monotonic())
            return
        response = self.agent.handle_stun(data, addr)
        if response is None:
            return
        self._sendto(response, addr)
        try:
            username = parse(data).username or ""
        except StunError:
            return
        transport = self._by_ufrag.get(username.partition(":")[0])
        if transport is None or addr not in transport.ice.addresses:
            return  # an error response (e.g. 487): nothing was authenticated from addr
        if self._by_addr.get(addr) is not transport:
            self._by_addr[addr] = transport
            self._map_native(addr, transport)
        transport.on_ice_check(addr)

    def _map_native(self, addr: Address, transport: Transport | None) -> None:
        """Keep the native core's address -> transport table in step with `_by_addr`."""
        if self._core is not None:
            key = self._fastpath.address_key(addr[0], addr[1])  # type: ignore[union-attr]
            self._core.map_address(key, transport.peer if transport is not None else None)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable after a client left) surface here on Linux.
        log.debug("media socket error: %s", exc)

    # -- timers ------------------------------------------------------------------------------

    def allocate_layers(self, now: float) -> None:
        """Measure every simulcast layer, then choose each subscriber's layers within its
        bandwidth estimate and the sizes it asked for."""
        subscribers: list[tuple[Transport, list[SimulcastDownTrack]]] = []
        for transport in self.transports.values():
            if transport.state is not TransportState.CONNECTED:
                continue
            for track in transport.producers:
                if isinstance(track, SimulcastProducer):
                    track.sample(now)
            copies = [
                d
                for d in dict.fromkeys(transport.downtracks_by_ssrc.values())
                if isinstance(d, SimulcastDownTrack) and not d.closed
            ]
            if copies:
                subscribers.append((transport, copies))
        for transport, copies in subscribers:
            bwe = transport.bwe
            wanted = allocate_transport(copies, None if bwe is None else bwe.estimate_bps, now)
            prober = transport.prober
            if wanted is not None and bwe is not None and prober is not None:
                prober.want(wanted, bwe, now)

    def _run_probes(self, now: float, elapsed: float) -> None:
        """Padding for the bandwidth probes under way (probe.py), every timer tick."""
        for transport in self.transports.values():
            prober, bwe = transport.prober, transport.bwe
            if (
                prober is not None
                and prober.active
                and bwe is not None
                and transport.state is TransportState.CONNECTED
            ):
                prober.tick(bwe, now, elapsed, transport.send_padding)

    async def _run_timers(self) -> None:
        next_reports = time.monotonic() + SENDER_REPORT_INTERVAL
        while True:
            await asyncio.sleep(TIMER_INTERVAL)
            now = time.monotonic()
            try:
                self.tick(now, send_reports=now >= next_reports)
            except Exception:
                log.exception("media timer failed (continuing)")
            if now >= next_reports:
                next_reports = now + SENDER_REPORT_INTERVAL

    def tick(self, now: float, *, send_reports: bool) -> None:
        self._fold_native()
        if now >= self._next_layers:
            self._next_layers = now + LAYER_INTERVAL
            self.allocate_layers(now)
        self._run_probes(now, now - self._last_tick if self._last_tick else TIMER_INTERVAL)
        self._last_tick = now
        for hook in self.tick_hooks:
            hook(now)
        for session in self.agent.expire(now):
            transport = self._by_ufrag.get(session.local_ufrag)
            if transport is not None:
                transport.close(
                    f"ICE consent expired (no valid check for {self.settings.consent_timeout:g} s)"
                )
        handshake_deadline = now - self.settings.handshake_timeout
        for transport in list(self.transports.values()):
            if transport.state is not TransportState.CONNECTED and (
                transport.state is not TransportState.CLOSED
                and transport.created_at <= handshake_deadline
            ):
                # An offer nobody follows up (or a client that cannot reach the media port)
                # would otherwise hold its session, stream name and memory for the whole
                # consent timeout.
                self.handshake_timeouts += 1
                transport.close(
                    f"no ICE and DTLS within {self.settings.handshake_timeout:g} s "
                    "(rtc.handshake_timeout)"
                )
            if transport.dialer is not None:
                transport.dial(now)
            if transport.state is TransportState.CLOSED:
                self._forget(transport)
            elif transport.state is TransportState.CONNECTING:
                transport.on_timer(now)
                continue
            if transport.state is TransportState.CONNECTED and transport.twcc is not None:
                # Every TIMER_INTERVAL (50 ms): the publisher's estimator needs fresh arrivals.
                transport.send_transport_feedback(now)
            if send_reports and transport.state is TransportState.CONNECTED:
                transport.send_sender_reports()
                for producer in transport.producers:
                    producer.check_policy(now, self.settings.e2ee_grace_period)
