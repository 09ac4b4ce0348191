"""SRTP/SRTCP for one client transport, keyed from the DTLS-SRTP exporter (RFC 5764).

A thin layer over pylibsrtp whose only jobs are to pick the right key for each direction, set
the libsrtp policy knobs an SFU needs, and turn libsrtp's exceptions into `None` plus a plain
integer counter: a forged, replayed or mangled packet is routine traffic for a public UDP port,
not an error, and the counters are read by the metrics collector rather than incremented
through prometheus on the hot path.

pylibsrtp copies every packet through a 1500-byte buffer and accepts `bytes` only (not
`bytearray` or `memoryview`), so callers that rewrite headers in a bytearray convert once before
`protect_rtp`. Packets that do not fit (more than 1356 bytes to protect) are counted as
failures, never raised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import pylibsrtp

try:  # The protect fast path calls libsrtp through pylibsrtp's own cffi binding.
    from pylibsrtp._binding import ffi as _ffi
    from pylibsrtp._binding import lib as _lib
except ImportError:  # pragma: no cover - a pylibsrtp without it keeps the public path
    _ffi = _lib = None

# RFC 5764 section 4.2: the exporter label for DTLS-SRTP keying material.
EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"

# libsrtp accepts replay windows of 64 to 0x7fff packets. The outbound window bounds how far
# back a retransmission may reach: libsrtp checks its replay database on *protect* too, so a
# NACKed packet older than the window cannot be re-protected at all ("index too old"). 1024
# covers the ~500-packet video ring buffer with room to spare. Inbound, the same size lets a
# publisher's in-stream retransmission (clients without RTX) arrive a full RTT late at video
# packet rates instead of being dropped as a replay; the bitmap costs 128 bytes per stream.
REPLAY_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class SrtpProfile:
    """A DTLS-SRTP protection profile: its RFC/OpenSSL name and its key and salt sizes."""

    name: str
    key_length: int
    salt_length: int
    libsrtp_profile: int

    @property
    def exporter_length(self) -> int:
        # Both directions' master key and salt come out of one export (RFC 5764 section 4.2).
        return 2 * (self.key_length + self.salt_length)


AES128_CM_SHA1_80 = SrtpProfile(
    "SRTP_AES128_CM_SHA1_80", 16, 14, pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
)
AEAD_AES_128_GCM = SrtpProfile(
    "SRTP_AEAD_AES_128_GCM", 16, 12, pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM
)
AEAD_AES_256_GCM = SrtpProfile(
    "SRTP_AEAD_AES_256_GCM", 32, 12, pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM
)

# Server preference, most preferred first. GCM leads: one AEAD pass is cheaper than
# AES-CTR plus HMAC-SHA1 and its 16-byte tag is stronger than the 80-bit one. AES_128_CM_SHA1_80
# stays because RFC 8827 makes it mandatory to implement, so every WebRTC client has it.
# SHA1_32 is left out on purpose: its 32-bit tag is too weak for video (RFC 5764 allows it).
PROFILES_BY_PREFERENCE: tuple[SrtpProfile, ...] = (
    AEAD_AES_128_GCM,
    AEAD_AES_256_GCM,
    AES128_CM_SHA1_80,
)
PROFILES: dict[str, SrtpProfile] = {p.name: p for p in PROFILES_BY_PREFERENCE}


@dataclass(frozen=True, slots=True)
class SrtpKeyingMaterial:
    """Both directions' master keys and salts, as one DTLS-SRTP handshake exported them."""

    profile: SrtpProfile
    client_write_key: bytes = field(repr=False)
    server_write_key: bytes = field(repr=False)
    client_write_salt: bytes = field(repr=False)
    server_write_salt: bytes = field(repr=False)

    @classmethod
    def from_exported(cls, profile: SrtpProfile, material: bytes) -> SrtpKeyingMaterial:
        """Split exporter output laid out as RFC 5764 section 4.2 prescribes."""
        if len(material) != profile.exporter_length:
            raise ValueError(
                f"{profile.name} needs {profile.exporter_length} bytes of keying material, "
                f"got {len(material)}"
            )
        k, s = profile.key_length, profile.salt_length
        return cls(
            profile=profile,
            client_write_key=material[0:k],
            server_write_key=material[k : 2 * k],
            client_write_salt=material[2 * k : 2 * k + s],
            server_write_salt=material[2 * k + s : 2 * k + 2 * s],
        )


def _policy(profile: SrtpProfile, key: bytes, salt: bytes, *, outbound: bool) -> pylibsrtp.Policy:
    policy = pylibsrtp.Policy(
        key=key + salt,
        # Wildcard SSRCs: a transport carries streams whose SSRCs the SDP may not list (RTX,
        # simulcast layers announced only by rid, SSRCs the SFU picks for down-tracks), and
        # libsrtp creates each stream's context on first use.
        ssrc_type=(
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        ),
        srtp_profile=profile.libsrtp_profile,
    )
    policy.window_size = REPLAY_WINDOW
    if outbound:
        # libsrtp refuses to protect an (SSRC, sequence number) it has protected before unless
        # this is set, and answering a NACK for a subscriber without RTX means resending the
        # very same SSRC/seq. This is safe only while the resent packet is byte-identical to
        # the first: same index and key give the same keystream/GCM nonce, and two *different*
        # packets under one nonce would leak the XOR of their payloads and, for GCM, the
        # authentication key. Retransmissions with changed header extensions must go out as
        # RTX (new SSRC and sequence number) instead. libwebrtc sets the same flag.
        policy.allow_repeat_tx = True
    return policy


class SrtpSession:
    """Protect what we send and unprotect what we receive on one DTLS-SRTP transport.

    `role` is our DTLS role: the SFU is always the DTLS server, so it decrypts with the
    client's write key and encrypts with its own. `"client"` exists for tests and for a future
    relay that connects out to another node.
    """

    __slots__ = (
        "_inbound",
        "_inbound_ssrcs",
        "_outbound",
        "_tx_buffer",
        "_tx_cdata",
        "_tx_context",
        "_tx_len",
        "profile",
        "protect_failures",
        "rtcp_auth_failures",
        "rtcp_malformed",
        "rtcp_replay_failures",
        "rtp_auth_failures",
        "rtp_malformed",
        "rtp_replay_failures",
    )

    def __init__(
        self, keys: SrtpKeyingMaterial, role: Literal["server", "client"] = "server"
    ) -> None:
        profile = keys.profile
        if role == "server":
            rx = (keys.client_write_key, keys.client_write_salt)
            tx = (keys.server_write_key, keys.server_write_salt)
        else:
            rx = (keys.server_write_key, keys.server_write_salt)
            tx = (keys.client_write_key, keys.client_write_salt)
        self.profile = profile
        # Two sessions, not one with two streams: a wildcard inbound and a wildcard outbound
        # policy cannot share a libsrtp session (it holds a single wildcard template).
        self._inbound = pylibsrtp.Session(_policy(profile, *rx, outbound=False))
        self._outbound = pylibsrtp.Session(_policy(profile, *tx, outbound=True))
        # SSRCs whose inbound context libsrtp has made (it makes one per authenticated SSRC,
        # from the wildcard template), oldest first; see `note_inbound`.
        self._inbound_ssrcs: dict[int, None] = {}
        self.rtp_auth_failures = 0
        self.rtp_replay_failures = 0
        self.rtp_malformed = 0
        self.rtcp_auth_failures = 0
        self.rtcp_replay_failures = 0
        self.rtcp_malformed = 0
        self.protect_failures = 0
        # Per packet and subscriber, pylibsrtp's protect() allocates a length cell and checks
        # types in Python (~2 µs of a ~10 µs budget). The fast path reuses one cell and the
        # session's own buffer, through internals of the pinned pylibsrtp version; a test
        # checks it produces exactly what the public path does.
        # cffi objects: typed Any, as pylibsrtp ships no stubs for its binding.
        self._tx_context: Any = None
        self._tx_cdata: Any = None
        self._tx_buffer: Any = None
        self._tx_len: Any = None
        if _ffi is not None and _fast_path_ok(self._outbound):
            self._tx_context = self._outbound._srtp[0]
            self._tx_cdata = self._outbound._cdata
            self._tx_buffer = self._outbound._buffer
            self._tx_len = _ffi.new("int *")

    def note_inbound(self, ssrc: int) -> None:
        """Record that an authenticated packet made libsrtp keep a context for `ssrc`.

        libsrtp never drops an inbound stream by itself, so a client that switches SSRCs
        (each one authentic: it holds the keys) would grow the session by a few hundred bytes
        per SSRC for as long as it lasts. Past MAX_INBOUND_STREAMS the oldest is dropped; if
        that SSRC sends again, libsrtp makes a new context for it (with a fresh replay window)."""
        known = self._inbound_ssrcs
        if ssrc in known:
            return
        known[ssrc] = None
        if len(known) > MAX_INBOUND_STREAMS:
            self.forget_inbound(next(iter(known)))

    def forget_inbound(self, ssrc: int) -> None:
        """Drop libsrtp's context for an inbound SSRC the transport no longer routes."""
        self._inbound_ssrcs.pop(ssrc, None)
        with contextlib.suppress(pylibsrtp.Error):
            self._inbound.remove_stream(ssrc)

    def native_contexts(self) -> tuple[int, int]:
        """Addresses of the inbound and outbound libsrtp contexts, for the native core. It
        borrows them: this object must outlive its use of them (the core holds a reference),
        and both paths then share one replay window and rollover counter per stream."""
        from sfu.media.fastpath import context_address

        return context_address(self._inbound), context_address(self._outbound)

    @property
    def inbound_streams(self) -> int:
        return len(self._inbound_ssrcs)

    def unprotect_rtp(self, packet: bytes) -> bytes | None:
        try:
            return self._inbound.unprotect(packet)
        except pylibsrtp.Error as exc:
            kind = _classify(exc)
            if kind == "auth":
                self.rtp_auth_failures += 1
            elif kind == "replay":
                self.rtp_replay_failures += 1
            else:
                self.rtp_malformed += 1
        except (ValueError, TypeError):
            self.rtp_malformed += 1
        return None

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._inbound.unprotect_rtcp(packet)
        except pylibsrtp.Error as exc:
            kind = _classify(exc)
            if kind == "auth":
                self.rtcp_auth_failures += 1
            elif kind == "replay":
                self.rtcp_replay_failures += 1
            else:
                self.rtcp_malformed += 1
        except (ValueError, TypeError):
            self.rtcp_malformed += 1
        return None

    def protect_rtp(self, packet: bytes) -> bytes | None:
        length_cell = self._tx_len
        if length_cell is not None:
            size = len(packet)
            if size > MAX_PROTECT_SIZE:
                self.protect_failures += 1
                return None
            buffer = self._tx_buffer
            buffer[0:size] = packet
            length_cell[0] = size
            if _lib.srtp_protect(self._tx_context, self._tx_cdata, length_cell):
                self.protect_failures += 1
                return None
            protected: bytes = buffer[0 : length_cell[0]]
            return protected
        try:
            return self._outbound.protect(packet)
        except (pylibsrtp.Error, ValueError, TypeError):
            # Too old to re-protect, too long for pylibsrtp's buffer, or not a parsable RTP
            # header: our own bug or a stale retransmission, either way not worth an exception
            # in datagram_received.
            self.protect_failures += 1
            return None

    def protect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._outbound.protect_rtcp(packet)
        except (pylibsrtp.Error, ValueError, TypeError):
            self.protect_failures += 1
            return None


# Inbound SSRCs kept per transport: a publisher sends at most a few per track (media, RTX,
# simulcast layers) and MAX tracks per participant is small; 64 leaves room for restarts.
MAX_INBOUND_STREAMS = 64

# pylibsrtp's buffer is 1500 bytes and protect may add up to SRTP_MAX_TRAILER_LEN (144).
MAX_PROTECT_SIZE = 1500 - 144


def _fast_path_ok(session: pylibsrtp.Session) -> bool:
    """Whether this pylibsrtp has the internals the fast path uses (pinned in pyproject)."""
    return all(hasattr(session, name) for name in ("_srtp", "_cdata", "_buffer")) and hasattr(
        _lib, "srtp_protect"
    )


def _classify(exc: pylibsrtp.Error) -> Literal["auth", "replay", "other"]:
    # pylibsrtp exposes libsrtp's status only as the message text of its one exception class.
    message = str(exc)
    if message.startswith("authentication"):
        return "auth"
    if message.startswith("replay"):
        return "replay"
    return "other"
