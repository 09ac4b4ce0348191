"""A minimal WebRTC peer for the load generator: SDP, ICE, a DTLS client, SRTP.

aiortc spends hundreds of microseconds of Python per packet (packet objects, jitter buffers,
RTCP machinery); a generator built on it saturates its own core long before the SFU does, and
then measures itself. This peer does only what a WHIP/WHEP client must do against an ICE-lite
server (and, for bench/compare.py, against a full ICE agent such as Janus), with the project's
own pieces:

- ICE: against an ICE-lite server (or as the offerer) we are controlling and nominate the one
  server candidate (USE-CANDIDATE) with a Binding request signed with the server's ice-pwd
  (`sfu.media.stun`), then send a consent check every few seconds, because the server closes a
  transport after 30 s without one. With `controlling=False` (answering a full agent's offer)
  our checks carry ICE-CONTROLLED and no USE-CANDIDATE. Either way the peer answers the
  server's own Binding requests (a full agent checks the pair from its side too and nominates
  only what it could check), signed with our ice-pwd.
- DTLS: a pyOpenSSL client over memory BIOs (as tests/media/test_dtls.py does), with our own
  self-signed certificate whose fingerprint goes in the offer; the server's certificate is
  checked against the answer's fingerprint, as a browser would.
- SRTP: `SrtpSession(role="client")` keyed from the DTLS exporter.

Per media packet the peer does one libsrtp call and one `send`; the owner installs `on_srtp`
to see received SRTP/SRTCP datagrams unparsed, with their kernel arrival time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import string
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from sfu.media import stun
from sfu.media.dtls import DtlsCertificate, Fingerprint
from sfu.media.srtp import EXPORTER_LABEL, PROFILES, SrtpKeyingMaterial, SrtpSession

VIDEO_PT = 96
RTX_PT = 97
AUDIO_PT = 111
OPUS_FMTP = "minptime=10;useinbandfec=1"

MTU = 1200
CONSENT_INTERVAL = 5.0
STUN_RETRY = 0.2
CONNECT_TIMEOUT = 10.0

_ICE_CHARS = string.ascii_letters + string.digits + "+/"
_RECORD_LEN = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
# Linux values (asm-generic, x86-64 and arm64); the socket module does not export them.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_SIZE = 64
_MAX_READS = 64  # per wake-up, so one busy socket cannot starve the others
# RFC 8445 section 5.1.2.1 priority of a host candidate: type preference 126.
_HOST_PRIORITY = (126 << 24) | (65535 << 8) | 255
HOST = "127.0.0.1"


class PeerError(Exception):
    """Signaling, ICE or DTLS did not complete."""


def random_ice(length: int) -> str:
    return "".join(secrets.choice(_ICE_CHARS) for _ in range(length))


def client_context(certificate: DtlsCertificate) -> SSL.Context:
    """One DTLS client context shared by every peer of a process (creating one is costly)."""
    ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    ctx.use_certificate(certificate.certificate)
    ctx.use_privatekey(certificate.private_key)
    # The server's identity is its SDP fingerprint, checked after the handshake, not a CA.
    ctx.set_verify(SSL.VERIFY_PEER, lambda *_args: True)
    ctx.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    # Memory BIOs cannot report a path MTU; the MTU is set per connection instead.
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    # What Chrome offers: GCM first, the mandatory-to-implement AES-CM profile as fallback.
    ctx.set_tlsext_use_srtp(b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80")
    return ctx


# -- SDP ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    ice_ufrag: str
    ice_pwd: str
    fingerprint: Fingerprint
    candidate: tuple[str, int]
    # SSRC -> "video" / "audio" / "rtx", from a=ssrc and a=ssrc-group:FID (subscribers).
    ssrc_kinds: dict[int, str] = field(default_factory=dict)
    # Payload type -> kind, as the answer's rtpmap lines give them.
    payload_kinds: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ssrcs:
    """SSRCs a publisher announces in its offer, so the SFU can route before any MID."""

    video: int
    rtx: int
    audio: int

    @classmethod
    def random(cls) -> Ssrcs:
        values: set[int] = set()
        while len(values) < 3:
            values.add(secrets.randbits(32) or 1)
        video, rtx, audio = values
        return cls(video, rtx, audio)


def candidate_lines(port: int) -> list[str]:
    """Our one host candidate, for servers that do not learn it from our checks alone."""
    return [f"a=candidate:1 1 udp {_HOST_PRIORITY} {HOST} {port} typ host", "a=end-of-candidates"]


def build_offer(
    *,
    send: bool,
    ufrag: str,
    pwd: str,
    fingerprint: Fingerprint,
    ssrcs: Ssrcs | None,
    port: int | None = None,
) -> str:
    """A BUNDLEd offer with one VP8(+RTX) video and one Opus audio section.

    Publishers (`send`) are sendonly and list their SSRCs with cname and the FID group;
    subscribers are recvonly and list none (the answer tells them the SFU's SSRCs). With
    `port`, the first section carries our host candidate on that port (an ICE-lite server
    learns our address from our checks; a full agent such as Janus wants a candidate).
    """
    direction = "sendonly" if send else "recvonly"
    cname = random_ice(16)
    lines = [
        "v=0",
        f"o=- {secrets.randbits(62)} 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic: WMS loadgen",
    ]

    def transport(mid: str) -> list[str]:
        return [
            "c=IN IP4 0.0.0.0",
            f"a=ice-ufrag:{ufrag}",
            f"a=ice-pwd:{pwd}",
            f"a=fingerprint:{fingerprint}",
            "a=setup:active",
            f"a=mid:{mid}",
            f"a={direction}",
            "a=rtcp-mux",
        ]

    lines += [f"m=video 9 UDP/TLS/RTP/SAVPF {VIDEO_PT} {RTX_PT}", *transport("0")]
    if port is not None:
        lines += candidate_lines(port)
    lines += [
        f"a=rtpmap:{VIDEO_PT} VP8/90000",
        f"a=rtcp-fb:{VIDEO_PT} nack",
        f"a=rtcp-fb:{VIDEO_PT} nack pli",
        f"a=rtpmap:{RTX_PT} rtx/90000",
        f"a=fmtp:{RTX_PT} apt={VIDEO_PT}",
    ]
    if ssrcs is not None:
        lines += [
            f"a=msid:loadgen video-{ssrcs.video}",
            f"a=ssrc-group:FID {ssrcs.video} {ssrcs.rtx}",
            f"a=ssrc:{ssrcs.video} cname:{cname}",
            f"a=ssrc:{ssrcs.rtx} cname:{cname}",
        ]
    lines += [f"m=audio 9 UDP/TLS/RTP/SAVPF {AUDIO_PT}", *transport("1")]
    lines += [f"a=rtpmap:{AUDIO_PT} opus/48000/2", f"a=fmtp:{AUDIO_PT} {OPUS_FMTP}"]
    if ssrcs is not None:
        lines += [f"a=msid:loadgen audio-{ssrcs.audio}", f"a=ssrc:{ssrcs.audio} cname:{cname}"]
    return "\r\n".join(lines) + "\r\n"


def parse_answer(text: str) -> Answer:
    """The few things the peer needs from the SFU's answer; PeerError if one is missing."""
    ufrag = pwd = fingerprint = None
    candidate: tuple[str, int] | None = None
    ssrc_kinds: dict[int, str] = {}
    payload_kinds: dict[int, str] = {}
    rtx_ssrcs: set[int] = set()
    kind = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
        elif not line.startswith("a="):
            continue
        name, _, value = line[2:].partition(":")
        if name == "ice-ufrag" and ufrag is None:
            ufrag = value
        elif name == "ice-pwd" and pwd is None:
            pwd = value
        elif name == "fingerprint" and fingerprint is None:
            fingerprint = value
        elif name == "candidate" and candidate is None:
            # foundation component transport priority ip port typ host
            parts = value.split()
            if len(parts) >= 6 and parts[2].lower() == "udp" and ":" not in parts[4]:
                candidate = (parts[4], int(parts[5]))
        elif name == "ssrc-group":
            parts = value.split()
            if parts[0] == "FID" and len(parts) == 3:
                rtx_ssrcs.add(int(parts[2]))
        elif name == "ssrc":
            ssrc_kinds.setdefault(int(value.split(" ", 1)[0]), kind)
        elif name == "rtpmap":
            pt, _, codec = value.partition(" ")
            payload_kinds[int(pt)] = "rtx" if codec.lower().startswith("rtx/") else kind
    if ufrag is None or pwd is None or fingerprint is None or candidate is None:
        raise PeerError("answer lacks ice-ufrag, ice-pwd, fingerprint or an IPv4 UDP candidate")
    for ssrc in rtx_ssrcs:
        ssrc_kinds[ssrc] = "rtx"
    return Answer(ufrag, pwd, Fingerprint.parse(fingerprint), candidate, ssrc_kinds, payload_kinds)


# -- the peer ----------------------------------------------------------------------------------


def _split_records(data: bytes) -> list[bytes]:
    records = []
    pos = 0
    while pos + 13 <= len(data):
        end = pos + 13 + _RECORD_LEN.unpack_from(data, pos + 11)[0]
        records.append(data[pos:end])
        pos = end
    return records


class Peer:
    """One WebRTC transport (one WHIP or WHEP session) on its own connected UDP socket.

    The socket is read with `recvmsg` from a loop reader rather than through an asyncio
    datagram transport, for the kernel's receive timestamp (SO_TIMESTAMPNS): it tells when a
    packet reached us, independent of how long this process took to get to it. A burst of
    fan-out copies would otherwise queue behind our own unprotect work and be charged to the
    SFU as latency.
    """

    def __init__(
        self,
        context: SSL.Context,
        certificate: DtlsCertificate,
        *,
        controlling: bool = True,
    ) -> None:
        self.controlling = controlling
        self.local_ufrag = random_ice(8)
        self.local_pwd = random_ice(24)
        self.fingerprint = certificate.fingerprint
        self._context = context
        self.answer: Answer | None = None
        self.sock: socket.socket | None = None
        self.srtp: SrtpSession | None = None
        self.srtp_profile = ""
        # Hot path, installed by the owner: each datagram of 128-191 (SRTP/SRTCP) with its
        # arrival time on the time.monotonic_ns() clock.
        self.on_srtp: Callable[[bytes, int], None] = lambda _data, _at: None
        self._tiebreaker = secrets.randbits(64)
        self._stun_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._ssl: SSL.Connection | None = None
        self._dtls_done: asyncio.Future[None] | None = None
        self._consent_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.consent_sent = 0
        self.consent_ok = 0
        self.checks_answered = 0  # the server's own Binding requests (full ICE agents)
        self.send_errors = 0
        self.closed = False

    def offer(self, *, send: bool, ssrcs: Ssrcs | None, port: int | None = None) -> str:
        """`build_offer` with this peer's ICE credentials and DTLS fingerprint."""
        return build_offer(
            send=send,
            ufrag=self.local_ufrag,
            pwd=self.local_pwd,
            fingerprint=self.fingerprint,
            ssrcs=ssrcs,
            port=port,
        )

    # -- socket --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        sock = self.sock
        if sock is None or self.closed:
            return
        try:
            sock.send(data)
        except OSError:
            # EAGAIN (socket buffer full) or ECONNREFUSED (ICMP after the SFU left): a lost
            # packet, which the receivers count as loss.
            self.send_errors += 1

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        # Kernel stamps are CLOCK_REALTIME; marks are CLOCK_MONOTONIC. Both are slewed alike,
        # so their difference changes only on a clock step: taking it per wake-up is exact.
        offset = time.monotonic_ns() - time.time_ns()
        recvmsg = sock.recvmsg
        on_srtp = self.on_srtp
        for _ in range(_MAX_READS):
            try:
                data, ancillary, _flags, addr = recvmsg(2048, _ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP error surfaced on the connected socket; nothing queued behind it
            if not data:
                continue
            first = data[0]
            if first > 127:
                if ancillary:
                    seconds, nanos = _TIMESPEC.unpack(ancillary[0][2])
                    arrived = seconds * 1_000_000_000 + nanos + offset
                else:
                    arrived = time.monotonic_ns()
                on_srtp(data, arrived)
            elif first < 4:
                self._on_stun(data, addr)
            elif 19 < first < 64:
                self._on_dtls(data)

    # -- connect -------------------------------------------------------------------------------

    def open(self) -> int:
        """Bind our UDP socket (once) and start reading it; returns the local port, for a
        candidate line. A full ICE agent may send its checks before we have its answer."""
        if self.sock is not None:
            return int(self.sock.getsockname()[1])
        loop = self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # Room for a whole fan-out burst while this process is busy elsewhere.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((HOST, 0))
        sock.setblocking(False)
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)
        return int(sock.getsockname()[1])

    async def connect(self, answer: Answer) -> None:
        """ICE, then DTLS, then SRTP keys; PeerError if any of it times out."""
        self.answer = answer
        self.open()
        assert self.sock is not None
        # Connected: the kernel filters other sources and send() needs no address.
        self.sock.connect(answer.candidate)
        try:
            await asyncio.wait_for(self._ice(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise PeerError("no ICE Binding response from the SFU") from None
        try:
            await asyncio.wait_for(self._dtls(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise PeerError("DTLS handshake timed out") from None
        self._consent_task = asyncio.get_running_loop().create_task(self._consent())

    def _binding_request(self, *, nominate: bool) -> tuple[bytes, bytes]:
        assert self.answer is not None
        tid = os.urandom(12)
        role = stun.ATTR_ICE_CONTROLLING if self.controlling else stun.ATTR_ICE_CONTROLLED
        attrs = [
            (stun.ATTR_USERNAME, f"{self.answer.ice_ufrag}:{self.local_ufrag}".encode()),
            (stun.ATTR_PRIORITY, _U32.pack(_HOST_PRIORITY)),
            (role, _U64.pack(self._tiebreaker)),
        ]
        if nominate and self.controlling:
            attrs.append((stun.ATTR_USE_CANDIDATE, b""))
        # Short-term credentials: a request is signed with the *receiver's* password.
        data = stun.encode(
            stun.BINDING_REQUEST, tid, attrs, integrity_key=self.answer.ice_pwd.encode()
        )
        return tid, data

    async def _ice(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            tid, data = self._binding_request(nominate=True)
            waiter: asyncio.Future[None] = loop.create_future()
            self._stun_waiters[tid] = waiter
            self.send(data)
            try:
                await asyncio.wait_for(waiter, STUN_RETRY)
                return
            except TimeoutError:
                continue
            finally:
                self._stun_waiters.pop(tid, None)

    def _on_stun(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = stun.parse(data)
        except stun.StunError:
            return
        if msg.msg_type == stun.BINDING_REQUEST:
            self._answer_check(msg, addr)
            return
        if msg.msg_type != stun.BINDING_SUCCESS or self.answer is None:
            return
        if not msg.check_integrity(self.answer.ice_pwd.encode()):
            return
        waiter = self._stun_waiters.pop(msg.transaction_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self._consent_task is not None:
            self.consent_ok += 1

    def _answer_check(self, msg: stun.StunMessage, addr: tuple[str, int]) -> None:
        """A full ICE agent's connectivity check (or consent check) of our candidate: answer
        it, signed with our password, so that the agent can validate and nominate the pair."""
        key = self.local_pwd.encode()
        try:
            username = msg.username
        except stun.StunError:
            return
        if username is None or username.partition(":")[0] != self.local_ufrag:
            return
        if not msg.check_integrity(key):
            return
        sock = self.sock
        if sock is None or self.closed:
            return
        try:
            sock.sendto(stun.build_binding_success(msg.transaction_id, addr, key), addr)
        except OSError:
            self.send_errors += 1
            return
        self.checks_answered += 1

    async def _consent(self) -> None:
        # Spread the checks of many peers over the interval instead of sending them in step.
        await asyncio.sleep(CONSENT_INTERVAL * secrets.randbelow(1000) / 1000)
        while not self.closed:
            _, data = self._binding_request(nominate=False)
            self.send(data)
            self.consent_sent += 1
            await asyncio.sleep(CONSENT_INTERVAL)

    async def _dtls(self) -> None:
        loop = asyncio.get_running_loop()
        ssl = SSL.Connection(self._context, None)
        ssl.set_connect_state()
        ssl.set_ciphertext_mtu(MTU)
        self._ssl = ssl
        self._dtls_done = loop.create_future()
        self._handshake()
        while not self._dtls_done.done():
            # OpenSSL keeps its own retransmission timer; poll it (loopback rarely loses).
            timeout = ssl.DTLSv1_get_timeout()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._dtls_done), max(0.05, timeout or 0.5))
            if not self._dtls_done.done():
                with contextlib.suppress(SSL.Error):
                    ssl.DTLSv1_handle_timeout()
                self._flush()
        await self._dtls_done  # raises PeerError if the handshake failed

    def _handshake(self) -> None:
        assert self._ssl is not None
        assert self._dtls_done is not None
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._flush()
            if not self._dtls_done.done():
                self._dtls_done.set_exception(PeerError(f"DTLS handshake failed: {exc}"))
            return
        self._flush()
        self._dtls_connected()

    def _dtls_connected(self) -> None:
        assert self._ssl is not None
        assert self._dtls_done is not None
        assert self.answer is not None
        if self._dtls_done.done():
            return
        certificate = self._ssl.get_peer_certificate(as_cryptography=True)
        if certificate is None or not self.answer.fingerprint.matches(certificate):
            self._dtls_done.set_exception(PeerError("server certificate != answer fingerprint"))
            return
        profile = PROFILES[self._ssl.get_selected_srtp_profile().decode()]
        material = self._ssl.export_keying_material(EXPORTER_LABEL, profile.exporter_length)
        keys = SrtpKeyingMaterial.from_exported(profile, material)
        self.srtp = SrtpSession(keys, role="client")
        self.srtp_profile = profile.name
        self._dtls_done.set_result(None)

    def _on_dtls(self, data: bytes) -> None:
        ssl = self._ssl
        if ssl is None:
            return
        try:
            ssl.bio_write(data)
        except SSL.Error:
            return
        if self._dtls_done is not None and not self._dtls_done.done():
            self._handshake()
            return
        # After the handshake: a retransmitted server flight or close_notify; nothing to keep.
        with contextlib.suppress(SSL.Error):
            ssl.recv(65536)
        self._flush()

    def _flush(self) -> None:
        ssl = self._ssl
        if ssl is None or self.sock is None:
            return
        chunks = []
        while True:
            try:
                chunks.append(ssl.bio_read(65536))
            except SSL.WantReadError:
                break
        if not chunks:
            return
        # The memory BIO forgets datagram boundaries: re-pack whole records up to the MTU.
        datagram = b""
        for record in _split_records(b"".join(chunks)):
            if datagram and len(datagram) + len(record) > MTU:
                self.send(datagram)
                datagram = b""
            datagram += record
        if datagram:
            self.send(datagram)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._consent_task is not None:
            self._consent_task.cancel()
        sock = self.sock
        if sock is not None and not self.closed:
            if self._ssl is not None and self.srtp is not None:
                # close_notify lets the server end the transport now rather than on consent.
                with contextlib.suppress(SSL.Error):
                    self._ssl.shutdown()
                self._flush()
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self.closed = True
