"""Tests for the SFrame (RFC 9605) frame format shared by the Python and browser clients."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sfu.client import sframe as sf

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).with_name("sframe_vectors.json")).read_text(encoding="utf-8")
)
HEADER_VECTORS: list[dict[str, str]] = VECTORS["header"]
SFRAME_VECTORS: list[dict[str, str]] = VECTORS["sframe"]

BASE_KEY = bytes(range(16))
OTHER_KEY = bytes(range(16, 32))

# A VP8 keyframe starts with a 3-byte frame tag whose bit 0 is 0, then the start code
# 9d 01 2a and 14-bit width/height (640x480 here); a delta frame's tag has bit 0 set.
VP8_KEYFRAME = bytes.fromhex("5003009d012a8002e001") + b"keyframe payload"
VP8_DELTA = bytes.fromhex("b10100") + b"delta payload"
OPUS_FRAME = bytes.fromhex("fc") + b"opus"

# Blindfold-format examples (not from the RFC): produced by this implementation and pinned
# here so that the browser client can check byte-for-byte agreement. KID = compose_kid(1, 0),
# base key 00..0f, counters 0, 1, 2 in this order.
FORMAT_EXAMPLES = [
    (
        VP8_KEYFRAME,
        10,
        "5003009d012a8002e0018010f89dea327fea7c13507734a6993576e3212c29c9ded8cd125abf07208262a7bb",
    ),
    (
        VP8_DELTA,
        3,
        "b1010081106e841d619f242f32d83e00ec32a4f16d7319adbb54b226150772c4d40d",
    ),
    (OPUS_FRAME, 0, "8210126a5e435a0156c643ecfd5553597b2f558fbb95d7"),
]


def _hex_int(value: str) -> int:
    return int(value, 16)


def _suite(vector: dict[str, str]) -> sf.CipherSuite:
    return sf.CIPHER_SUITES[_hex_int(vector["cipher_suite"])]


def _pair(
    kid: int = 0x10, suite: sf.CipherSuite = sf.AES_128_GCM_SHA256_128
) -> tuple[sf.Sender, sf.Receiver]:
    receiver = sf.Receiver(suite)
    receiver.add_key(kid, BASE_KEY)
    return sf.Sender(kid, BASE_KEY, suite), receiver


# --- RFC 9605 Appendix C vectors -------------------------------------------------------------


def test_vector_file_is_complete() -> None:
    assert len(HEADER_VECTORS) == 289
    assert {v["cipher_suite"] for v in SFRAME_VECTORS} == {"0x0004", "0x0005"}


def test_sizes_agree_with_the_shared_limits() -> None:
    """The same file's "limits" pin the browser client and the server's envelope check to
    these values too (tests/js/sframe.test.mjs, tests/engine/test_sframe_vectors.py)."""
    limits = VECTORS["limits"]
    assert sf.vp8_clear_prefix_len(VP8_KEYFRAME) == sf.VP8_KEYFRAME_CLEAR_PREFIX_LEN
    assert limits["vp8_keyframe_clear_prefix_len"] == sf.VP8_KEYFRAME_CLEAR_PREFIX_LEN
    assert sf.vp8_clear_prefix_len(VP8_DELTA) == sf.VP8_DELTA_CLEAR_PREFIX_LEN
    assert limits["vp8_delta_clear_prefix_len"] == sf.VP8_DELTA_CLEAR_PREFIX_LEN
    assert sf.clear_prefix_len_for("opus", OPUS_FRAME) == limits["opus_clear_prefix_len"]
    assert len(sf.encode_header(sf.MAX_KID, sf.MAX_COUNTER)) == limits["max_header_len"]
    assert {suite.nt for suite in sf.CIPHER_SUITES.values()} == {limits["aead_tag_len"]}
    assert limits["kid_generation_bits"] == sf.KID_GENERATION_BITS


@pytest.mark.parametrize("vector", HEADER_VECTORS, ids=lambda v: f"{v['kid']}-{v['ctr']}")
def test_header_vector(vector: dict[str, str]) -> None:
    kid, ctr = _hex_int(vector["kid"]), _hex_int(vector["ctr"])
    encoded = bytes.fromhex(vector["header"])
    assert sf.encode_header(kid, ctr) == encoded
    header, end = sf.decode_header(encoded)
    assert header == sf.SFrameHeader(kid, ctr)
    assert end == len(encoded)
    # Trailing ciphertext must not change what the header decodes to.
    assert sf.decode_header(encoded + b"\xff" * 20) == (header, end)


@pytest.mark.parametrize("vector", SFRAME_VECTORS, ids=lambda v: v["cipher_suite"])
def test_key_derivation_vector(vector: dict[str, str]) -> None:
    suite, kid = _suite(vector), _hex_int(vector["kid"])
    base_key = bytes.fromhex(vector["base_key"])
    assert sf.derive_secret(base_key, suite).hex() == vector["sframe_secret"]
    key_label, salt_label = sf.derive_labels(kid, suite)
    assert key_label.hex() == vector["sframe_key_label"]
    assert salt_label.hex() == vector["sframe_salt_label"]
    key, salt = sf.derive_key_salt(kid, base_key, suite)
    assert key.hex() == vector["sframe_key"]
    assert salt.hex() == vector["sframe_salt"]
    context = sf._KeyContext(kid, base_key, suite)
    assert context.nonce(_hex_int(vector["ctr"])).hex() == vector["nonce"]


@pytest.mark.parametrize("vector", SFRAME_VECTORS, ids=lambda v: v["cipher_suite"])
def test_encrypt_decrypt_vector(vector: dict[str, str]) -> None:
    suite, kid, ctr = _suite(vector), _hex_int(vector["kid"]), _hex_int(vector["ctr"])
    base_key = bytes.fromhex(vector["base_key"])
    metadata, pt = bytes.fromhex(vector["metadata"]), bytes.fromhex(vector["pt"])
    expected = bytes.fromhex(vector["ct"])
    # The vector's AAD is header || metadata: check our header is the prefix of that AAD.
    assert bytes.fromhex(vector["aad"]) == sf.encode_header(kid, ctr) + metadata

    sender = sf.Sender(kid, base_key, suite, counter=ctr)
    assert sender.encrypt(metadata, pt) == expected
    assert sender.counter == ctr + 1

    receiver = sf.Receiver(suite)
    receiver.add_key(kid, base_key)
    assert receiver.decrypt(metadata, expected) == pt


@pytest.mark.parametrize("vector", SFRAME_VECTORS, ids=lambda v: v["cipher_suite"])
def test_clear_prefix_is_rfc_metadata(vector: dict[str, str]) -> None:
    """Our layout is the RFC's encrypt() with the clear prefix as metadata, placed in front."""
    suite, kid, ctr = _suite(vector), _hex_int(vector["kid"]), _hex_int(vector["ctr"])
    base_key = bytes.fromhex(vector["base_key"])
    metadata, pt = bytes.fromhex(vector["metadata"]), bytes.fromhex(vector["pt"])
    frame = metadata + pt
    protected = sf.Sender(kid, base_key, suite, counter=ctr).protect(frame, len(metadata))
    assert protected == metadata + bytes.fromhex(vector["ct"])

    receiver = sf.Receiver(suite)
    receiver.add_key(kid, base_key)
    assert receiver.unprotect(protected, len(metadata)) == frame


# --- Blindfold layout ----------------------------------------------------------------------


def test_format_examples_are_stable() -> None:
    sender = sf.Sender(sf.compose_kid(1, 0), BASE_KEY)
    receiver = sf.Receiver()
    receiver.add_key(sf.compose_kid(1, 0), BASE_KEY)
    for frame, prefix_len, expected in FORMAT_EXAMPLES:
        assert sender.protect(frame, prefix_len).hex() == expected
        assert receiver.unprotect(bytes.fromhex(expected), prefix_len) == frame


@pytest.mark.parametrize("suite", sf.CIPHER_SUITES.values(), ids=lambda s: s.name)
@pytest.mark.parametrize("prefix_len", [0, 1, 3, 10])
def test_round_trip_many_sizes(suite: sf.CipherSuite, prefix_len: int) -> None:
    sender, receiver = _pair(suite=suite)
    rng = random.Random(prefix_len)
    sizes = [*range(max(prefix_len, 1), 80), 255, 256, 1199, 1200, 4096, 65_535, 200_000]
    for size in sizes:
        frame = rng.randbytes(size)
        ctr = sender.counter
        protected = sender.protect(frame, prefix_len)
        header_bytes = sf.encode_header(sender.kid, ctr)
        assert protected[:prefix_len] == frame[:prefix_len]
        assert protected[prefix_len : prefix_len + len(header_bytes)] == header_bytes
        assert len(protected) == size + len(header_bytes) + suite.nt
        assert receiver.unprotect(protected, prefix_len) == frame


@pytest.mark.parametrize("template", [VP8_KEYFRAME, VP8_DELTA], ids=["key", "delta"])
def test_vp8_round_trip(template: bytes) -> None:
    sender, receiver = _pair()
    expected_prefix = 10 if template is VP8_KEYFRAME else 3
    rng = random.Random(1)
    for extra in [0, 1, 2, 15, 16, 17, 100, 1500, 30_000]:
        frame = template[:expected_prefix] + rng.randbytes(extra)
        assert sf.vp8_clear_prefix_len(frame) == expected_prefix
        protected = sender.protect(frame, sf.vp8_clear_prefix_len(frame))
        # The receiver derives the prefix length from the protected bytes alone.
        assert sf.vp8_clear_prefix_len(protected) == expected_prefix
        assert protected[:expected_prefix] == frame[:expected_prefix]
        assert receiver.unprotect(protected, sf.vp8_clear_prefix_len(protected)) == frame


def test_plaintext_is_not_visible_after_prefix() -> None:
    sender, _ = _pair()
    frame = VP8_DELTA[:3] + b"A" * 64
    assert b"AAAAAAAA" not in sender.protect(frame, 3)


def test_zero_length_frames_pass_through() -> None:
    sender, receiver = _pair()
    assert sender.protect(b"") == b""
    assert sender.protect(b"", sf.vp8_clear_prefix_len(b"")) == b""
    assert sender.counter == 0
    assert receiver.unprotect(b"") == b""
    assert receiver.unprotect(b"", 10) == b""


def test_frame_that_is_all_prefix() -> None:
    sender, receiver = _pair()
    frame = VP8_DELTA[:3]
    protected = sender.protect(frame, 3)
    assert len(protected) == 3 + 2 + 16
    assert receiver.unprotect(protected, 3) == frame


def test_frame_shorter_than_prefix_is_refused() -> None:
    sender, _ = _pair()
    with pytest.raises(ValueError, match="does not fit"):
        sender.protect(VP8_KEYFRAME[:9], 10)
    with pytest.raises(ValueError, match="does not fit"):
        sender.protect(b"abc", -1)
    assert sender.counter == 0


def test_vp8_clear_prefix_len() -> None:
    assert sf.vp8_clear_prefix_len(b"") == 0
    assert sf.vp8_clear_prefix_len(VP8_KEYFRAME) == 10
    assert sf.vp8_clear_prefix_len(VP8_DELTA) == 3
    for first in range(256):
        assert sf.vp8_clear_prefix_len(bytes([first])) == (3 if first & 1 else 10)


def test_clear_prefix_len_for_codecs() -> None:
    assert sf.clear_prefix_len_for("VP8", VP8_KEYFRAME) == 10
    assert sf.clear_prefix_len_for("video/VP8", VP8_DELTA) == 3
    assert sf.clear_prefix_len_for("opus", OPUS_FRAME) == 0
    assert sf.clear_prefix_len_for("audio/opus", OPUS_FRAME) == 0
    with pytest.raises(ValueError, match="no E2EE clear-prefix rule"):
        sf.clear_prefix_len_for("H264", b"\x00")


# --- Counter ---------------------------------------------------------------------------------


def test_counter_increments_from_zero() -> None:
    sender, receiver = _pair()
    seen = []
    for _ in range(300):
        protected = sender.protect(b"frame")
        header, _ = sf.decode_header(protected)
        seen.append(header.ctr)
        assert receiver.unprotect(protected) == b"frame"
    assert seen == list(range(300))


@pytest.mark.parametrize(
    ("ctr", "ctr_bytes"),
    [
        (0, 0),
        (7, 0),
        (8, 1),
        (255, 1),
        (256, 2),
        (65_535, 2),
        (65_536, 3),
        (2**24 - 1, 3),
        (2**24, 4),
        (2**32, 5),
        (2**56 - 1, 7),
        (2**56, 8),
        (sf.MAX_COUNTER - 1, 8),
    ],
)
def test_counter_encoding_boundaries(ctr: int, ctr_bytes: int) -> None:
    sender = sf.Sender(0x10, BASE_KEY, counter=ctr)
    _, receiver = _pair()
    for expected in (ctr, ctr + 1):
        protected = sender.protect(b"x")
        header, end = sf.decode_header(protected)
        assert header == sf.SFrameHeader(0x10, expected)
        assert receiver.unprotect(protected) == b"x"
    header, end = sf.decode_header(sf.encode_header(0x10, ctr))
    assert end == 2 + ctr_bytes


def test_counter_exhaustion_refuses_to_reuse_nonces() -> None:
    sender = sf.Sender(0x10, BASE_KEY, counter=sf.MAX_COUNTER)
    protected = sender.protect(b"last")
    assert sf.decode_header(protected)[0].ctr == sf.MAX_COUNTER
    with pytest.raises(OverflowError):
        sender.protect(b"one too many")
    with pytest.raises(OverflowError):
        sender.protect(b"still refused")


def test_senders_with_distinct_keys_do_not_collide() -> None:
    receiver = sf.Receiver()
    receiver.add_key(0x10, BASE_KEY)
    receiver.add_key(0x20, OTHER_KEY)
    a, b = sf.Sender(0x10, BASE_KEY), sf.Sender(0x20, OTHER_KEY)
    frame_a, frame_b = a.protect(b"from a"), b.protect(b"from b")
    assert receiver.unprotect(frame_a) == b"from a"
    assert receiver.unprotect(frame_b) == b"from b"


# --- Authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "codec"),
    [(VP8_KEYFRAME, "VP8"), (VP8_DELTA, "VP8"), (OPUS_FRAME, "opus")],
    ids=["vp8-key", "vp8-delta", "opus"],
)
def test_tampering_with_any_byte_fails(frame: bytes, codec: str) -> None:
    sender, receiver = _pair(kid=0x1234)
    protected = sender.protect(frame, sf.clear_prefix_len_for(codec, frame))
    header_end = sf.parse_envelope(protected, sf.clear_prefix_len_for(codec, protected))[1]
    for index in range(len(protected)):
        for mask in (0x01, 0x10, 0x80):
            tampered = bytearray(protected)
            tampered[index] ^= mask
            data = bytes(tampered)
            prefix_len = sf.clear_prefix_len_for(codec, data)
            with pytest.raises(sf.SFrameError):
                receiver.unprotect(data, prefix_len)
            if index >= header_end:
                # Only the AEAD can catch a change to the ciphertext or tag.
                with pytest.raises(sf.SFrameAuthError):
                    receiver.unprotect(data, prefix_len)


def test_tampered_prefix_is_an_auth_failure() -> None:
    sender, receiver = _pair()
    protected = bytearray(sender.protect(VP8_KEYFRAME, 10))
    protected[5] ^= 0xFF  # part of the keyframe dimensions, which the SFU can read but not change
    with pytest.raises(sf.SFrameAuthError):
        receiver.unprotect(bytes(protected), 10)


def test_tampered_ctr_is_an_auth_failure() -> None:
    sender, receiver = _pair(kid=3)
    protected = bytearray(sender.protect(b"payload"))
    assert protected[0] == 0x30  # KID 3 and CTR 0, both inside the config byte
    protected[0] = 0x31
    with pytest.raises(sf.SFrameAuthError):
        receiver.unprotect(bytes(protected))


def test_truncated_or_extended_frames_fail() -> None:
    sender, receiver = _pair()
    protected = sender.protect(VP8_DELTA, 3)
    for cut in range(1, len(protected)):
        with pytest.raises(sf.SFrameError):
            receiver.unprotect(protected[:cut], 3)
    with pytest.raises(sf.SFrameAuthError):
        receiver.unprotect(protected + b"\x00", 3)


def test_wrong_key_fails_authentication() -> None:
    sender = sf.Sender(0x10, BASE_KEY)
    receiver = sf.Receiver()
    receiver.add_key(0x10, OTHER_KEY)
    with pytest.raises(sf.SFrameAuthError):
        receiver.unprotect(sender.protect(VP8_DELTA, 3), 3)


def test_same_base_key_under_another_kid_fails() -> None:
    # The KID is an input to key derivation, so relabelling a frame cannot make it verify.
    sender = sf.Sender(0x10, BASE_KEY)
    receiver = sf.Receiver()
    receiver.add_key(0x11, BASE_KEY)
    protected = bytearray(sender.protect(b"payload"))
    assert protected[:2] == b"\x80\x10"
    protected[1] = 0x11
    with pytest.raises(sf.SFrameAuthError):
        receiver.unprotect(bytes(protected))


def test_wrong_cipher_suite_fails() -> None:
    sender = sf.Sender(0x10, BASE_KEY, sf.AES_256_GCM_SHA512_128)
    receiver = sf.Receiver(sf.AES_128_GCM_SHA256_128)
    receiver.add_key(0x10, BASE_KEY)
    with pytest.raises(sf.SFrameAuthError):
        receiver.unprotect(sender.protect(b"payload"))


def test_wrong_clear_prefix_len_fails() -> None:
    sender, receiver = _pair()
    protected = sender.protect(VP8_KEYFRAME, 10)
    for wrong in (0, 3, 9, 11):
        with pytest.raises(sf.SFrameError):
            receiver.unprotect(protected, wrong)


def test_unknown_kid_is_rejected() -> None:
    sender = sf.Sender(0x77, BASE_KEY)
    receiver = sf.Receiver()
    receiver.add_key(0x10, BASE_KEY)
    with pytest.raises(sf.SFrameUnknownKidError) as info:
        receiver.unprotect(sender.protect(b"payload"))
    assert info.value.kid == 0x77
    receiver.add_key(0x77, BASE_KEY)
    assert receiver.has_key(0x77)
    receiver.remove_key(0x77)
    assert not receiver.has_key(0x77)
    receiver.remove_key(0x77)  # removing twice is harmless


def test_error_hierarchy() -> None:
    assert issubclass(sf.SFrameError, ValueError)
    assert issubclass(sf.SFrameAuthError, sf.SFrameError)
    assert issubclass(sf.SFrameUnknownKidError, sf.SFrameError)


# --- Malformed headers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "",
        "80",  # KID length 1 announced, no KID byte
        "f0ffffffffffffff",  # KID length 8, only 7 bytes
        "08",  # CTR length 1 announced, no CTR byte
        "8f0801020304050607",  # CTR length 8, only 7 bytes
        "8007",  # KID 7 must be inline, not extended
        "900001",  # KID with a leading zero byte
        "0807",  # CTR 7 must be inline
        "090001",  # CTR with a leading zero byte
        "f000000000000000ff",  # 8-byte KID that is really zero
    ],
)
def test_malformed_headers(data: str) -> None:
    with pytest.raises(sf.SFrameError) as info:
        sf.decode_header(bytes.fromhex(data))
    assert type(info.value) is sf.SFrameError


def _check_decode(data: bytes, offset: int = 0) -> None:
    # Any exception other than SFrameError propagates and fails the calling test.
    try:
        header, end = sf.decode_header(data, offset)
    except sf.SFrameError as error:
        failure = error
    else:
        # Whatever decodes must be the unique minimal encoding of what it decoded to.
        assert sf.encode_header(header.kid, header.ctr) == data[offset:end]
        return
    assert type(failure) is sf.SFrameError, "malformed headers raise the base error only"


def test_decode_header_exhaustive_short_inputs() -> None:
    for first in range(256):
        _check_decode(bytes([first]))
        for second in range(256):
            _check_decode(bytes([first, second]))


def test_decode_header_fuzz() -> None:
    rng = random.Random(9605)
    for _ in range(30_000):
        data = rng.randbytes(rng.randrange(0, 20))
        if data and rng.random() < 0.3:
            data = bytes([data[0]]) + b"\x00" * rng.randrange(0, 3) + data[1:]
        _check_decode(data, rng.randrange(0, 3) if rng.random() < 0.2 else 0)


def test_decode_header_rejects_bad_offsets() -> None:
    with pytest.raises(sf.SFrameError):
        sf.decode_header(b"\x00", 1)
    with pytest.raises(sf.SFrameError):
        sf.decode_header(b"\x00", -1)


def test_unprotect_fuzz_raises_only_sframe_errors() -> None:
    sender, receiver = _pair(kid=0x10)
    receiver.add_key(1, BASE_KEY)
    rng = random.Random(6386)
    valid = sender.protect(VP8_KEYFRAME, 10)
    for _ in range(5_000):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.randrange(1, 64))
        else:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated[: rng.randrange(1, len(mutated) + 1)])
        with pytest.raises(sf.SFrameError):
            receiver.unprotect(data, sf.vp8_clear_prefix_len(data))


def test_parse_envelope_checks_shape_only() -> None:
    sender, _ = _pair()
    protected = sender.protect(VP8_KEYFRAME, 10)
    header, body = sf.parse_envelope(protected, 10)
    assert header == sf.SFrameHeader(0x10, 0)
    assert body == 12
    with pytest.raises(sf.SFrameError, match="tag"):
        sf.parse_envelope(protected[: body + 15], 10)
    with pytest.raises(ValueError, match="negative"):
        sf.parse_envelope(protected, -1)


# --- Argument checks and hygiene -------------------------------------------------------------


@pytest.mark.parametrize(("kid", "ctr"), [(-1, 0), (0, -1), (2**64, 0), (0, 2**64)])
def test_encode_header_range(kid: int, ctr: int) -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        sf.encode_header(kid, ctr)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        sf.Sender(1, b"short")
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        sf.Sender(2**64, BASE_KEY)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        sf.Sender(1, BASE_KEY, counter=-1)
    with pytest.raises(ValueError, match="not implemented"):
        sf.Sender(
            1, BASE_KEY, sf.CipherSuite(0x0001, "AES_128_CTR_HMAC_SHA256_80", "sha256", 48, 12, 10)
        )
    with pytest.raises(ValueError, match="at least 16 bytes"):
        sf.Receiver().add_key(1, b"")


def test_compose_kid() -> None:
    assert sf.compose_kid(0, 0) == 0
    assert sf.compose_kid(0, 5) == 5
    assert sf.compose_kid(1, 0) == 0x10
    assert sf.compose_kid(3, 17) == 0x31  # generations wrap at 16
    assert len(sf.encode_header(sf.compose_kid(15, 15), 0)) == 2
    with pytest.raises(ValueError, match="negative"):
        sf.compose_kid(-1, 0)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        sf.compose_kid(2**60, 0)


def test_repr_does_not_leak_keys() -> None:
    sender, receiver = _pair()
    key, salt = sf.derive_key_salt(0x10, BASE_KEY)
    for text in (repr(sender), repr(receiver)):
        for secret in (BASE_KEY, key, salt):
            assert secret.hex() not in text
            assert repr(secret) not in text
    assert "kid=0x10" in repr(sender)


def test_module_does_not_import_aiortc() -> None:
    code = (
        "import sys, sfu.client.sframe; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aiortc', 'av')]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
