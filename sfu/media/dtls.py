"""DTLS 1.2 server side of DTLS-SRTP (RFC 5763, RFC 5764) for one client transport.

The SFU is always the DTLS server: it answers `a=setup:active` to an offer's `actpass` (and
offers `actpass` itself, which browsers answer with `active`). Everything is synchronous and
works on memory BIOs, so the shared UDP socket's `datagram_received` can hand a DTLS datagram
to `DtlsServer.feed` and `sendto` whatever comes back.

Authentication is the fingerprint, not a CA: WebRTC certificates are self-signed, so OpenSSL
is told to accept any client certificate (but to insist on one), and once the handshake is
done the certificate's hash is compared with the `a=fingerprint` the client put in its SDP,
which arrived over the authenticated signalling channel.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hmac
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from sfu.media.srtp import EXPORTER_LABEL, PROFILES, PROFILES_BY_PREFERENCE, SrtpKeyingMaterial

# Handshake datagrams never exceed this (UDP payload, not counting IP/UDP headers). 1200 is
# what browsers assume for any path (it is also QUIC's floor): with IPv6, a TURN/UDP relay
# header and a VPN on the way it still fits a 1280-byte IPv6 minimum MTU.
DEFAULT_MTU: Final = 1200

# Ends a handshake the client started but never finished (a vanished browser tab, a peer
# stuck behind a firewall after ICE): OpenSSL alone would keep backing off for minutes.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 30.0

# Self-signed certificate lifetime. Peers do not check validity dates (the fingerprint is the
# trust anchor), but some tooling does, and a worker restarts far more often than yearly.
DEFAULT_CERTIFICATE_DAYS: Final = 365

# pyOpenSSL exports TLS version constants only; this is DTLS1_2_VERSION from <openssl/tls1.h>.
_DTLS1_2_VERSION: Final = 0xFEFD

# Forward-secret AEAD suites only. Only the ECDSA ones can be chosen with the generated P-256
# certificate; the RSA ones keep an operator-supplied RSA certificate usable.
CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)

# OpenSSL picks the first profile in *this* list that the client also offered, so this order
# is the server's preference (see sfu.media.srtp for why GCM leads).
SRTP_PROFILE_LIST: Final = ":".join(p.name for p in PROFILES_BY_PREFERENCE).encode()

# RFC 8122 hash function names as they appear in `a=fingerprint`.
_HASHES: Final[dict[str, Callable[[], hashes.HashAlgorithm]]] = {
    "sha-1": hashes.SHA1,
    "sha-224": hashes.SHA224,
    "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384,
    "sha-512": hashes.SHA512,
}
# When a peer lists several, only the strongest one it used is compared, so a weak entry
# (sha-1) can never be the one that lets a certificate through.
_HASH_STRENGTH: Final = {name: rank for rank, name in enumerate(_HASHES)}

# RFC 7983: a first byte in 20..63 means DTLS. A DTLS record header is 13 bytes: content type,
# version (major 0xFE for every DTLS version), epoch, 48-bit sequence number, length.
_RECORD_HEADER: Final = 13
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_READ_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """One `a=fingerprint` value: hash algorithm name and the upper-case, colon-separated hex."""

    algorithm: str
    value: str

    def __post_init__(self) -> None:
        algorithm = self.algorithm.lower()
        if algorithm not in _HASHES:
            raise ValueError(f"unsupported fingerprint hash {self.algorithm!r}")
        try:
            digest = bytes.fromhex(self.value.replace(":", ""))
        except ValueError:
            raise ValueError(f"fingerprint is not colon-separated hex: {self.value!r}") from None
        if len(digest) != _HASHES[algorithm]().digest_size:
            raise ValueError(f"{algorithm} fingerprint has the wrong length: {self.value!r}")
        # Normalised so that equal fingerprints compare equal however the SDP spelled them.
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "value", _format_digest(digest))

    @classmethod
    def parse(cls, text: str) -> Fingerprint:
        """Parse the value of an `a=fingerprint:` line, e.g. `sha-256 AB:CD:...`."""
        parts = text.split()
        if len(parts) != 2:
            raise ValueError(f"expected '<hash> <hex>' in fingerprint, got {text!r}")
        return cls(parts[0], parts[1])

    @classmethod
    def of(cls, certificate: x509.Certificate, algorithm: str = "sha-256") -> Fingerprint:
        algorithm = algorithm.lower()
        if algorithm not in _HASHES:
            raise ValueError(f"unsupported fingerprint hash {algorithm!r}")
        return cls(algorithm, _format_digest(certificate.fingerprint(_HASHES[algorithm]())))

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.value.replace(":", ""))

    def matches(self, certificate: x509.Certificate) -> bool:
        actual = certificate.fingerprint(_HASHES[self.algorithm]())
        return hmac.compare_digest(actual, self.digest)

    def __str__(self) -> str:
        return f"{self.algorithm} {self.value}"


def _format_digest(digest: bytes) -> str:
    return digest.hex(":").upper()


def fingerprints_match(certificate: x509.Certificate, expected: Iterable[Fingerprint]) -> bool:
    """Whether `certificate` matches one of the strongest-hash fingerprints in `expected`.

    Several fingerprints may legitimately be listed (several hashes of one certificate, or
    several candidate certificates), so any match of the strongest algorithm present is enough.
    """
    candidates = list(expected)
    if not candidates:
        return False
    strongest = max(_HASH_STRENGTH[f.algorithm] for f in candidates)
    return any(
        f.matches(certificate) for f in candidates if _HASH_STRENGTH[f.algorithm] == strongest
    )


# ECDSA is what browsers use and what the cipher list prefers; RSA is accepted for operators who
# bring their own certificate. Anything else (Ed25519, ML-DSA) has no DTLS 1.2 cipher suite here.
DtlsPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class DtlsCertificate:
    """The worker's DTLS identity: a certificate, its key and the fingerprint SDP advertises."""

    def __init__(self, certificate: x509.Certificate, private_key: DtlsPrivateKey) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.fingerprint = Fingerprint.of(certificate, "sha-256")

    @classmethod
    def generate(cls, *, days: int = DEFAULT_CERTIFICATE_DAYS) -> DtlsCertificate:
        """A fresh self-signed ECDSA P-256 certificate, as browsers generate for themselves."""
        key = ec.generate_private_key(ec.SECP256R1())
        # A random name, like a browser's, so the certificate says nothing about the server.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, secrets.token_hex(8))])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # Backdated a day so a peer with a slow clock does not see a not-yet-valid cert.
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def from_pem(
        cls, certificate_pem: bytes, key_pem: bytes, password: bytes | None = None
    ) -> DtlsCertificate:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(key_pem, password=password)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("DTLS certificate key must be ECDSA or RSA")
        if _spki(key.public_key()) != _spki(certificate.public_key()):
            raise ValueError("DTLS private key does not belong to the certificate")
        return cls(certificate, key)

    @classmethod
    def load(
        cls, certificate_path: str | Path, key_path: str | Path, password: bytes | None = None
    ) -> DtlsCertificate:
        return cls.from_pem(
            Path(certificate_path).read_bytes(), Path(key_path).read_bytes(), password
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _accept_any_certificate(
    connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    # Chain validation cannot succeed for a self-signed WebRTC certificate and would prove
    # nothing anyway; DtlsServer compares the fingerprint once the handshake is over.
    return True


def create_server_context(certificate: DtlsCertificate) -> SSL.Context:
    """One `SSL.Context` shared by every `DtlsServer` of a worker.

    pyOpenSSL forbids changing a context after a connection has used it, so everything is
    configured here, once.
    """
    return _context(certificate, SSL.DTLS_SERVER_METHOD)


def create_client_context(certificate: DtlsCertificate) -> SSL.Context:
    """The context of the DTLS client end of SFU-to-SFU relays (`DtlsServer(client=True)`):
    the same certificate, versions, ciphers and SRTP profiles as the server side."""
    return _context(certificate, SSL.DTLS_CLIENT_METHOD)


def _context(certificate: DtlsCertificate, method: int) -> SSL.Context:
    context = SSL.Context(method)
    # DTLS 1.2 only: RFC 8827 requires at least 1.2, and DTLS 1.3 (ACK-based retransmission,
    # different record headers) is not something this code or its tests have exercised.
    context.set_min_proto_version(_DTLS1_2_VERSION)
    context.set_max_proto_version(_DTLS1_2_VERSION)
    context.use_certificate(certificate.certificate)
    context.use_privatekey(certificate.private_key)
    context.check_privatekey()
    context.set_cipher_list(CIPHERS)
    context.set_tlsext_use_srtp(SRTP_PROFILE_LIST)
    # RFC 5763 section 5: the client MUST send a certificate, so a handshake without one fails
    # inside OpenSSL instead of producing keys nobody authenticated.
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
        _accept_any_certificate,
    )
    context.set_options(
        # With memory BIOs OpenSSL cannot ask the socket for a path MTU; left to itself it
        # falls back to a ~256-byte minimum and cuts the certificate into many fragments.
        # DtlsServer sets the MTU explicitly instead.
        SSL.OP_NO_QUERY_MTU
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        # Every transport does one fresh handshake: no resumption, so no tickets to send (they
        # would add a ~250-byte record to the final flight) and no cache to grow.
        | SSL.OP_NO_TICKET
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_COMPRESSION
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # No HelloVerifyRequest cookie exchange (no OP_COOKIE_EXCHANGE, no cookie callbacks). The
    # cookie exists to stop a spoofed source address from making the server send a large
    # flight, but the mux only passes DTLS from an address that has already completed an
    # ICE check signed with this transport's password, which is a stronger return-routability
    # proof; a cookie would only cost every join one more round trip.
    return context


class DtlsState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


def _split_records(data: bytes) -> list[bytes] | None:
    """The DTLS records in `data`, or None if it is not a whole number of well-formed records."""
    records = []
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset < _RECORD_HEADER or data[offset + 1] != 0xFE:
            return None
        (length,) = struct.unpack_from("!H", data, offset + 11)
        next_offset = offset + _RECORD_HEADER + length
        if next_offset > end:
            return None
        records.append(data[offset:next_offset])
        offset = next_offset
    return records


def _pack_datagrams(data: bytes, mtu: int) -> list[bytes]:
    # A memory BIO is a byte stream: it forgets where OpenSSL's datagrams ended. Split the
    # output back into records and pack whole records into datagrams of at most `mtu` bytes,
    # because a DTLS record must never straddle two datagrams.
    records = _split_records(data)
    if records is None:
        return [data]
    datagrams: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for record in records:
        if current and size + len(record) > mtu:
            datagrams.append(b"".join(current))
            current, size = [], 0
        current.append(record)
        size += len(record)
    if current:
        datagrams.append(b"".join(current))
    return datagrams


def _ssl_error_text(exc: Exception) -> str:
    # pyOpenSSL packs OpenSSL's error queue into args[0] as (library, function, reason).
    if exc.args and isinstance(exc.args[0], list):
        reasons = [str(entry[-1]) for entry in exc.args[0] if entry]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


@dataclass(eq=False)
class DtlsServer:
    """DTLS server endpoint of one client transport, or with `client=True` the client end of
    a relay to another media plane (`start` sends its ClientHello).

    `remote_fingerprints` may be empty at first: when the SFU makes the offer, the client's
    handshake can arrive before its answer does. The handshake then completes but the
    transport stays CONNECTING until `set_remote_fingerprints` supplies the answer's value.
    """

    context: SSL.Context
    remote_fingerprints: Sequence[Fingerprint] = ()
    mtu: int = DEFAULT_MTU
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    clock: Callable[[], float] = time.monotonic
    # Application data (DTLS-carried SCTP, i.e. data channels), which nothing consumes yet.
    on_application_data: Callable[[bytes], None] | None = None
    client: bool = False

    state: DtlsState = field(default=DtlsState.NEW, init=False)
    failure_reason: str | None = field(default=None, init=False)
    # Set only once the fingerprint has matched: keys from an unauthenticated peer are useless.
    srtp_keys: SrtpKeyingMaterial | None = field(default=None, init=False, repr=False)
    peer_certificate: x509.Certificate | None = field(default=None, init=False, repr=False)
    # Plain counters for the metrics collector.
    datagrams_received: int = field(default=0, init=False)
    malformed_datagrams: int = field(default=0, init=False)
    dropped_datagrams: int = field(default=0, init=False)
    retransmissions: int = field(default=0, init=False)
    application_bytes_dropped: int = field(default=0, init=False)

    _connection: SSL.Connection | None = field(default=None, init=False, repr=False)
    _handshake_done: bool = field(default=False, init=False, repr=False)
    _deadline: float | None = field(default=None, init=False, repr=False)
    _pending_keys: SrtpKeyingMaterial | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.remote_fingerprints = tuple(self.remote_fingerprints)

    @property
    def _ssl(self) -> SSL.Connection:
        # Made on first use, which is the client's ClientHello (`feed` lets nothing else
        # through before it): OpenSSL's state is about 33 kB, which an offer whose client
        # never connects (abandoned, or one of a flood) should not cost.
        connection = self._connection
        if connection is None:
            connection = self._connection = SSL.Connection(self.context, None)
            if self.client:
                connection.set_connect_state()
            else:
                connection.set_accept_state()
            # The MTU is per connection in OpenSSL; OP_NO_QUERY_MTU on the context keeps it.
            connection.set_ciphertext_mtu(self.mtu)
        return connection

    @property
    def srtp_profile(self) -> str | None:
        """The negotiated protection profile's name, e.g. `SRTP_AEAD_AES_128_GCM`."""
        return self.srtp_keys.profile.name if self.srtp_keys else None

    def set_remote_fingerprints(self, fingerprints: Sequence[Fingerprint]) -> list[bytes]:
        """Supply (or replace) the client's SDP fingerprints; returns datagrams to send."""
        self.remote_fingerprints = tuple(fingerprints)
        if self._handshake_done and self.state is DtlsState.CONNECTING:
            return self._authenticate()
        return []

    # -- packet path -------------------------------------------------------------------------

    def start(self) -> list[bytes]:
        """Client end only: begin the handshake; returns the ClientHello to send."""
        if not self.client or self.state is not DtlsState.NEW:
            return []
        return self._handshake_step()

    def feed(self, datagram: bytes) -> list[bytes]:
        """Process one datagram from the client; returns the datagrams to send back."""
        self.datagrams_received += 1
        if self.state is DtlsState.FAILED or self.state is DtlsState.CLOSED:
            self.dropped_datagrams += 1
            return []
        # OpenSSL would discard malformed records silently too, but checking the framing here
        # is cheap, lets garbage be counted, and keeps a truncated tail from sitting in the
        # memory BIO where it would be glued to the front of the next datagram.
        if not datagram or not 20 <= datagram[0] <= 63 or _split_records(datagram) is None:
            self.malformed_datagrams += 1
            return []
        # OpenSSL treats a stray plaintext alert, ChangeCipherSpec or handshake message as fatal,
        # so one forged datagram would kill a transport before its client ever spoke. Until a
        # handshake starts, only a ClientHello (handshake record, message type 1) gets through.
        if self.state is DtlsState.NEW and (
            self.client
            or datagram[0] != _HANDSHAKE
            or len(datagram) <= _RECORD_HEADER
            or datagram[_RECORD_HEADER] != _CLIENT_HELLO
        ):
            self.malformed_datagrams += 1
            return []
        try:
            self._ssl.bio_write(datagram)
        except Exception as exc:
            return self._fail(f"internal error: {_ssl_error_text(exc)}")
        if not self._handshake_done:
            return self._handshake_step()
        return self._read_application_data()

    def _handshake_step(self) -> list[bytes]:
        """Start the handshake's clock if it has not started, let OpenSSL take one step, and
        return what it wants sent; the step that completes it authenticates the peer."""
        if self.state is DtlsState.NEW:
            self.state = DtlsState.CONNECTING
            self._deadline = self.clock() + self.handshake_timeout
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            return self._drain()
        except Exception as exc:
            return self._fail(f"handshake failed: {_ssl_error_text(exc)}")
        self._handshake_done = True
        out = self._drain()
        out += self._on_handshake_complete()
        if self.state is not DtlsState.CONNECTED:
            return out
        # The peer's final flight may carry application data behind it.
        return out + self._read_application_data()

    def _read_application_data(self) -> list[bytes]:
        # recv() is also what lets OpenSSL answer a retransmitted client Finished (our final
        # flight was lost) by resending that flight, and notice close_notify.
        while True:
            try:
                data = self._ssl.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.state = DtlsState.CLOSED
                self._deadline = None
                return self._shutdown()
            except Exception as exc:
                return self._fail(f"connection error: {_ssl_error_text(exc)}")
            if self.state is not DtlsState.CONNECTED:
                # Data before the fingerprint is checked comes from an unauthenticated peer.
                self.application_bytes_dropped += len(data)
            elif self.on_application_data is not None:
                self.on_application_data(data)
            else:
                self.application_bytes_dropped += len(data)
        return self._drain()

    def _on_handshake_complete(self) -> list[bytes]:
        profile_name = self._ssl.get_selected_srtp_profile().decode("ascii", "replace")
        profile = PROFILES.get(profile_name)
        if profile is None:
            # RFC 5764 lets a handshake succeed without use_srtp; WebRTC cannot use it.
            return self._fail("no SRTP profile negotiated")
        certificate = self._ssl.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return self._fail("peer sent no certificate")
        self.peer_certificate = certificate
        try:
            material = self._ssl.export_keying_material(EXPORTER_LABEL, profile.exporter_length)
        except Exception as exc:
            return self._fail(f"key export failed: {_ssl_error_text(exc)}")
        self._pending_keys = SrtpKeyingMaterial.from_exported(profile, material)
        if not self.remote_fingerprints:
            return []
        return self._authenticate()

    def _authenticate(self) -> list[bytes]:
        assert self.peer_certificate is not None
        if not fingerprints_match(self.peer_certificate, self.remote_fingerprints):
            return self._fail("fingerprint mismatch")
        self.state = DtlsState.CONNECTED
        self.srtp_keys = self._pending_keys
        self._deadline = None
        return []

    # -- timers ------------------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        """When `handle_timeout` should next run, on `clock`'s time scale, or None."""
        if self.state is not DtlsState.CONNECTING:
            return None
        deadline = self._deadline
        # OpenSSL keeps the retransmission timer (1 s, doubling up to 60 s) on its own wall
        # clock and exposes only the time left, so it is translated to our clock here.
        remaining = self._ssl.DTLSv1_get_timeout()
        if remaining is not None:
            retransmit_at = self.clock() + remaining
            if deadline is None or retransmit_at < deadline:
                return retransmit_at
        return deadline

    def handle_timeout(self, now: float) -> list[bytes]:
        """Retransmit the last flight if OpenSSL's timer expired; give up after the deadline."""
        if self.state is not DtlsState.CONNECTING:
            return []
        if self._deadline is not None and now >= self._deadline:
            if self._handshake_done:
                return self._fail("timed out waiting for the remote fingerprint")
            return self._fail("handshake timed out")
        try:
            # A no-op when OpenSSL's own clock says the timer has not expired yet (the caller
            # woke early, or the clocks drifted); next_timeout() then returns a new time.
            fired = self._ssl.DTLSv1_handle_timeout()
        except Exception as exc:
            # OpenSSL gives up by itself after too many retransmissions.
            return self._fail(f"handshake failed: {_ssl_error_text(exc)}")
        if fired:
            self.retransmissions += 1
        return self._drain()

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> list[bytes]:
        """Close the association; returns the close_notify to send, if any."""
        if self.state is DtlsState.CLOSED or self.state is DtlsState.FAILED:
            return []
        was_connected = self._handshake_done
        self.state = DtlsState.CLOSED
        self._deadline = None
        return self._shutdown() if was_connected else []

    def _shutdown(self) -> list[bytes]:
        # The peer may already be gone; there is nothing useful to report if this fails.
        with contextlib.suppress(Exception):
            self._ssl.shutdown()
        return self._drain()

    def _fail(self, reason: str) -> list[bytes]:
        self.state = DtlsState.FAILED
        self.failure_reason = reason
        self._deadline = None
        self.srtp_keys = self._pending_keys = None
        # Whatever OpenSSL queued (usually a fatal alert) tells the client to stop waiting.
        out = self._drain()
        if self._handshake_done and not out:
            out = self._shutdown()
        return out

    def _drain(self) -> list[bytes]:
        chunks = []
        while True:
            try:
                chunks.append(self._ssl.bio_read(_READ_SIZE))
            except SSL.WantReadError:
                break
            except Exception:
                break
        if not chunks:
            return []
        return _pack_datagrams(b"".join(chunks), self.mtu)
