"""DTLS-SRTP server: real handshakes against pyOpenSSL and aiortc clients, shuttled in memory."""

from __future__ import annotations

import asyncio
import datetime
import random
import re
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from sfu.media.dtls import (
    DtlsCertificate,
    DtlsServer,
    DtlsState,
    Fingerprint,
    create_server_context,
)
from sfu.media.srtp import EXPORTER_LABEL, PROFILES, SrtpKeyingMaterial, SrtpSession

ALL_PROFILES = b"SRTP_AES128_CM_SHA1_80:SRTP_AEAD_AES_256_GCM:SRTP_AEAD_AES_128_GCM"


@pytest.fixture(scope="module")
def server_cert() -> DtlsCertificate:
    return DtlsCertificate.generate()


@pytest.fixture(scope="module")
def server_ctx(server_cert: DtlsCertificate) -> SSL.Context:
    return create_server_context(server_cert)


@pytest.fixture(scope="module")
def client_cert() -> DtlsCertificate:
    return DtlsCertificate.generate()


def records(datagram: bytes) -> list[tuple[int, int]]:
    """(content type, record length) of each DTLS record; asserts the datagram is whole records."""
    out = []
    i = 0
    while i < len(datagram):
        assert len(datagram) - i >= 13, "truncated record header"
        (length,) = struct.unpack_from("!H", datagram, i + 11)
        assert i + 13 + length <= len(datagram), "record straddles the datagram end"
        out.append((datagram[i], 13 + length))
        i += 13 + length
    return out


class Client:
    """A WebRTC-style DTLS client built directly on pyOpenSSL (a different code path from ours)."""

    def __init__(
        self,
        cert: DtlsCertificate | None,
        profiles: bytes | None = ALL_PROFILES,
        mtu: int = 1200,
    ) -> None:
        ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        if cert is not None:
            ctx.use_certificate(cert.certificate)
            ctx.use_privatekey(cert.private_key)
        self.server_certificates: list[x509.Certificate] = []
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        ctx.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
        ctx.set_options(SSL.OP_NO_QUERY_MTU)
        if profiles is not None:
            ctx.set_tlsext_use_srtp(profiles)
        self.ssl = SSL.Connection(ctx, None)
        self.ssl.set_connect_state()
        self.ssl.set_ciphertext_mtu(mtu)
        self.done = False
        self.closed = False
        self.error: SSL.Error | None = None

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, *args: int) -> bool:
        self.server_certificates.append(cert.to_cryptography())
        return True

    def _drain(self) -> list[bytes]:
        data = b""
        while True:
            try:
                data += self.ssl.bio_read(65536)
            except SSL.WantReadError:
                break
        # One record per datagram: a simpler (and still valid) packing than the server's.
        out = []
        i = 0
        while i < len(data):
            (length,) = struct.unpack_from("!H", data, i + 11)
            out.append(data[i : i + 13 + length])
            i += 13 + length
        return out

    def step(self, datagrams: Sequence[bytes] = ()) -> list[bytes]:
        for d in datagrams:
            self.ssl.bio_write(d)
            if self.done:
                try:
                    self.ssl.recv(65536)
                except SSL.WantReadError:
                    pass
                except SSL.ZeroReturnError:
                    self.closed = True
        if not self.done and self.error is None:
            try:
                self.ssl.do_handshake()
                self.done = True
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                self.error = exc
        return self._drain()

    def srtp_keys(self) -> SrtpKeyingMaterial:
        profile = PROFILES[self.ssl.get_selected_srtp_profile().decode()]
        material = self.ssl.export_keying_material(EXPORTER_LABEL, profile.exporter_length)
        return SrtpKeyingMaterial.from_exported(profile, material)


def shuttle(
    server: DtlsServer,
    client: Client,
    *,
    drop_server: Callable[[int], bool] = lambda n: False,
    first: list[bytes] | None = None,
    rounds: int = 10,
) -> list[list[bytes]]:
    """Run the handshake in memory; returns the server's flights (before any dropping)."""
    flights: list[list[bytes]] = []
    to_server = client.step() if first is None else first
    for _ in range(rounds):
        out: list[bytes] = []
        for d in to_server:
            out += server.feed(d)
        if out:
            flights.append(out)
        to_client = [] if drop_server(len(flights) - 1) else out
        to_server = client.step(to_client)
        if not to_server and not to_client:
            break
    return flights


def connected_pair(
    server_ctx: SSL.Context, client_cert: DtlsCertificate, **kw: Any
) -> tuple[DtlsServer, Client]:
    server = DtlsServer(server_ctx, [client_cert.fingerprint])
    client = Client(client_cert, **kw)
    shuttle(server, client)
    assert server.state is DtlsState.CONNECTED, server.failure_reason
    assert client.done
    return server, client


# -- certificates and fingerprints -----------------------------------------------------------


def test_generated_certificate_is_p256_with_sdp_fingerprint(server_cert: DtlsCertificate) -> None:
    fp = server_cert.fingerprint
    assert fp.algorithm == "sha-256"
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fp.value)
    # Independent computation through pyOpenSSL's X509.digest.
    openssl_digest = crypto.X509.from_cryptography(server_cert.certificate).digest("sha256")
    assert fp.value == openssl_digest.decode()
    assert str(fp) == f"sha-256 {fp.value}"
    assert server_cert.certificate.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_certificate_pem_round_trip(server_cert: DtlsCertificate, tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(server_cert.certificate_pem())
    key_path.write_bytes(server_cert.private_key_pem())
    loaded = DtlsCertificate.load(cert_path, key_path)
    assert loaded.fingerprint == server_cert.fingerprint
    other = DtlsCertificate.generate()
    with pytest.raises(ValueError, match="does not belong"):
        DtlsCertificate.from_pem(server_cert.certificate_pem(), other.private_key_pem())


def test_fingerprint_parsing_normalises_and_rejects() -> None:
    cert = DtlsCertificate.generate()
    lower = f"SHA-256 {cert.fingerprint.value.lower()}"
    assert Fingerprint.parse(lower) == cert.fingerprint
    assert Fingerprint.parse(str(cert.fingerprint)) == cert.fingerprint
    with pytest.raises(ValueError, match="unsupported"):
        Fingerprint.parse("md5 " + ":".join(["AB"] * 16))
    with pytest.raises(ValueError, match="wrong length"):
        Fingerprint.parse("sha-256 AB:CD")
    with pytest.raises(ValueError, match="hex"):
        Fingerprint.parse("sha-256 " + ":".join(["ZZ"] * 32))
    with pytest.raises(ValueError, match="expected"):
        Fingerprint.parse("sha-256")


# -- handshakes ------------------------------------------------------------------------------


def test_handshake_prefers_gcm_and_both_sides_derive_the_same_keys(
    server_ctx: SSL.Context, server_cert: DtlsCertificate, client_cert: DtlsCertificate
) -> None:
    server, client = connected_pair(server_ctx, client_cert)
    # The client listed AES128_CM_SHA1_80 first; the server's order wins.
    assert server.srtp_profile == "SRTP_AEAD_AES_128_GCM"
    assert client.ssl.get_selected_srtp_profile() == b"SRTP_AEAD_AES_128_GCM"
    assert server.srtp_keys == client.srtp_keys()
    assert client.ssl.get_protocol_version_name() == "DTLSv1.2"
    assert client.ssl.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"
    # The client saw the certificate our SDP fingerprint describes.
    assert Fingerprint.of(client.server_certificates[0]) == server_cert.fingerprint
    assert server.next_timeout() is None


@pytest.mark.parametrize(
    ("profile", "key_len", "salt_len"),
    [
        ("SRTP_AEAD_AES_128_GCM", 16, 12),
        ("SRTP_AEAD_AES_256_GCM", 32, 12),
        ("SRTP_AES128_CM_SHA1_80", 16, 14),
    ],
)
def test_each_profile_negotiates_and_keys_work_for_srtp(
    server_ctx: SSL.Context,
    client_cert: DtlsCertificate,
    profile: str,
    key_len: int,
    salt_len: int,
) -> None:
    server, client = connected_pair(server_ctx, client_cert, profiles=profile.encode())
    assert server.srtp_profile == profile
    keys = server.srtp_keys
    assert keys is not None
    assert keys == client.srtp_keys()
    assert len(keys.client_write_key) == len(keys.server_write_key) == key_len
    assert len(keys.client_write_salt) == len(keys.server_write_salt) == salt_len
    assert keys.client_write_key != keys.server_write_key

    sfu = SrtpSession(keys)
    browser = SrtpSession(client.srtp_keys(), role="client")
    rtp = struct.pack("!BBHII", 0x80, 96, 1, 1234, 0xCAFE) + bytes(1000)
    sent = browser.protect_rtp(rtp)
    assert sent is not None
    assert sfu.unprotect_rtp(sent) == rtp
    back = sfu.protect_rtp(rtp)
    assert back is not None
    assert browser.unprotect_rtp(back) == rtp


@pytest.mark.parametrize("algorithm", ["sha-1", "sha-256", "sha-384", "sha-512"])
def test_every_sdp_hash_algorithm_authenticates(
    server_ctx: SSL.Context, client_cert: DtlsCertificate, algorithm: str
) -> None:
    server = DtlsServer(server_ctx, [Fingerprint.of(client_cert.certificate, algorithm)])
    shuttle(server, Client(client_cert))
    assert server.state is DtlsState.CONNECTED


def test_fingerprint_mismatch_fails_and_tells_the_client(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    server = DtlsServer(server_ctx, [DtlsCertificate.generate().fingerprint])
    client = Client(client_cert)
    flights = shuttle(server, client)
    assert server.state is DtlsState.FAILED
    assert server.failure_reason == "fingerprint mismatch"
    assert server.srtp_keys is None
    assert server.srtp_profile is None
    # The last thing the server sent after its Finished is a close_notify alert (type 21).
    assert records(flights[-1][-1])[-1][0] == 21
    assert server.feed(b"\x16\xfe\xfd" + bytes(10)) == []
    assert server.dropped_datagrams == 1


def test_weak_hash_cannot_vouch_when_a_stronger_one_disagrees(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    wrong_sha256 = DtlsCertificate.generate().fingerprint
    right_sha1 = Fingerprint.of(client_cert.certificate, "sha-1")
    server = DtlsServer(server_ctx, [right_sha1, wrong_sha256])
    shuttle(server, Client(client_cert))
    assert server.failure_reason == "fingerprint mismatch"


def test_fingerprint_arriving_after_the_handshake(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    server = DtlsServer(server_ctx)
    client = Client(client_cert)
    shuttle(server, client)
    assert client.done
    assert server.state is DtlsState.CONNECTING
    assert server.srtp_keys is None  # not usable before the peer is authenticated
    assert server.set_remote_fingerprints([client_cert.fingerprint]) == []
    assert server.state is DtlsState.CONNECTED
    assert server.srtp_keys == client.srtp_keys()

    late_wrong = DtlsServer(server_ctx)
    shuttle(late_wrong, Client(client_cert))
    out = late_wrong.set_remote_fingerprints([DtlsCertificate.generate().fingerprint])
    assert late_wrong.failure_reason == "fingerprint mismatch"
    assert out  # close_notify


def test_fingerprint_that_never_arrives_times_out(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    now = [100.0]
    server = DtlsServer(server_ctx, clock=lambda: now[0], handshake_timeout=30.0)
    shuttle(server, Client(client_cert))
    assert server.next_timeout() == 130.0
    server.handle_timeout(130.0)
    assert server.state is DtlsState.FAILED
    assert server.failure_reason == "timed out waiting for the remote fingerprint"


def test_client_without_srtp_or_certificate_fails(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    no_srtp = DtlsServer(server_ctx, [client_cert.fingerprint])
    shuttle(no_srtp, Client(client_cert, profiles=None))
    assert no_srtp.failure_reason == "no SRTP profile negotiated"

    # SHA1_32 is a valid RFC 5764 profile the server deliberately does not offer.
    weak = DtlsServer(server_ctx, [client_cert.fingerprint])
    shuttle(weak, Client(client_cert, profiles=b"SRTP_AES128_CM_SHA1_32"))
    assert weak.failure_reason == "no SRTP profile negotiated"

    anonymous = DtlsServer(server_ctx, [client_cert.fingerprint])
    flights = shuttle(anonymous, Client(None))
    assert anonymous.state is DtlsState.FAILED
    assert anonymous.failure_reason is not None
    assert anonymous.failure_reason.startswith("handshake failed:")
    assert "certificate" in anonymous.failure_reason
    assert records(flights[-1][-1])[-1][0] == 21  # a fatal alert went back


def test_handshake_timeout_without_a_client_flight(server_ctx: SSL.Context) -> None:
    now = [0.0]
    server = DtlsServer(server_ctx, clock=lambda: now[0], handshake_timeout=30.0)
    assert server.next_timeout() is None  # nothing to wait for before a ClientHello
    server.feed(Client(DtlsCertificate.generate()).step()[0])
    assert server.state is DtlsState.CONNECTING
    timeout = server.next_timeout()
    assert timeout is not None
    assert 0.5 < timeout <= 1.0  # OpenSSL's first retransmission timer
    # Woken early by our clock, OpenSSL's own timer has not expired: nothing is resent.
    assert server.handle_timeout(timeout) == []
    assert server.retransmissions == 0
    server.handle_timeout(30.0)
    assert server.failure_reason == "handshake timed out"
    assert server.next_timeout() is None


# -- MTU -------------------------------------------------------------------------------------


def _big_rsa_certificate() -> DtlsCertificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName(f"host{i}.example.test") for i in range(80)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    return DtlsCertificate(cert, key)


@pytest.mark.parametrize("mtu", [1200, 500])
def test_handshake_datagrams_respect_the_mtu(client_cert: DtlsCertificate, mtu: int) -> None:
    big = _big_rsa_certificate()
    assert len(big.certificate_pem()) > 2 * 1200  # forces fragmentation
    server = DtlsServer(create_server_context(big), [client_cert.fingerprint], mtu=mtu)
    client = Client(client_cert)
    flights = shuttle(server, client)
    assert server.state is DtlsState.CONNECTED, server.failure_reason
    assert client.ssl.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"
    datagrams = [d for flight in flights for d in flight]
    assert max(len(d) for d in datagrams) <= mtu
    assert len(flights[0]) >= 3  # the certificate really was split across datagrams
    for d in datagrams:
        records(d)  # only whole records in every datagram


# -- retransmission --------------------------------------------------------------------------


def _sleep_until(server: DtlsServer) -> None:
    deadline = server.next_timeout()
    assert deadline is not None
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.02)


def test_lost_first_flight_is_retransmitted_on_timeout(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    server = DtlsServer(server_ctx, [client_cert.fingerprint])
    client = Client(client_cert)
    first = server.feed(client.step()[0])
    assert first  # ServerHello ... ServerHelloDone, which the network now loses
    assert server.handle_timeout(time.monotonic()) == []  # too early
    _sleep_until(server)
    resent = server.handle_timeout(time.monotonic())
    assert server.retransmissions == 1
    assert [records(d) for d in resent] == [records(d) for d in first]
    shuttle(server, client, first=client.step(resent))
    assert server.state is DtlsState.CONNECTED
    assert server.srtp_keys == client.srtp_keys()


def test_lost_final_flight_is_resent_when_the_client_retransmits(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    server = DtlsServer(server_ctx, [client_cert.fingerprint])
    client = Client(client_cert)
    flights = shuttle(server, client, drop_server=lambda n: n == 1)
    # The server is done (it sent ChangeCipherSpec + Finished); the client never saw them.
    assert server.state is DtlsState.CONNECTED
    assert len(flights) == 2
    assert not client.done
    remaining = client.ssl.DTLSv1_get_timeout()
    assert remaining is not None
    time.sleep(remaining + 0.02)
    assert client.ssl.DTLSv1_handle_timeout()
    again = client.step()
    assert again  # the client's Certificate ... Finished flight, once more
    answer = [d for datagram in again for d in server.feed(datagram)]
    assert answer  # our final flight, resent from OpenSSL's buffer
    client.step(answer)
    assert client.done
    assert server.srtp_keys == client.srtp_keys()


# -- garbage ---------------------------------------------------------------------------------


def test_garbage_never_raises_and_does_not_break_a_handshake(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    server = DtlsServer(server_ctx, [client_cert.fingerprint])
    client = Client(client_cert)
    hello = client.step()
    assert len(hello) == 1
    rng = random.Random(5763)
    junk = [
        b"",
        b"\x00",
        b"\x16",
        b"\x16\xfe\xfd",
        bytes(13),
        hello[0][:20],  # truncated record
        hello[0][:-1],
        hello[0] + b"\x16\xfe",  # trailing partial header
        b"\x16\xfe\xfd" + bytes(8) + b"\xff\xff" + bytes(5),  # length beyond the datagram
        b"\x80" + bytes(40),  # RTP, not DTLS
    ]
    junk += [bytes([rng.randint(20, 63)]) + rng.randbytes(rng.randint(0, 300)) for _ in range(300)]
    for datagram in junk:
        assert server.feed(datagram) == []
    assert server.state is DtlsState.NEW
    assert server.malformed_datagrams == len(junk)
    shuttle(server, client, first=hello)
    assert server.state is DtlsState.CONNECTED


def test_well_framed_garbage_is_contained(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    rng = random.Random(5764)

    def framed(content_type: int, epoch: int) -> bytes:
        body = rng.randbytes(rng.randint(1, 200))
        return (
            struct.pack("!BBBH", content_type, 0xFE, 0xFD, epoch)
            + rng.randbytes(6)
            + struct.pack("!H", len(body))
            + body
        )

    # After the handshake, forged records fail their AEAD check and OpenSSL drops them.
    server, _ = connected_pair(server_ctx, client_cert)
    for _ in range(200):
        server.feed(framed(rng.choice([20, 21, 22, 23]), 1))
    assert server.state is DtlsState.CONNECTED

    # Before the ClientHello, nothing but a ClientHello reaches OpenSSL (which would treat a
    # stray alert or ChangeCipherSpec as fatal).
    fresh = DtlsServer(server_ctx, [client_cert.fingerprint])
    for _ in range(200):
        fresh.feed(framed(rng.choice([20, 21, 23]), 0))
    assert fresh.state is DtlsState.NEW
    assert fresh.malformed_datagrams == 200
    shuttle(fresh, Client(client_cert))
    assert fresh.state is DtlsState.CONNECTED

    # During the handshake a nonsense plaintext message may legitimately end the attempt, but
    # only through a clean FAILED state with a reason.
    for _ in range(50):
        midway = DtlsServer(server_ctx, [client_cert.fingerprint])
        midway.feed(Client(client_cert).step()[0])
        for _ in range(5):
            midway.feed(framed(rng.choice([20, 21, 22, 23]), 0))
        assert midway.state in (DtlsState.CONNECTING, DtlsState.FAILED)
        if midway.state is DtlsState.FAILED:
            assert midway.failure_reason


# -- after the handshake ---------------------------------------------------------------------


def test_client_close_notify_closes(server_ctx: SSL.Context, client_cert: DtlsCertificate) -> None:
    server, client = connected_pair(server_ctx, client_cert)
    client.ssl.shutdown()
    reply: list[bytes] = []
    for d in client.step():
        reply += server.feed(d)
    assert server.state is DtlsState.CLOSED
    assert reply  # our own close_notify
    assert server.next_timeout() is None
    assert server.feed(b"\x17\xfe\xfd" + bytes(10)) == []


def test_server_close_sends_close_notify(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    server, client = connected_pair(server_ctx, client_cert)
    out = server.close()
    assert server.state is DtlsState.CLOSED
    client.step(out)
    assert client.closed
    assert server.close() == []


def test_application_data_is_delivered_only_when_authenticated(
    server_ctx: SSL.Context, client_cert: DtlsCertificate
) -> None:
    received: list[bytes] = []
    server = DtlsServer(server_ctx, [client_cert.fingerprint], on_application_data=received.append)
    client = Client(client_cert)
    shuttle(server, client)
    client.ssl.send(b"sctp would go here")
    for d in client.step():
        server.feed(d)
    assert received == [b"sctp would go here"]

    unauthenticated = DtlsServer(server_ctx, on_application_data=received.append)
    client = Client(client_cert)
    shuttle(unauthenticated, client)
    client.ssl.send(b"too early")
    for d in client.step():
        unauthenticated.feed(d)
    assert received == [b"sctp would go here"]
    assert unauthenticated.application_bytes_dropped == len(b"too early")


# -- aiortc as the client --------------------------------------------------------------------


class _LoopbackIce:
    """Just enough of aiortc's RTCIceTransport for RTCDtlsTransport: a controlled agent."""

    role = "controlled"  # so aiortc takes the DTLS client role, as a browser does with us

    def __init__(self, server: DtlsServer) -> None:
        self.server = server
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def _send(self, data: bytes) -> None:
        for datagram in self.server.feed(data):
            self.inbox.put_nowait(datagram)

    async def _recv(self) -> bytes:
        return await self.inbox.get()


async def test_aiortc_dtls_transport_interoperates(
    server_ctx: SSL.Context, server_cert: Any
) -> None:
    rtcdtls = pytest.importorskip("aiortc.rtcdtlstransport")
    aiortc_cert = rtcdtls.RTCCertificate.generateCertificate()
    fingerprints = [
        Fingerprint.parse(f"{f.algorithm} {f.value}") for f in aiortc_cert.getFingerprints()
    ]
    server = DtlsServer(server_ctx, fingerprints)
    ice = _LoopbackIce(server)
    transport = rtcdtls.RTCDtlsTransport(cast(Any, ice), [aiortc_cert])
    remote = rtcdtls.RTCDtlsParameters(
        fingerprints=[rtcdtls.RTCDtlsFingerprint("sha-256", server_cert.fingerprint.value)]
    )
    await asyncio.wait_for(transport.start(remote), 10)
    try:
        assert transport.state == "connected"
        assert server.state is DtlsState.CONNECTED
        # aiortc offers AES_256_GCM first; the server's preference picks AES_128_GCM.
        assert server.srtp_profile == "SRTP_AEAD_AES_128_GCM"
        assert server.srtp_keys is not None
        sfu = SrtpSession(server.srtp_keys)
        rtp = struct.pack("!BBHII", 0x80, 111, 7, 960, 0xBEEF) + bytes(160)
        assert sfu.unprotect_rtp(transport._tx_srtp.protect(rtp)) == rtp
        protected = sfu.protect_rtp(rtp)
        assert protected is not None
        assert transport._rx_srtp.unprotect(protected) == rtp
    finally:
        await transport.stop()
    assert server.state is DtlsState.CLOSED
