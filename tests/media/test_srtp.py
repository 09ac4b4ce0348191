"""SRTP wrapper: both directions, all three profiles, failures as None plus counters."""

from __future__ import annotations

import os
import struct

import pylibsrtp
import pytest

from sfu.media.srtp import (
    PROFILES,
    PROFILES_BY_PREFERENCE,
    REPLAY_WINDOW,
    SrtpKeyingMaterial,
    SrtpProfile,
    SrtpSession,
)

PROFILE_NAMES = [p.name for p in PROFILES_BY_PREFERENCE]


def rtp(seq: int, ssrc: int = 0x1234ABCD, size: int = 1200) -> bytes:
    header = struct.pack("!BBHII", 0x80, 96, seq & 0xFFFF, seq * 3000, ssrc)
    return header + bytes((seq + i) & 0xFF for i in range(size - len(header)))


def rtcp_receiver_report(ssrc: int = 0x1234ABCD) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def keys_for(profile: SrtpProfile) -> SrtpKeyingMaterial:
    return SrtpKeyingMaterial.from_exported(profile, os.urandom(profile.exporter_length))


@pytest.fixture(params=PROFILE_NAMES)
def keys(request: pytest.FixtureRequest) -> SrtpKeyingMaterial:
    return keys_for(PROFILES[request.param])


def test_server_order_prefers_gcm() -> None:
    assert PROFILE_NAMES == [
        "SRTP_AEAD_AES_128_GCM",
        "SRTP_AEAD_AES_256_GCM",
        "SRTP_AES128_CM_SHA1_80",
    ]
    assert [p.exporter_length for p in PROFILES_BY_PREFERENCE] == [56, 88, 60]


def test_exported_material_is_split_as_rfc5764_lays_it_out() -> None:
    profile = PROFILES["SRTP_AES128_CM_SHA1_80"]
    material = bytes(range(60))
    keys = SrtpKeyingMaterial.from_exported(profile, material)
    assert keys.client_write_key == bytes(range(0, 16))
    assert keys.server_write_key == bytes(range(16, 32))
    assert keys.client_write_salt == bytes(range(32, 46))
    assert keys.server_write_salt == bytes(range(46, 60))
    assert "client_write_key" not in repr(keys)  # no key bytes in logs
    with pytest.raises(ValueError, match="60 bytes"):
        SrtpKeyingMaterial.from_exported(profile, material[:-1])


def test_round_trip_both_directions(keys: SrtpKeyingMaterial) -> None:
    sfu = SrtpSession(keys)
    browser = SrtpSession(keys, role="client")
    for seq in range(20):
        packet = rtp(seq)
        up = browser.protect_rtp(packet)
        assert up is not None
        assert up != packet
        assert sfu.unprotect_rtp(up) == packet
        down = sfu.protect_rtp(packet)
        assert down is not None
        assert down != up  # each direction has its own key
        assert browser.unprotect_rtp(down) == packet
    report = rtcp_receiver_report()
    up_rtcp = browser.protect_rtcp(report)
    assert up_rtcp is not None
    assert sfu.unprotect_rtcp(up_rtcp) == report
    down_rtcp = sfu.protect_rtcp(report)
    assert down_rtcp is not None
    assert browser.unprotect_rtcp(down_rtcp) == report


def test_directions_match_raw_libsrtp_with_the_client_write_key(
    keys: SrtpKeyingMaterial,
) -> None:
    # Independent of SrtpSession's role logic: the client protects with client_write_*.
    raw = pylibsrtp.Session(
        pylibsrtp.Policy(
            key=keys.client_write_key + keys.client_write_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=keys.profile.libsrtp_profile,
        )
    )
    assert SrtpSession(keys).unprotect_rtp(raw.protect(rtp(1))) == rtp(1)
    assert SrtpSession(keys, role="client").unprotect_rtp(raw.protect(rtp(2))) is None


def test_any_ssrc_in_both_directions(keys: SrtpKeyingMaterial) -> None:
    sfu = SrtpSession(keys)
    browser = SrtpSession(keys, role="client")
    for ssrc in (1, 0xDEADBEEF, 42, 0xFFFFFFFF):
        up = browser.protect_rtp(rtp(7, ssrc))
        assert up is not None
        assert sfu.unprotect_rtp(up) == rtp(7, ssrc)
        down = sfu.protect_rtp(rtp(9, ssrc))
        assert down is not None
        assert browser.unprotect_rtp(down) == rtp(9, ssrc)


def test_tampering_and_replay_are_counted_not_raised(keys: SrtpKeyingMaterial) -> None:
    sfu = SrtpSession(keys)
    browser = SrtpSession(keys, role="client")
    good = browser.protect_rtp(rtp(100))
    assert good is not None
    tampered = bytearray(good)
    tampered[40] ^= 1
    assert sfu.unprotect_rtp(bytes(tampered)) is None
    assert sfu.rtp_auth_failures == 1
    assert sfu.unprotect_rtp(good) == rtp(100)  # the real one still gets through
    assert sfu.unprotect_rtp(good) is None  # but only once
    assert sfu.rtp_replay_failures == 1

    report = browser.protect_rtcp(rtcp_receiver_report())
    assert report is not None
    bad_report = report[:-1] + bytes([report[-1] ^ 0x80])
    assert sfu.unprotect_rtcp(bad_report) is None
    assert sfu.rtcp_auth_failures + sfu.rtcp_malformed == 1
    assert sfu.unprotect_rtcp(report) == rtcp_receiver_report()
    assert sfu.unprotect_rtcp(report) is None
    assert sfu.rtcp_replay_failures == 1

    for junk in (b"", b"\x80", b"\x80\x60\x00", os.urandom(11)):
        assert sfu.unprotect_rtp(junk) is None
        assert sfu.unprotect_rtcp(junk) is None
    assert sfu.rtp_malformed + sfu.rtp_auth_failures >= 4


def test_wrong_key_fails_authentication(keys: SrtpKeyingMaterial) -> None:
    other = keys_for(keys.profile)
    packet = SrtpSession(other, role="client").protect_rtp(rtp(5))
    assert packet is not None
    sfu = SrtpSession(keys)
    assert sfu.unprotect_rtp(packet) is None
    assert sfu.rtp_auth_failures == 1


def test_retransmission_with_the_same_seq_is_byte_identical(keys: SrtpKeyingMaterial) -> None:
    sfu = SrtpSession(keys)
    browser = SrtpSession(keys, role="client")
    sent = [sfu.protect_rtp(rtp(seq)) for seq in range(1000)]
    # A NACK answered in-stream (no RTX) re-protects an old SSRC/seq: allowed, and because
    # the packet is identical the ciphertext is identical (no keystream/nonce misuse).
    again = sfu.protect_rtp(rtp(990))
    assert again == sent[990]
    old = 1000 - REPLAY_WINDOW // 2  # as old as the video ring buffer reaches
    assert sfu.protect_rtp(rtp(old)) == sent[old]
    assert sfu.protect_failures == 0
    # The receiver treats the first copy it sees as the packet and a second one as a replay.
    first = sent[990]
    assert first is not None
    assert browser.unprotect_rtp(first) == rtp(990)


def test_oversized_packets_fail_softly(keys: SrtpKeyingMaterial) -> None:
    sfu = SrtpSession(keys)
    assert sfu.protect_rtp(rtp(1, size=1400)) is None
    assert sfu.protect_failures == 1
    assert sfu.unprotect_rtp(rtp(1, size=1600)) is None
    assert sfu.rtp_malformed == 1


def test_protect_fast_path_matches_pylibsrtp_public_api() -> None:
    import os

    from sfu.media.srtp import AEAD_AES_128_GCM, AES128_CM_SHA1_80, SrtpKeyingMaterial, SrtpSession

    for profile in (AEAD_AES_128_GCM, AES128_CM_SHA1_80):
        material = SrtpKeyingMaterial.from_exported(profile, os.urandom(profile.exporter_length))
        fast, public = SrtpSession(material), SrtpSession(material)
        public._tx_len = None  # force pylibsrtp's own protect()
        assert fast._tx_len is not None, "the fast path must be active with the pinned pylibsrtp"
        receiver = SrtpSession(material, role="client")
        for seq in range(50):
            packet = (
                bytes([0x80, 96, 0, seq])
                + b"\x00\x00\x00\x01\x00\x00\x00\x07"
                + os.urandom(seq * 20)
            )
            out = fast.protect_rtp(packet)
            assert out == public.protect_rtp(packet)
            assert receiver.unprotect_rtp(out) == packet  # type: ignore[arg-type]
        assert fast.protect_rtp(bytes(1400)) is None
        assert fast.protect_failures == 1
