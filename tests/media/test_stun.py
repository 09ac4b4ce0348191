"""STUN codec: RFC 5769 vectors, round trips, aioice interop both ways, and fuzzing."""

from __future__ import annotations

import os
import struct

import pytest
from aioice import stun as aioice_stun

from sfu.media import stun
from sfu.media.stun import StunError

# RFC 5769 section 2: sample messages and the password that signs them.
RFC5769_PWD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010"
    "5354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC5769_RESPONSE_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)


def _request(
    tid: bytes = b"\x01" * 12,
    key: bytes | None = b"secret-password-123456",
    *,
    username: str = "srv1:cli1",
    controlling: int | None = 7,
    controlled: int | None = None,
    use_candidate: bool = False,
    fingerprint: bool = True,
) -> bytes:
    attrs = [
        (stun.ATTR_USERNAME, username.encode()),
        (stun.ATTR_PRIORITY, struct.pack("!I", 0x6E0001FF)),
    ]
    if controlling is not None:
        attrs.append((stun.ATTR_ICE_CONTROLLING, struct.pack("!Q", controlling)))
    if controlled is not None:
        attrs.append((stun.ATTR_ICE_CONTROLLED, struct.pack("!Q", controlled)))
    if use_candidate:
        attrs.append((stun.ATTR_USE_CANDIDATE, b""))
    return stun.encode(stun.BINDING_REQUEST, tid, attrs, integrity_key=key, fingerprint=fingerprint)


# --- RFC 5769 known answers -------------------------------------------------------------


def test_rfc5769_request() -> None:
    assert len(RFC5769_REQUEST) == 108
    msg = stun.parse(RFC5769_REQUEST)
    assert msg.msg_type == stun.BINDING_REQUEST
    assert msg.method == stun.METHOD_BINDING
    assert msg.message_class == stun.CLASS_REQUEST
    assert msg.transaction_id == RFC5769_TID
    assert msg.get(stun.ATTR_SOFTWARE) == b"STUN test client"
    assert msg.username == "evtj:h6vY"
    assert msg.priority == 0x6E0001FF
    assert msg.ice_controlled == 0x932FF9B151263B36
    assert msg.ice_controlling is None
    assert not msg.use_candidate
    assert msg.check_integrity(RFC5769_PWD)
    assert not msg.check_integrity(RFC5769_PWD + b"x")
    assert msg.check_fingerprint()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (RFC5769_RESPONSE_V4, ("192.0.2.1", 32853)),
        (RFC5769_RESPONSE_V6, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses(data: bytes, expected: tuple[str, int]) -> None:
    msg = stun.parse(data)
    assert msg.msg_type == stun.BINDING_SUCCESS
    assert msg.message_class == stun.CLASS_SUCCESS
    assert msg.xor_mapped_address == expected
    assert msg.check_integrity(RFC5769_PWD)
    assert msg.check_fingerprint()
    # Our encoder reproduces the address bytes exactly.
    assert stun.encode_xor_address(expected, RFC5769_TID) == msg.get(stun.ATTR_XOR_MAPPED_ADDRESS)


def test_rfc5769_tampering_detected() -> None:
    tampered = bytearray(RFC5769_REQUEST)
    tampered[60] ^= 0x01  # inside the ICE-CONTROLLED tiebreaker
    msg = stun.parse(bytes(tampered))
    assert not msg.check_integrity(RFC5769_PWD)
    assert not msg.check_fingerprint()


# --- round trips ---------------------------------------------------------------------------


def test_request_round_trip() -> None:
    tid = os.urandom(12)
    data = _request(tid, b"k" * 22, controlling=2**64 - 1, use_candidate=True)
    msg = stun.parse(data)
    assert msg.transaction_id == tid
    assert msg.username == "srv1:cli1"
    assert msg.priority == 0x6E0001FF
    assert msg.ice_controlling == 2**64 - 1
    assert msg.use_candidate
    assert msg.has_integrity
    assert msg.has_fingerprint
    assert msg.check_integrity(b"k" * 22)
    assert not msg.check_integrity(b"k" * 21)
    assert msg.check_fingerprint()
    assert msg.attribute_types() == [
        stun.ATTR_USERNAME,
        stun.ATTR_PRIORITY,
        stun.ATTR_ICE_CONTROLLING,
        stun.ATTR_USE_CANDIDATE,
    ]


def test_without_integrity_or_fingerprint() -> None:
    msg = stun.parse(_request(key=None, fingerprint=False))
    assert not msg.has_integrity
    assert not msg.has_fingerprint
    assert not msg.check_integrity(b"anything")
    assert not msg.check_fingerprint()


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (("203.0.113.7", 5000), ("203.0.113.7", 5000)),
        (("2001:db8::1", 65535), ("2001:db8::1", 65535)),
        (("fe80::1%eth0", 1, 0, 2), ("fe80::1", 1)),
        # Dual-stack sockets report IPv4 peers as mapped addresses; answer in IPv4.
        (("::ffff:198.51.100.9", 40000), ("198.51.100.9", 40000)),
    ],
)
def test_success_response_round_trip(addr: tuple[str, int], expected: tuple[str, int]) -> None:
    tid = os.urandom(12)
    data = stun.build_binding_success(tid, addr, b"pwd")
    msg = stun.parse(data)
    assert msg.msg_type == stun.BINDING_SUCCESS
    assert msg.transaction_id == tid
    assert msg.xor_mapped_address == expected
    assert msg.check_integrity(b"pwd")
    assert msg.check_fingerprint()


@pytest.mark.parametrize("code", [400, 401, 420, 487, 500])
def test_error_response_round_trip(code: int) -> None:
    tid = os.urandom(12)
    msg = stun.parse(stun.build_binding_error(tid, code, integrity_key=b"pwd"))
    assert msg.msg_type == stun.BINDING_ERROR
    assert msg.message_class == stun.CLASS_ERROR
    assert msg.error_code == (code, stun.ERROR_REASONS[code])
    assert msg.check_integrity(b"pwd")
    unsigned = stun.parse(stun.build_binding_error(tid, code, "why not"))
    assert unsigned.error_code == (code, "why not")
    assert not unsigned.has_integrity
    assert unsigned.check_fingerprint()


def test_encoder_rejects_bad_input() -> None:
    with pytest.raises(StunError):
        stun.build_binding_success(b"short", ("1.2.3.4", 1), b"k")
    with pytest.raises(StunError):
        stun.build_binding_success(b"x" * 12, ("not-an-ip", 1), b"k")
    with pytest.raises(StunError):
        stun.build_binding_success(b"x" * 12, ("1.2.3.4", 70000), b"k")
    with pytest.raises(StunError):
        stun.build_binding_error(b"x" * 12, 200)
    with pytest.raises(StunError):
        stun.build_binding_error(b"x" * 12, 400, "x" * 128)
    with pytest.raises(StunError):
        stun.encode(stun.BINDING_REQUEST, b"x" * 12, [(1, b"x" * 70000)])


def test_duplicates_and_attributes_after_integrity() -> None:
    tid = b"\x02" * 12
    signed = stun.encode(
        stun.BINDING_REQUEST,
        tid,
        [(stun.ATTR_USERNAME, b"first"), (stun.ATTR_USERNAME, b"second")],
        integrity_key=b"k",
        fingerprint=False,
    )
    # Append an unauthenticated PRIORITY after MESSAGE-INTEGRITY, fixing the length field.
    extra = struct.pack("!HHI", stun.ATTR_PRIORITY, 4, 99)
    data = bytearray(signed + extra)
    struct.pack_into("!H", data, 2, len(data) - 20)
    msg = stun.parse(bytes(data))
    assert msg.username == "first"
    assert msg.priority is None  # ignored: not covered by MESSAGE-INTEGRITY
    assert msg.check_integrity(b"k")


def test_looks_like_stun() -> None:
    assert stun.looks_like_stun(RFC5769_REQUEST)
    assert not stun.looks_like_stun(RFC5769_REQUEST[:19])
    assert not stun.looks_like_stun(b"\x80" + RFC5769_REQUEST[1:])  # RTP
    assert not stun.looks_like_stun(b"\x16" + RFC5769_REQUEST[1:])  # DTLS


# --- aioice interop ------------------------------------------------------------------------


@pytest.mark.parametrize("addr", [("192.0.2.33", 4242), ("2001:db8::42", 7882)])
def test_aioice_reads_our_success_response(addr: tuple[str, int]) -> None:
    tid = os.urandom(12)
    data = stun.build_binding_success(tid, addr, b"server-password")
    # aioice raises if the FINGERPRINT does not match.
    msg = aioice_stun.parse_message(data)
    assert msg.message_method == aioice_stun.Method.BINDING
    assert msg.message_class == aioice_stun.Class.RESPONSE
    assert msg.transaction_id == tid
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == addr
    assert msg.check_message_integrity(b"server-password")
    assert not msg.check_message_integrity(b"other-password")


@pytest.mark.parametrize("code", [400, 401, 487])
def test_aioice_reads_our_error_response(code: int) -> None:
    tid = os.urandom(12)
    data = stun.build_binding_error(tid, code, integrity_key=b"server-password")
    msg = aioice_stun.parse_message(data)
    assert msg.message_class == aioice_stun.Class.ERROR
    assert msg.attributes["ERROR-CODE"] == (code, stun.ERROR_REASONS[code])
    assert msg.check_message_integrity(b"server-password")


def test_aioice_reads_our_request() -> None:
    data = _request(b"\x03" * 12, b"pw", controlling=12345, use_candidate=True)
    msg = aioice_stun.parse_message(data)
    assert msg.attributes["USERNAME"] == "srv1:cli1"
    assert msg.attributes["ICE-CONTROLLING"] == 12345
    assert "USE-CANDIDATE" in msg.attributes
    assert msg.check_message_integrity(b"pw")


@pytest.mark.parametrize("nominate", [False, True])
def test_we_read_aioice_request(nominate: bool) -> None:
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["USERNAME"] = "abcd:wxyz"
    request.attributes["PRIORITY"] = 1853824767
    request.attributes["ICE-CONTROLLING"] = 0xDEADBEEFCAFEF00D
    if nominate:
        request.attributes["USE-CANDIDATE"] = None
    request.add_message_integrity(b"the-password-of-the-server")
    msg = stun.parse(bytes(request))
    assert msg.transaction_id == request.transaction_id
    assert msg.username == "abcd:wxyz"
    assert msg.priority == 1853824767
    assert msg.ice_controlling == 0xDEADBEEFCAFEF00D
    assert msg.ice_controlled is None
    assert msg.use_candidate is nominate
    assert msg.check_integrity(b"the-password-of-the-server")
    assert not msg.check_integrity(b"the-password-of-the-serveR")
    assert msg.check_fingerprint()


def test_we_read_aioice_responses() -> None:
    tid = os.urandom(12)
    response = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.RESPONSE,
        transaction_id=tid,
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = ("2001:db8::9", 1234)
    response.add_message_integrity(b"pw")
    msg = stun.parse(bytes(response))
    assert msg.xor_mapped_address == ("2001:db8::9", 1234)
    assert msg.check_integrity(b"pw")
    error = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.ERROR,
        transaction_id=tid,
    )
    error.attributes["ERROR-CODE"] = (487, "Role Conflict")
    error.add_fingerprint()
    assert stun.parse(bytes(error)).error_code == (487, "Role Conflict")


# --- malformed input -----------------------------------------------------------------------


def _with_length(data: bytes, length: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("!H", out, 2, length)
    return bytes(out)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        RFC5769_REQUEST[:19],
        b"\xc0" + RFC5769_REQUEST[1:],  # top bits set
        RFC5769_REQUEST[:4] + b"\x00\x00\x00\x00" + RFC5769_REQUEST[8:],  # cookie
        RFC5769_REQUEST + b"\x00\x00\x00\x00",  # datagram longer than the length field
        _with_length(RFC5769_REQUEST, 0x57),  # not a multiple of 4
        _with_length(RFC5769_REQUEST[:24], 4),  # attribute header only, value overruns
        # USERNAME claims 200 bytes inside a 12-byte body.
        _with_length(
            b"\x00\x01\x00\x00" + RFC5769_REQUEST[4:20] + b"\x00\x06\x00\xc8" + bytes(8), 12
        ),
        # PRIORITY with 2 bytes.
        stun.encode(stun.BINDING_REQUEST, b"x" * 12, [(stun.ATTR_PRIORITY, b"\x00\x01")]),
        # Something after FINGERPRINT.
        _with_length(
            stun.encode(stun.BINDING_REQUEST, b"x" * 12) + b"\x00\x06\x00\x00",
            12,
        ),
    ],
)
def test_malformed_raises_stun_error(data: bytes) -> None:
    with pytest.raises(StunError):
        stun.parse(data)


def test_malformed_values_raise_stun_error_from_accessors() -> None:
    tid = b"x" * 12
    bad_user = stun.parse(stun.encode(1, tid, [(stun.ATTR_USERNAME, b"\xff\xfe")]))
    with pytest.raises(StunError):
        _ = bad_user.username
    bad_addr = stun.parse(stun.encode(0x101, tid, [(stun.ATTR_XOR_MAPPED_ADDRESS, b"\x00\x03")]))
    with pytest.raises(StunError):
        _ = bad_addr.xor_mapped_address
    bad_code = stun.parse(stun.encode(0x111, tid, [(stun.ATTR_ERROR_CODE, b"\x00\x00\x09\x00")]))
    with pytest.raises(StunError):
        _ = bad_code.error_code


def test_every_truncation_of_valid_messages() -> None:
    for seed in (RFC5769_REQUEST, RFC5769_RESPONSE_V6, _request(use_candidate=True)):
        for cut in range(len(seed)):
            with pytest.raises(StunError):
                stun.parse(seed[:cut])
