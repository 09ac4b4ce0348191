"""An in-process MediaEngine with simulated clients: no sockets, no DTLS, no event loop.

The engine is the real one (demultiplexer, ICE-lite agent, transports, producers,
down-tracks, SRTP); only its surroundings are stand-ins:

- the UDP socket is a `RecordingSocket` that keeps every datagram the engine sends, with its
  destination address;
- the DTLS handshake is skipped: `inject_srtp` gives a transport what a finished handshake
  leaves behind (SRTP keys, state CONNECTED) and returns the client's side of the keys;
- time is a `FakeClock` shared by the ICE agent, producers and down-tracks, and `advance`
  runs the engine's periodic `tick` as its timer task would.

A `Client` is one simulated WebRTC endpoint at its own address: it sends authenticated
STUN checks and SRTP/SRTCP into `MediaEngine.datagram_received`, and decrypts what the
engine sent to it. bench/bench_fanout.py builds its engine from the same pieces.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sfu.media import stun
from sfu.media.downtrack import DownTrack
from sfu.media.engine import SENDER_REPORT_INTERVAL, TIMER_INTERVAL, MediaEngine, MediaSettings
from sfu.media.ice import Address, IceLiteAgent, random_ice_string
from sfu.media.producer import Producer, TrackCodec
from sfu.media.rtcp import RtcpPacket, parse_rtcp
from sfu.media.rtp import RtpHeader, parse_header
from sfu.media.srtp import AEAD_AES_128_GCM, SrtpKeyingMaterial, SrtpProfile, SrtpSession
from sfu.media.transport import Transport, TransportState

VP8 = TrackCodec("VP8", 90000, payload_type=96, rtx_payload_type=97)
OPUS = TrackCodec("opus", 48000, payload_type=111, channels=2)

# Arbitrary, fixed publisher SSRCs: tests compare against them.
VIDEO_SSRC = 0x11111111
VIDEO_RTX_SSRC = 0x22222222
AUDIO_SSRC = 0x33333333

START = 1000.0  # the fake monotonic clock's origin
WALLCLOCK_START = 1_700_000_000.0

# A VP8 payload descriptor (X=0, S=1, PID=0) and the start of a keyframe (P=0) with the
# 3-byte start code and a size, as RFC 6386 section 9.1 lays it out; delta frames set P=1.
_VP8_KEYFRAME_START = bytes([0x10, 0x10, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01])
_VP8_DELTA_START = bytes([0x10, 0x11, 0x00, 0x00])


class DatagramSender(Protocol):
    """What the engine sends through (asyncio's DatagramTransport, as far as it is used)."""

    def sendto(self, data: bytes, addr: Address) -> None: ...

    def close(self) -> None: ...


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingSocket:
    """Stands in for the engine's UDP transport and keeps every datagram sent, in order.

    It has no `get_extra_info`, so `MediaEngine.connection_made` does not look for a real
    socket to send on and every datagram goes through `sendto` here.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.closed = False

    def sendto(self, data: bytes, addr: Address) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        self.closed = True

    def to(self, addr: Address) -> list[bytes]:
        return [data for data, dest in self.sent if dest == addr]


def new_keys(profile: SrtpProfile = AEAD_AES_128_GCM) -> SrtpKeyingMaterial:
    """Keying material as a DTLS-SRTP exporter would produce it, from the OS's randomness."""
    return SrtpKeyingMaterial.from_exported(profile, os.urandom(profile.exporter_length))


def make_engine(
    sender: DatagramSender,
    settings: MediaSettings | None = None,
    *,
    clock: FakeClock | None = None,
) -> MediaEngine:
    """A MediaEngine sending through `sender`, its ICE agent on `clock` when one is given.

    MediaEngine takes no clock itself, so the agent it made is replaced before any session
    exists (sessions take their creation time from the agent's clock).
    """
    settings = settings or MediaSettings("127.0.0.1", 0, ())
    engine = MediaEngine(settings)
    if clock is not None:
        engine.agent = IceLiteAgent(consent_timeout=settings.consent_timeout, clock=clock)
        engine.clock = clock
    engine.connection_made(sender)  # type: ignore[arg-type]
    return engine


def inject_srtp(
    transport: Transport, addr: Address, keys: SrtpKeyingMaterial | None = None
) -> SrtpSession:
    """What a finished DTLS handshake leaves on `transport` (server-side SRTP, state
    CONNECTED), with `addr` as its media address; returns the client's SRTP session."""
    keys = keys or new_keys()
    transport.srtp = SrtpSession(keys)
    transport.addr = addr
    transport.state = TransportState.CONNECTED
    return SrtpSession(keys, role="client")


# -- packets ---------------------------------------------------------------------------------


def rtp_packet(
    seq: int,
    timestamp: int,
    ssrc: int,
    payload: bytes,
    *,
    payload_type: int = 96,
    marker: bool = False,
    extensions: bytes = b"",
) -> bytes:
    """An RTP packet; `extensions` is the body of an RFC 8285 one-byte block (padded here)."""
    first = 0x90 if extensions else 0x80
    header = struct.pack(
        "!BBHII",
        first,
        (0x80 if marker else 0) | payload_type,
        seq & 0xFFFF,
        timestamp & 0xFFFFFFFF,
        ssrc,
    )
    if extensions:
        body = extensions + bytes(-len(extensions) % 4)
        header += struct.pack("!HH", 0xBEDE, len(body) // 4) + body
    return header + payload


def vp8_payload(seq: int, *, keyframe: bool, size: int = 200) -> bytes:
    """A VP8 payload starting a frame, with bytes that differ per packet (so a payload that
    reached the wrong packet cannot go unnoticed)."""
    start = _VP8_KEYFRAME_START if keyframe else _VP8_DELTA_START
    body = bytes((seq * 7 + i) & 0xFF for i in range(max(0, size - len(start))))
    return start + body


def vp8_packet(
    seq: int,
    timestamp: int,
    *,
    keyframe: bool = False,
    ssrc: int = VIDEO_SSRC,
    size: int = 200,
    payload_type: int = VP8.payload_type,
    extensions: bytes = b"",
) -> bytes:
    return rtp_packet(
        seq,
        timestamp,
        ssrc,
        vp8_payload(seq, keyframe=keyframe, size=size),
        payload_type=payload_type,
        marker=True,
        extensions=extensions,
    )


def opus_packet(
    seq: int, timestamp: int, *, ssrc: int = AUDIO_SSRC, extensions: bytes = b""
) -> bytes:
    payload = bytes([0xFC]) + bytes((seq + i) & 0xFF for i in range(60))
    return rtp_packet(
        seq, timestamp, ssrc, payload, payload_type=OPUS.payload_type, extensions=extensions
    )


def mid_extension(ext_id: int, mid: str) -> bytes:
    """One one-byte-form element carrying a MID (RFC 8843 section 15)."""
    value = mid.encode("ascii")
    return bytes([(ext_id << 4) | (len(value) - 1)]) + value


def payload_of(packet: bytes) -> bytes:
    hdr = parse_header(packet)
    assert hdr is not None, "not an RTP packet"
    return packet[hdr.header_len : hdr.payload_end]


def header_of(packet: bytes) -> RtpHeader:
    hdr = parse_header(packet)
    assert hdr is not None, "not an RTP packet"
    return hdr


def is_rtcp(datagram: bytes) -> bool:
    # RFC 5761 section 4, as the engine itself demultiplexes.
    return len(datagram) > 1 and 64 <= datagram[1] & 0x7F <= 95


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Inbox:
    """What one client received since it last looked, decrypted with its SRTP keys."""

    datagrams: list[bytes] = field(default_factory=list)
    rtp: list[bytes] = field(default_factory=list)
    rtcp: list[RtcpPacket] = field(default_factory=list)
    stun: list[stun.StunMessage] = field(default_factory=list)
    # Datagrams the client's SRTP refused: a replay (a resend under the same index),
    # a forgery, or media before the client had keys.
    undecryptable: list[bytes] = field(default_factory=list)

    def of_ssrc(self, ssrc: int) -> list[bytes]:
        return [p for p in self.rtp if header_of(p).ssrc == ssrc]

    def rtcp_of(self, kind: type[RtcpPacket]) -> list[RtcpPacket]:
        return [p for p in self.rtcp if isinstance(p, kind)]


class Client:
    """One simulated WebRTC endpoint of one engine transport, at its own address."""

    def __init__(self, harness: EngineHarness, transport: Transport, addr: Address) -> None:
        self.harness = harness
        self.transport = transport
        self.addr = addr
        self.ufrag = transport.ice.remote_ufrag or ""
        self.pwd = transport.ice.remote_pwd or ""
        self.srtp: SrtpSession | None = None
        self.rtcp_ssrc = secrets.randbits(32) or 1
        self._read = 0

    # -- ICE -------------------------------------------------------------------------------

    def binding_request(
        self,
        *,
        use_candidate: bool = True,
        server_ufrag: str | None = None,
        server_pwd: str | None = None,
        client_ufrag: str | None = None,
    ) -> bytes:
        """A connectivity check as a controlling full agent sends it; the server's
        credentials default to the transport's current ones (its SDP answer)."""
        ice = self.transport.ice
        username = f"{server_ufrag or ice.local_ufrag}:{client_ufrag or self.ufrag}"
        attributes = [
            (stun.ATTR_USERNAME, username.encode()),
            (stun.ATTR_PRIORITY, struct.pack("!I", 1853824767)),
            (stun.ATTR_ICE_CONTROLLING, secrets.token_bytes(8)),
        ]
        if use_candidate:
            attributes.append((stun.ATTR_USE_CANDIDATE, b""))
        key = (server_pwd or ice.local_pwd).encode()
        return stun.encode(stun.BINDING_REQUEST, os.urandom(12), attributes, integrity_key=key)

    def check(
        self,
        *,
        from_addr: Address | None = None,
        use_candidate: bool = True,
        server_ufrag: str | None = None,
        server_pwd: str | None = None,
        client_ufrag: str | None = None,
    ) -> bool:
        """Send a check (from `from_addr` if given, the client moving there) and say whether
        the engine answered it with a success response."""
        data = self.binding_request(
            use_candidate=use_candidate,
            server_ufrag=server_ufrag,
            server_pwd=server_pwd,
            client_ufrag=client_ufrag,
        )
        before = len(self.harness.socket.sent)
        self.harness.engine.deliver(data, from_addr or self.addr)
        for reply, _ in self.harness.socket.sent[before:]:
            if reply[8:20] == data[8:20]:  # same transaction id
                return stun.parse(reply).msg_type == stun.BINDING_SUCCESS
        return False

    def move_to(self, addr: Address) -> bool:
        """Continue from another address (a network change): nominate it with a check and
        read what the engine sends there from now on. Returns whether the check succeeded."""
        ok = self.check(from_addr=addr)
        self.addr = addr
        self._read = 0
        return ok

    def restart_ice(self) -> None:
        """New client credentials, given to the engine as the control plane would on a
        re-offer (RFC 8445 section 9)."""
        self.ufrag = random_ice_string(8)
        self.pwd = random_ice_string(24)
        self.harness.engine.restart_ice(self.transport, self.ufrag, self.pwd)

    def connect(self) -> None:
        """Nominate this address with a check, then key SRTP as a handshake would have."""
        assert self.check(), "the engine refused the client's first check"
        self.srtp = inject_srtp(self.transport, self.addr)

    # -- sending ---------------------------------------------------------------------------

    def send(self, datagram: bytes, *, from_addr: Address | None = None) -> None:
        self.harness.engine.deliver(datagram, from_addr or self.addr)

    def send_rtp(self, packet: bytes) -> bytes:
        """Protect and send one RTP packet; returns the datagram, for replays."""
        assert self.srtp is not None, "connect() first"
        protected = self.srtp.protect_rtp(packet)
        assert protected is not None
        self.send(protected)
        return protected

    def send_rtcp(self, *packets: bytes) -> None:
        """Protect and send one compound RTCP datagram made of `packets`."""
        assert self.srtp is not None, "connect() first"
        protected = self.srtp.protect_rtcp(b"".join(packets))
        assert protected is not None
        self.send(protected)

    # -- receiving -------------------------------------------------------------------------

    def datagrams(self) -> list[bytes]:
        """Everything the engine ever sent to this client's current address."""
        return self.harness.socket.to(self.addr)

    def receive(self) -> Inbox:
        """What arrived since the last call, decrypted (each datagram once, in order, as the
        client's SRTP replay protection would see it)."""
        inbox = Inbox()
        new = self.datagrams()[self._read :]
        self._read += len(new)
        for data in new:
            inbox.datagrams.append(data)
            if data[0] < 4:
                inbox.stun.append(stun.parse(data))
                continue
            if self.srtp is None or not 127 < data[0] < 192:
                inbox.undecryptable.append(data)
                continue
            if is_rtcp(data):
                plain = self.srtp.unprotect_rtcp(data)
                if plain is None:
                    inbox.undecryptable.append(data)
                    continue
                packets, ok = parse_rtcp(plain)
                assert ok, f"the engine sent malformed RTCP: {plain.hex()}"
                inbox.rtcp.extend(packets)
            else:
                plain = self.srtp.unprotect_rtp(data)
                if plain is None:
                    inbox.undecryptable.append(data)
                else:
                    inbox.rtp.append(plain)
        return inbox


# Which forwarding path harnesses use unless told: tests/engine/conftest.py runs every
# engine test once per path ("auto" is the native core when it is built).
DEFAULT_FASTPATH = "auto"


class EngineHarness:
    """One engine, its recording socket, a fake clock, and helpers to add clients."""

    def __init__(self, **settings: float | int | str) -> None:
        settings.setdefault("fastpath", DEFAULT_FASTPATH)
        self.clock = FakeClock()
        self.wallclock = FakeClock(WALLCLOCK_START)
        self.socket = RecordingSocket()
        self.settings = MediaSettings("127.0.0.1", 0, (), **settings)  # type: ignore[arg-type]
        self.engine = make_engine(self.socket, self.settings, clock=self.clock)
        self._next_report = self.clock.now + SENDER_REPORT_INTERVAL
        self._hosts = _addresses()

    # -- clients ---------------------------------------------------------------------------

    def client(self, role: str, *, connect: bool = True) -> Client:
        """A transport for a new client; connected (checked and keyed) unless told not to."""
        transport = self.engine.create_transport(
            role, random_ice_string(8), random_ice_string(24), []
        )
        client = Client(self, transport, next(self._hosts))
        if connect:
            client.connect()
        return client

    def publisher(
        self,
        *,
        codec: TrackCodec = VP8,
        kind: str = "video",
        mid: str = "0",
        ssrc: int | None = VIDEO_SSRC,
        rtx_ssrc: int | None = None,
        connect: bool = True,
    ) -> tuple[Client, Producer]:
        client = self.client("whip", connect=connect)
        return client, self.add_producer(
            client, codec=codec, kind=kind, mid=mid, ssrc=ssrc, rtx_ssrc=rtx_ssrc
        )

    def add_producer(
        self,
        client: Client,
        *,
        codec: TrackCodec = VP8,
        kind: str = "video",
        mid: str = "0",
        ssrc: int | None = VIDEO_SSRC,
        rtx_ssrc: int | None = None,
        ext_ids: dict[str, int] | None = None,
    ) -> Producer:
        producer = self.engine.add_producer(
            client.transport,
            kind=kind,
            mid=mid,
            codec=codec,
            ext_ids=ext_ids or {},
            ssrc=ssrc,
            rtx_ssrc=rtx_ssrc,
        )
        # The engine gives producers the real clock; these run on the harness's.
        producer.clock = self.clock
        producer.created_at = producer.last_packet_at = self.clock()
        return producer

    def subscriber(
        self,
        producer: Producer,
        *,
        payload_type: int | None = None,
        rtx_payload_type: int | None = None,
        connect: bool = True,
    ) -> tuple[Client, DownTrack]:
        client = self.client("whep", connect=connect)
        return client, self.add_downtrack(
            client, producer, payload_type=payload_type, rtx_payload_type=rtx_payload_type
        )

    def add_downtrack(
        self,
        client: Client,
        producer: Producer,
        *,
        payload_type: int | None = None,
        rtx_payload_type: int | None = None,
        ext_map: dict[int, int] | None = None,
    ) -> DownTrack:
        downtrack = self.engine.add_downtrack(
            client.transport,
            producer,
            payload_type=producer.codec.payload_type if payload_type is None else payload_type,
            rtx_payload_type=rtx_payload_type,
            ext_map=ext_map or {},
        )
        downtrack.clock = self.clock
        downtrack.wallclock = self.wallclock
        return downtrack

    # -- time ------------------------------------------------------------------------------

    def tick(self, *, send_reports: bool = False) -> None:
        self.engine.tick(self.clock.now, send_reports=send_reports)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass as the engine's timer task would see them: a tick every
        TIMER_INTERVAL, with sender reports (and the E2EE policy check) once a second."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            step = min(TIMER_INTERVAL, end - self.clock.now)
            self.clock.now = min(self.clock.now + step, end)
            self.wallclock.now += step
            reports = self.clock.now >= self._next_report
            self.tick(send_reports=reports)
            if reports:
                self._next_report = self.clock.now + SENDER_REPORT_INTERVAL


def _addresses() -> Iterator[Address]:
    """Distinct client addresses from TEST-NET-2 (RFC 5737): never a real host."""
    n = 0
    while True:
        n += 1
        yield (f"198.51.100.{n % 250 + 1}", 40000 + n)
