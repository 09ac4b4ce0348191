"""SFrame (RFC 9605) end-to-end frame protection for Blindfold clients.

The on-wire layout, KID allocation and counter rules are specified in ``docs/e2ee.md``;
the browser client implements the same format, so any change here is a format change.

A protected frame is ``clear_prefix || sframe_header || AEAD(plaintext) || tag``, where
the clear prefix is the first ``clear_prefix_len`` bytes of the encoded frame, left readable
because Chrome's VP8 packetizer parses them, and authenticated as the RFC's ``metadata``.

This module depends only on ``cryptography``: importing it must never load aiortc or a codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "AES_128_GCM_SHA256_128",
    "AES_256_GCM_SHA512_128",
    "CIPHER_SUITES",
    "KID_GENERATION_BITS",
    "MAX_COUNTER",
    "MAX_KID",
    "OPUS_CLEAR_PREFIX_LEN",
    "VP8_DELTA_CLEAR_PREFIX_LEN",
    "VP8_KEYFRAME_CLEAR_PREFIX_LEN",
    "CipherSuite",
    "Receiver",
    "SFrameAuthError",
    "SFrameError",
    "SFrameHeader",
    "SFrameUnknownKidError",
    "Sender",
    "clear_prefix_len_for",
    "compose_kid",
    "decode_header",
    "derive_key_salt",
    "derive_labels",
    "derive_secret",
    "encode_header",
    "parse_envelope",
    "vp8_clear_prefix_len",
]

MAX_KID: Final = 2**64 - 1
MAX_COUNTER: Final = 2**64 - 1

# The header carries values 0-7 inside the config byte; larger ones follow it in 1-8 bytes.
_INLINE_LIMIT: Final = 8
_X_FLAG: Final = 0x80
_Y_FLAG: Final = 0x08

# Chrome's VP8 depacketizer reads the 3-byte frame tag, and on keyframes also the start code
# and dimensions (7 more bytes, RFC 6386 section 9.1), so those must survive encryption.
VP8_KEYFRAME_CLEAR_PREFIX_LEN: Final = 10
VP8_DELTA_CLEAR_PREFIX_LEN: Final = 3
OPUS_CLEAR_PREFIX_LEN: Final = 0

# Low KID bits hold the key generation, so a rotation changes the KID and receivers can keep
# the previous key for frames still in flight (docs/e2ee.md, "KID allocation").
KID_GENERATION_BITS: Final = 4

_KEY_LABEL: Final = b"SFrame 1.0 Secret key "
_SALT_LABEL: Final = b"SFrame 1.0 Secret salt "

# A base key shorter than this is far more likely a bug (a truncated or empty secret) than a
# deliberate choice; the RFC's own vectors use 16 bytes.
_MIN_BASE_KEY_LEN: Final = 16


class SFrameError(ValueError):
    """A frame is not a well-formed SFrame envelope (or cannot be opened); drop it."""


class SFrameUnknownKidError(SFrameError):
    """The header names a KID this receiver holds no key for."""

    def __init__(self, kid: int) -> None:
        super().__init__(f"no key for KID {kid:#x}")
        self.kid = kid


class SFrameAuthError(SFrameError):
    """AEAD authentication failed: the frame was altered, or sealed under another key."""


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """An RFC 9605 cipher suite (section 4.5); only the AES-GCM ones are implemented."""

    suite_id: int
    name: str
    hash_name: str
    nk: int
    nn: int
    nt: int

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        if self.hash_name == "sha256":
            return hashes.SHA256()
        if self.hash_name == "sha512":
            return hashes.SHA512()
        raise ValueError(f"unsupported hash {self.hash_name!r}")


AES_128_GCM_SHA256_128: Final = CipherSuite(0x0004, "AES_128_GCM_SHA256_128", "sha256", 16, 12, 16)
AES_256_GCM_SHA512_128: Final = CipherSuite(0x0005, "AES_256_GCM_SHA512_128", "sha512", 32, 12, 16)
CIPHER_SUITES: Final[dict[int, CipherSuite]] = {
    s.suite_id: s for s in (AES_128_GCM_SHA256_128, AES_256_GCM_SHA512_128)
}


@dataclass(frozen=True, slots=True)
class SFrameHeader:
    """The decoded KID and CTR of an SFrame header."""

    kid: int
    ctr: int

    def encode(self) -> bytes:
        return encode_header(self.kid, self.ctr)


def _check_uint64(name: str, value: int) -> None:
    if not 0 <= value <= MAX_KID:
        raise ValueError(f"{name} must be an unsigned 64-bit integer, got {value}")


def _minimal_be(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def encode_header(kid: int, ctr: int) -> bytes:
    """Encode an SFrame header (RFC 9605 section 4.3), always in its minimal form."""
    _check_uint64("kid", kid)
    _check_uint64("ctr", ctr)
    config = 0
    tail = b""
    if kid < _INLINE_LIMIT:
        config |= kid << 4
    else:
        kid_bytes = _minimal_be(kid)
        config |= _X_FLAG | (len(kid_bytes) - 1) << 4
        tail += kid_bytes
    if ctr < _INLINE_LIMIT:
        config |= ctr
    else:
        ctr_bytes = _minimal_be(ctr)
        config |= _Y_FLAG | (len(ctr_bytes) - 1)
        tail += ctr_bytes
    return bytes((config,)) + tail


def _read_extended(data: bytes, pos: int, length: int, what: str) -> tuple[int, int]:
    end = pos + length
    if end > len(data):
        raise SFrameError(f"SFrame header truncated in {what}")
    raw = data[pos:end]
    value = int.from_bytes(raw, "big")
    # The RFC requires the minimal encoding; accepting others would give one (KID, CTR) several
    # header byte strings, and the header is part of the AAD the browser client must reproduce.
    if raw[0] == 0 or value < _INLINE_LIMIT:
        raise SFrameError(f"SFrame header {what} is not minimally encoded")
    return value, end


def decode_header(data: bytes, offset: int = 0) -> tuple[SFrameHeader, int]:
    """Decode the SFrame header starting at ``offset``.

    Returns the header and the offset just past it. Raises :class:`SFrameError` (never
    another exception type) on empty, truncated or non-minimal input.
    """
    if offset < 0 or offset >= len(data):
        raise SFrameError("no SFrame header: frame ends before it")
    config = data[offset]
    pos = offset + 1
    if config & _X_FLAG:
        kid, pos = _read_extended(data, pos, ((config >> 4) & 0x07) + 1, "KID")
    else:
        kid = (config >> 4) & 0x07
    if config & _Y_FLAG:
        ctr, pos = _read_extended(data, pos, (config & 0x07) + 1, "CTR")
    else:
        ctr = config & 0x07
    return SFrameHeader(kid, ctr), pos


def parse_envelope(
    data: bytes, clear_prefix_len: int, suite: CipherSuite = AES_128_GCM_SHA256_128
) -> tuple[SFrameHeader, int]:
    """Check the key-free shape of a protected frame and return its header.

    Returns the header and the offset where the ciphertext starts. This is everything that can
    be learnt without a key; docs/e2ee.md explains why it is weak evidence on its own.
    """
    if clear_prefix_len < 0:
        raise ValueError("clear_prefix_len must not be negative")
    if len(data) <= clear_prefix_len:
        raise SFrameError("frame too short for its clear prefix and an SFrame header")
    header, body = decode_header(data, clear_prefix_len)
    if len(data) - body < suite.nt:
        raise SFrameError("frame too short for the authentication tag")
    return header, body


def compose_kid(sender_slot: int, generation: int) -> int:
    """Build a KID from a participant's room slot and its key generation (docs/e2ee.md)."""
    if sender_slot < 0 or generation < 0:
        raise ValueError("sender_slot and generation must not be negative")
    kid = (sender_slot << KID_GENERATION_BITS) | (generation % (1 << KID_GENERATION_BITS))
    _check_uint64("kid", kid)
    return kid


def derive_secret(base_key: bytes, suite: CipherSuite = AES_128_GCM_SHA256_128) -> bytes:
    """``sframe_secret = HKDF-Extract("", base_key)`` (RFC 9605 section 4.4.2)."""
    # HMAC pads its key with zeros, so the empty salt here equals RFC 5869's default salt.
    mac = hmac.HMAC(b"", suite.hash_algorithm())
    mac.update(base_key)
    return mac.finalize()


def derive_labels(kid: int, suite: CipherSuite = AES_128_GCM_SHA256_128) -> tuple[bytes, bytes]:
    """The key and salt HKDF-Expand labels: fixed text, 8-byte KID, 2-byte suite id."""
    _check_uint64("kid", kid)
    suffix = kid.to_bytes(8, "big") + suite.suite_id.to_bytes(2, "big")
    return _KEY_LABEL + suffix, _SALT_LABEL + suffix


def derive_key_salt(
    kid: int, base_key: bytes, suite: CipherSuite = AES_128_GCM_SHA256_128
) -> tuple[bytes, bytes]:
    """Derive ``(sframe_key, sframe_salt)`` for one KID (RFC 9605 section 4.4.2)."""
    secret = derive_secret(base_key, suite)
    key_label, salt_label = derive_labels(kid, suite)
    key = HKDFExpand(suite.hash_algorithm(), suite.nk, key_label).derive(secret)
    salt = HKDFExpand(suite.hash_algorithm(), suite.nn, salt_label).derive(secret)
    return key, salt


class _KeyContext:
    """The derived key of one KID, ready to seal or open frames."""

    __slots__ = ("_aead", "_salt", "kid", "suite")

    def __init__(self, kid: int, base_key: bytes, suite: CipherSuite) -> None:
        if suite.suite_id not in CIPHER_SUITES:
            raise ValueError(f"cipher suite {suite.name} is not implemented")
        if len(base_key) < _MIN_BASE_KEY_LEN:
            raise ValueError(f"base_key must be at least {_MIN_BASE_KEY_LEN} bytes")
        key, salt = derive_key_salt(kid, base_key, suite)
        self.kid = kid
        self.suite = suite
        self._aead = AESGCM(key)
        self._salt = int.from_bytes(salt, "big")

    def nonce(self, ctr: int) -> bytes:
        return (self._salt ^ ctr).to_bytes(self.suite.nn, "big")

    def seal(self, ctr: int, metadata: bytes, plaintext: bytes) -> bytes:
        header = encode_header(self.kid, ctr)
        return header + self._aead.encrypt(self.nonce(ctr), plaintext, header + metadata)

    def open(self, ctr: int, header: bytes, metadata: bytes, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(self.nonce(ctr), ciphertext, header + metadata)
        except InvalidTag:
            raise SFrameAuthError(f"authentication failed for KID {self.kid:#x}") from None


class Sender:
    """Protects one participant's outgoing frames under one KID and base key.

    Every track the participant protects with this key (audio, video, each simulcast layer)
    must go through this one object: the counter is what keeps nonces unique, so two counters
    for one KID would reuse nonces and break AES-GCM.
    """

    __slots__ = ("_counter", "_key")

    def __init__(
        self,
        kid: int,
        base_key: bytes,
        suite: CipherSuite = AES_128_GCM_SHA256_128,
        *,
        counter: int = 0,
    ) -> None:
        """``counter`` is the next CTR to use; set it only to resume the same key's stream."""
        _check_uint64("kid", kid)
        _check_uint64("counter", counter)
        self._key = _KeyContext(kid, base_key, suite)
        self._counter = counter

    def __repr__(self) -> str:
        return f"Sender(kid={self.kid:#x}, suite={self.suite.name}, counter={self._counter})"

    @property
    def kid(self) -> int:
        return self._key.kid

    @property
    def suite(self) -> CipherSuite:
        return self._key.suite

    @property
    def counter(self) -> int:
        """The CTR the next frame will carry."""
        return self._counter

    def _next_counter(self) -> int:
        ctr = self._counter
        if ctr > MAX_COUNTER:
            raise OverflowError("SFrame counter exhausted: rotate to a new key")
        # Advance before sealing so that no failure path can hand the same CTR out twice.
        self._counter = ctr + 1
        return ctr

    def encrypt(self, metadata: bytes, plaintext: bytes) -> bytes:
        """RFC 9605 ``encrypt``: returns ``header || ciphertext``; metadata is only AAD."""
        return self._key.seal(self._next_counter(), metadata, plaintext)

    def protect(self, frame: bytes, clear_prefix_len: int = 0) -> bytes:
        """Protect one encoded frame, keeping its first ``clear_prefix_len`` bytes readable.

        Empty frames are returned unchanged: there is nothing to hide, and spending a counter
        on them would gain nothing.
        """
        if not frame:
            return b""
        if not 0 <= clear_prefix_len <= len(frame):
            # Clamping would desynchronise a receiver that derives the length from the frame.
            raise ValueError(
                f"clear_prefix_len {clear_prefix_len} does not fit a {len(frame)}-byte frame"
            )
        prefix = frame[:clear_prefix_len]
        return prefix + self.encrypt(prefix, frame[clear_prefix_len:])


class Receiver:
    """Opens frames from any sender whose key it holds, looked up by the header's KID.

    Keys held here are used only to decrypt (RFC 9605 section 4.4.1). A frame that fails
    authentication raises :class:`SFrameAuthError` and must be dropped, never decoded.
    """

    __slots__ = ("_keys", "suite")

    def __init__(self, suite: CipherSuite = AES_128_GCM_SHA256_128) -> None:
        self.suite = suite
        self._keys: dict[int, _KeyContext] = {}

    def __repr__(self) -> str:
        kids = ", ".join(f"{kid:#x}" for kid in sorted(self._keys))
        return f"Receiver(suite={self.suite.name}, kids=[{kids}])"

    def add_key(self, kid: int, base_key: bytes) -> None:
        _check_uint64("kid", kid)
        self._keys[kid] = _KeyContext(kid, base_key, self.suite)

    def remove_key(self, kid: int) -> None:
        self._keys.pop(kid, None)

    def has_key(self, kid: int) -> bool:
        return kid in self._keys

    def _open(self, header_bytes: bytes, header: SFrameHeader, metadata: bytes, ct: bytes) -> bytes:
        key = self._keys.get(header.kid)
        if key is None:
            raise SFrameUnknownKidError(header.kid)
        return key.open(header.ctr, header_bytes, metadata, ct)

    def decrypt(self, metadata: bytes, sframe_ciphertext: bytes) -> bytes:
        """RFC 9605 ``decrypt``: ``sframe_ciphertext`` starts with the SFrame header."""
        header, body = parse_envelope(sframe_ciphertext, 0, self.suite)
        return self._open(sframe_ciphertext[:body], header, metadata, sframe_ciphertext[body:])

    def unprotect(self, data: bytes, clear_prefix_len: int = 0) -> bytes:
        """Reverse :meth:`Sender.protect`: returns the original encoded frame.

        Raises :class:`SFrameError` for a malformed envelope, :class:`SFrameUnknownKidError`
        for a KID without a key and :class:`SFrameAuthError` when authentication fails.
        """
        if not data:
            return b""
        header, body = parse_envelope(data, clear_prefix_len, self.suite)
        prefix = data[:clear_prefix_len]
        plaintext = self._open(data[clear_prefix_len:body], header, prefix, data[body:])
        return prefix + plaintext


def vp8_clear_prefix_len(frame: bytes) -> int:
    """Clear bytes of a VP8 frame: 10 on keyframes, 3 on delta frames, 0 if empty.

    Works on both the encoded frame and its protected form, since the byte it reads (the
    inverted keyframe bit P, RFC 6386 section 9.1) is itself inside the clear prefix.
    """
    if not frame:
        return 0
    if frame[0] & 0x01:
        return VP8_DELTA_CLEAR_PREFIX_LEN
    return VP8_KEYFRAME_CLEAR_PREFIX_LEN


def clear_prefix_len_for(codec: str, frame: bytes) -> int:
    """The clear prefix length for ``codec`` (an SDP codec name such as ``"VP8"``)."""
    name = codec.lower().removeprefix("video/").removeprefix("audio/")
    if name == "vp8":
        return vp8_clear_prefix_len(frame)
    if name == "opus":
        return OPUS_CLEAR_PREFIX_LEN
    raise ValueError(f"no E2EE clear-prefix rule for codec {codec!r} (see docs/e2ee.md)")
