"""STUN codec (RFC 5389 / RFC 8489) for the ICE-lite responder on the media socket.

Only what a connectivity-check responder needs: parse any message defensively, verify
MESSAGE-INTEGRITY (short-term credentials) and FINGERPRINT, read the ICE attributes of
RFC 8445 section 16.1, and build Binding success and error responses.

Parsing records attribute offsets instead of decoding every value, so a check that fails
authentication costs one small object and one HMAC. Every malformed input raises `StunError`
and nothing else, because the caller sits in `datagram_received`, where any other exception
would be logged by the event loop for each hostile packet.
"""

from __future__ import annotations

import hmac
import socket
import struct
import zlib
from collections.abc import Iterable

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
FINGERPRINT_XOR = 0x5354554E

# Message types are method and class bits interleaved (RFC 5389 section 6); these are the
# only ones ICE uses.
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

CLASS_REQUEST = 0
CLASS_INDICATION = 1
CLASS_SUCCESS = 2
CLASS_ERROR = 3

METHOD_BINDING = 0x001

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PRIORITY = 0x0024
ATTR_USE_CANDIDATE = 0x0025
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A

ERROR_REASONS = {
    400: "Bad Request",
    401: "Unauthenticated",
    420: "Unknown Attribute",
    487: "Role Conflict",
    500: "Server Error",
}

_INTEGRITY_SIZE = 20
_FINGERPRINT_SIZE = 4
# Rejecting a wrong-sized ICE attribute at parse time means the accessors below can unpack
# without re-checking, and cannot fail on a message that parsed.
_FIXED_SIZES = {
    ATTR_PRIORITY: 4,
    ATTR_USE_CANDIDATE: 0,
    ATTR_ICE_CONTROLLED: 8,
    ATTR_ICE_CONTROLLING: 8,
}

_HEADER = struct.Struct("!HHI")
_HEADER_FULL = struct.Struct("!HHI12s")
_TLV = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_XOR_V4 = struct.Struct("!BBHI")
_XOR_V6_HEAD = struct.Struct("!BBH")
_ERROR_HEAD = struct.Struct("!HBB")

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_COOKIE_BYTES = _U32.pack(MAGIC_COOKIE)
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class StunError(ValueError):
    """The bytes are not a well-formed STUN message, or a value cannot be encoded."""


def looks_like_stun(data: bytes) -> bool:
    """Cheap demux test: first byte 0-3 (RFC 7983) and the magic cookie in place."""
    return len(data) >= HEADER_SIZE and data[0] < 4 and data[4:8] == _COOKIE_BYTES


def _padded(length: int) -> int:
    return (length + 3) & ~3


class StunMessage:
    """A parsed message: the original bytes plus where each attribute's value starts."""

    __slots__ = ("_attrs", "_fingerprint_at", "_integrity_at", "data", "msg_type")

    def __init__(
        self,
        data: bytes,
        msg_type: int,
        attrs: dict[int, int],
        integrity_at: int,
        fingerprint_at: int,
    ) -> None:
        self.data = data
        self.msg_type = msg_type
        # Attribute type -> offset of its value; the length sits in the two bytes before it.
        self._attrs = attrs
        # Offsets of the MESSAGE-INTEGRITY / FINGERPRINT attribute headers, -1 when absent.
        self._integrity_at = integrity_at
        self._fingerprint_at = fingerprint_at

    def __repr__(self) -> str:
        names = ", ".join(f"0x{t:04x}" for t in self._attrs)
        return (
            f"StunMessage(type=0x{self.msg_type:04x}, tid={self.transaction_id.hex()}, "
            f"attrs=[{names}], integrity={self.has_integrity}, "
            f"fingerprint={self.has_fingerprint})"
        )

    @property
    def transaction_id(self) -> bytes:
        return self.data[8:20]

    @property
    def method(self) -> int:
        t = self.msg_type
        return (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80)

    @property
    def message_class(self) -> int:
        t = self.msg_type
        return ((t >> 4) & 0x1) | ((t >> 7) & 0x2)

    @property
    def has_integrity(self) -> bool:
        return self._integrity_at >= 0

    @property
    def has_fingerprint(self) -> bool:
        return self._fingerprint_at >= 0

    def has(self, attr_type: int) -> bool:
        return attr_type in self._attrs

    def attribute_types(self) -> list[int]:
        """Attribute types in wire order (first occurrence only), without MI/FINGERPRINT."""
        return list(self._attrs)

    def get(self, attr_type: int) -> bytes | None:
        """Raw value of the first occurrence of `attr_type`, or None."""
        at = self._attrs.get(attr_type)
        if at is None:
            return None
        (length,) = _U16.unpack_from(self.data, at - 2)
        return self.data[at : at + length]

    @property
    def username(self) -> str | None:
        raw = self.get(ATTR_USERNAME)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StunError("USERNAME is not UTF-8") from None

    @property
    def priority(self) -> int | None:
        at = self._attrs.get(ATTR_PRIORITY)
        return None if at is None else int(_U32.unpack_from(self.data, at)[0])

    @property
    def use_candidate(self) -> bool:
        return ATTR_USE_CANDIDATE in self._attrs

    @property
    def ice_controlling(self) -> int | None:
        """The peer's tiebreaker if it claims the controlling role."""
        at = self._attrs.get(ATTR_ICE_CONTROLLING)
        return None if at is None else int(_U64.unpack_from(self.data, at)[0])

    @property
    def ice_controlled(self) -> int | None:
        """The peer's tiebreaker if it claims the controlled role."""
        at = self._attrs.get(ATTR_ICE_CONTROLLED)
        return None if at is None else int(_U64.unpack_from(self.data, at)[0])

    @property
    def xor_mapped_address(self) -> tuple[str, int] | None:
        raw = self.get(ATTR_XOR_MAPPED_ADDRESS)
        return None if raw is None else decode_xor_address(raw, self.transaction_id)

    @property
    def error_code(self) -> tuple[int, str] | None:
        raw = self.get(ATTR_ERROR_CODE)
        if raw is None:
            return None
        if len(raw) < 4:
            raise StunError("ERROR-CODE shorter than 4 bytes")
        _, klass, number = _ERROR_HEAD.unpack_from(raw)
        klass &= 0x07
        if not 3 <= klass <= 6 or number > 99:
            raise StunError("ERROR-CODE out of range")
        try:
            reason = raw[4:].decode("utf-8")
        except UnicodeDecodeError:
            raise StunError("ERROR-CODE reason is not UTF-8") from None
        return klass * 100 + number, reason

    def check_integrity(self, key: bytes) -> bool:
        """Verify MESSAGE-INTEGRITY with `key` (for ICE: the receiver's password bytes).

        The HMAC covers everything before the attribute, with the header length rewritten as if
        MESSAGE-INTEGRITY were the last attribute (RFC 5389 section 15.4), so that a FINGERPRINT
        added afterwards does not change it.
        """
        at = self._integrity_at
        if at < 0:
            return False
        covered = bytearray(self.data[:at])
        _U16.pack_into(covered, 2, at - HEADER_SIZE + 4 + _INTEGRITY_SIZE)
        expected = hmac.digest(key, covered, "sha1")
        return hmac.compare_digest(expected, self.data[at + 4 : at + 4 + _INTEGRITY_SIZE])

    def check_fingerprint(self) -> bool:
        """Verify FINGERPRINT (RFC 5389 section 15.5); False when absent."""
        at = self._fingerprint_at
        if at < 0:
            return False
        # parse() only accepts FINGERPRINT as the last attribute, so the header's length field
        # already has the value the CRC was computed with and the prefix can be hashed in place.
        crc = zlib.crc32(memoryview(self.data)[:at]) ^ FINGERPRINT_XOR
        return hmac.compare_digest(_U32.pack(crc), self.data[at + 4 : at + 8])


def parse(data: bytes) -> StunMessage:
    """Parse one STUN message; raise `StunError` (only) if it is malformed.

    Attributes after MESSAGE-INTEGRITY other than FINGERPRINT are skipped, as RFC 5389
    section 15.4 requires, because nothing authenticates them. Only the first occurrence of a
    repeated attribute is kept (section 15).
    """
    size = len(data)
    if size < HEADER_SIZE:
        raise StunError("shorter than a STUN header")
    msg_type, length, cookie = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise StunError("first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("bad magic cookie")
    if length & 3:
        raise StunError("length is not a multiple of 4")
    if length + HEADER_SIZE != size:
        raise StunError("length field does not match the datagram size")

    attrs: dict[int, int] = {}
    integrity_at = -1
    fingerprint_at = -1
    pos = HEADER_SIZE
    while pos < size:
        if fingerprint_at >= 0:
            raise StunError("attribute after FINGERPRINT")
        # pos and size are both multiples of 4 here, so a whole TLV header is always present.
        attr_type, attr_len = _TLV.unpack_from(data, pos)
        value_at = pos + 4
        next_pos = value_at + ((attr_len + 3) & ~3)
        if next_pos > size:
            raise StunError("attribute overruns the message")
        if attr_type == ATTR_FINGERPRINT:
            if attr_len != _FINGERPRINT_SIZE:
                raise StunError("FINGERPRINT has the wrong size")
            fingerprint_at = pos
        elif integrity_at >= 0:
            pass
        elif attr_type == ATTR_MESSAGE_INTEGRITY:
            if attr_len != _INTEGRITY_SIZE:
                raise StunError("MESSAGE-INTEGRITY has the wrong size")
            integrity_at = pos
        else:
            expected = _FIXED_SIZES.get(attr_type)
            if expected is not None and attr_len != expected:
                raise StunError(f"attribute 0x{attr_type:04x} has the wrong size")
            if attr_type not in attrs:
                attrs[attr_type] = value_at
        pos = next_pos
    return StunMessage(data, msg_type, attrs, integrity_at, fingerprint_at)


def _address_bytes(host: str) -> bytes:
    # Link-local IPv6 hosts arrive as "fe80::1%eth0"; the scope is local to us.
    host = host.partition("%")[0]
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host)
            # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the peer itself sent
            # IPv4, so it expects its reflexive address back as IPv4.
            return packed[12:] if packed[:12] == _V4_MAPPED_PREFIX else packed
        return socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        raise StunError(f"not an IP address: {host!r}") from None


def encode_xor_address(addr: tuple[str, int], transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value for `addr` (extra IPv6 tuple fields are ignored)."""
    host, port = addr[0], addr[1]
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port out of range: {port}")
    packed = _address_bytes(host)
    xport = port ^ (MAGIC_COOKIE >> 16)
    if len(packed) == 4:
        return _XOR_V4.pack(0, _FAMILY_IPV4, xport, int.from_bytes(packed) ^ MAGIC_COOKIE)
    mask = int.from_bytes(_COOKIE_BYTES + transaction_id)
    xaddr = (int.from_bytes(packed) ^ mask).to_bytes(16)
    return _XOR_V6_HEAD.pack(0, _FAMILY_IPV6, xport) + xaddr


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("XOR-MAPPED-ADDRESS too short")
    family = value[1]
    port = _U16.unpack_from(value, 2)[0] ^ (MAGIC_COOKIE >> 16)
    if family == _FAMILY_IPV4 and len(value) == 8:
        raw = (_U32.unpack_from(value, 4)[0] ^ MAGIC_COOKIE).to_bytes(4)
        return socket.inet_ntop(socket.AF_INET, raw), port
    if family == _FAMILY_IPV6 and len(value) == 20:
        mask = int.from_bytes(_COOKIE_BYTES + transaction_id)
        raw = (int.from_bytes(value[4:20]) ^ mask).to_bytes(16)
        return socket.inet_ntop(socket.AF_INET6, raw), port
    raise StunError("XOR-MAPPED-ADDRESS has a bad family or size")


def encode_error_code(code: int, reason: str | None = None) -> bytes:
    if not 300 <= code <= 699:
        raise StunError(f"error code out of range: {code}")
    text = ERROR_REASONS.get(code, "") if reason is None else reason
    if len(text) > 127:  # RFC 8489 section 14.8: fewer than 128 characters
        raise StunError("error reason too long")
    return _ERROR_HEAD.pack(0, code // 100, code % 100) + text.encode("utf-8")


def encode(
    msg_type: int,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Serialise a message; MESSAGE-INTEGRITY and FINGERPRINT are appended last, in that order.

    Padding is zero bytes. The caller supplies raw attribute values (see the encode_* helpers).
    """
    if len(transaction_id) != 12:
        raise StunError("transaction id must be 12 bytes")
    if msg_type & 0xC000 or not 0 <= msg_type <= 0xFFFF:
        raise StunError(f"bad message type: {msg_type}")
    attrs = list(attributes)
    body = sum(4 + _padded(len(value)) for _, value in attrs)
    total = (
        HEADER_SIZE
        + body
        + (4 + _INTEGRITY_SIZE if integrity_key is not None else 0)
        + (4 + _FINGERPRINT_SIZE if fingerprint else 0)
    )
    if total - HEADER_SIZE > 0xFFFF:
        raise StunError("message too large")
    buf = bytearray(total)
    _HEADER_FULL.pack_into(buf, 0, msg_type, body, MAGIC_COOKIE, transaction_id)
    pos = HEADER_SIZE
    for attr_type, value in attrs:
        _TLV.pack_into(buf, pos, attr_type, len(value))
        buf[pos + 4 : pos + 4 + len(value)] = value
        pos += 4 + _padded(len(value))
    if integrity_key is not None:
        _U16.pack_into(buf, 2, pos - HEADER_SIZE + 4 + _INTEGRITY_SIZE)
        mac = hmac.digest(integrity_key, memoryview(buf)[:pos], "sha1")
        _TLV.pack_into(buf, pos, ATTR_MESSAGE_INTEGRITY, _INTEGRITY_SIZE)
        buf[pos + 4 : pos + 4 + _INTEGRITY_SIZE] = mac
        pos += 4 + _INTEGRITY_SIZE
    if fingerprint:
        _U16.pack_into(buf, 2, pos - HEADER_SIZE + 4 + _FINGERPRINT_SIZE)
        crc = zlib.crc32(memoryview(buf)[:pos]) ^ FINGERPRINT_XOR
        _TLV.pack_into(buf, pos, ATTR_FINGERPRINT, _FINGERPRINT_SIZE)
        _U32.pack_into(buf, pos + 4, crc)
    return bytes(buf)


def build_binding_success(
    transaction_id: bytes, addr: tuple[str, int], integrity_key: bytes
) -> bytes:
    """Binding success response telling the peer its reflexive address, signed and fingerprinted."""
    return encode(
        BINDING_SUCCESS,
        transaction_id,
        ((ATTR_XOR_MAPPED_ADDRESS, encode_xor_address(addr, transaction_id)),),
        integrity_key=integrity_key,
    )


def build_binding_error(
    transaction_id: bytes,
    code: int,
    reason: str | None = None,
    integrity_key: bytes | None = None,
) -> bytes:
    """Binding error response.

    Sign it (pass `integrity_key`) whenever the request itself authenticated: RFC 8489 section
    9.1.4 wants responses to authenticated requests signed, and a client such as aioice discards
    an unsigned error for a signed request and keeps retransmitting. Only a 400/401 caused by
    failed authentication goes unsigned.
    """
    return encode(
        BINDING_ERROR,
        transaction_id,
        ((ATTR_ERROR_CODE, encode_error_code(code, reason)),),
        integrity_key=integrity_key,
    )
