"""Structure-aware inputs for the fuzz targets: valid or nearly valid messages of each format,
built field by field so that most of them get past the first length check and reach the code
behind it. `tests/fuzz/targets.py` mutates them further (`mutation.mutate`).

Every generator takes a `Chooser` and returns bytes; the text formats (SDP, JSON, JWT) are
returned UTF-8 encoded, and the targets decode them the way the server does.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
from functools import cache
from types import FrameType
from typing import Any

from OpenSSL import SSL

from sfu.media import rtcp, stun
from sfu.media.dtls import SRTP_PROFILE_LIST, DtlsCertificate
from sfu.media.rtp import PROFILE_ONE_BYTE, PROFILE_TWO_BYTE
from sfu.media.twcc import TwccRecorder
from tests.fuzz.mutation import Chooser, between, bits, chance, pick

# -- STUN ---------------------------------------------------------------------------------------

STUN_KEY = b"the-sfu-ice-password-0123"
_STUN_TYPES = (
    stun.BINDING_REQUEST,
    stun.BINDING_INDICATION,
    stun.BINDING_SUCCESS,
    stun.BINDING_ERROR,
)


def _text(c: Chooser, alphabet: str, low: int, high: int) -> str:
    return "".join(pick(c, alphabet) for _ in range(between(c, low, high)))


def _ip(c: Chooser) -> str:
    if chance(c, 60):
        return socket.inet_ntop(socket.AF_INET, c.raw(4))
    return socket.inet_ntop(socket.AF_INET6, c.raw(16))


def _stun_attribute(c: Chooser, tid: bytes) -> tuple[int, bytes]:
    kind = c.below(11)
    # One time in four a fixed-size attribute gets a size it must not have.
    wrong = chance(c, 25)
    if kind == 0:
        if chance(c, 70):
            value = _text(c, "abcXYZ019+/:", 0, 24).encode()
        else:
            value = c.raw(between(c, 0, 24))  # not always UTF-8
        return stun.ATTR_USERNAME, value
    if kind == 1:
        return stun.ATTR_PRIORITY, c.raw(between(c, 0, 8) if wrong else 4)
    if kind == 2:
        return stun.ATTR_USE_CANDIDATE, c.raw(between(c, 1, 4) if wrong else 0)
    if kind == 3:
        attr = pick(c, (stun.ATTR_ICE_CONTROLLED, stun.ATTR_ICE_CONTROLLING))
        return attr, c.raw(between(c, 0, 12) if wrong else 8)
    if kind == 4:
        if wrong:
            value = bytes((0, pick(c, (1, 2, 3)))) + c.raw(between(c, 0, 20))
        else:
            value = stun.encode_xor_address((_ip(c), bits(c, 16)), tid)
        return stun.ATTR_XOR_MAPPED_ADDRESS, value
    if kind == 5:
        if wrong:
            value = c.raw(between(c, 0, 8))
        else:
            reason = _text(c, "abc def", 0, 20) if chance(c, 70) else None
            value = stun.encode_error_code(between(c, 300, 699), reason)
            if chance(c, 20):
                value += b"\xff\xfe"  # a reason that is not UTF-8
        return stun.ATTR_ERROR_CODE, value
    if kind == 6:
        return stun.ATTR_SOFTWARE, _text(c, "blindfold 0.1", 0, 16).encode()
    if kind == 7:
        return stun.ATTR_UNKNOWN_ATTRIBUTES, c.raw(2 * between(c, 0, 4))
    if kind == 8:
        # MESSAGE-INTEGRITY in the middle: what follows must be ignored.
        return stun.ATTR_MESSAGE_INTEGRITY, c.raw(between(c, 0, 24) if wrong else 20)
    if kind == 9:
        # FINGERPRINT in the middle: anything after it is an error.
        return stun.ATTR_FINGERPRINT, c.raw(between(c, 0, 8) if wrong else 4)
    return bits(c, 16), c.raw(between(c, 0, 24))


def stun_message(c: Chooser) -> bytes:
    tid = c.raw(12)
    if chance(c, 10):
        # Attributes whose padding and lengths are the generator's, not the encoder's.
        body = b""
        for _ in range(c.below(5)):
            value = c.raw(between(c, 0, 12))
            pad = (-len(value)) % 4 if chance(c, 80) else c.below(4)
            body += struct.pack("!HH", bits(c, 16), len(value)) + value + bytes(pad)
        msg_type = pick(c, _STUN_TYPES)
        return struct.pack("!HHI", msg_type, len(body), stun.MAGIC_COOKIE) + tid + body
    msg_type = pick(c, _STUN_TYPES) if chance(c, 85) else bits(c, 14)
    attrs = [_stun_attribute(c, tid) for _ in range(c.below(7))]
    key = STUN_KEY if chance(c, 60) else None
    return stun.encode(msg_type, tid, attrs, integrity_key=key, fingerprint=chance(c, 70))


# -- RTP ----------------------------------------------------------------------------------------

# Ids as a browser negotiates them, so the readers find something under the ids they ask for.
EXT_MID, EXT_ABS_SEND_TIME, EXT_TWCC, EXT_AUDIO_LEVEL, EXT_DD = 1, 2, 3, 4, 12
RTP_READ_IDS = (EXT_MID, EXT_ABS_SEND_TIME, EXT_TWCC, EXT_AUDIO_LEVEL, EXT_DD, 14, 15, 200)


def _element_value(c: Chooser, ext_id: int, max_len: int) -> bytes:
    if ext_id == EXT_MID:
        value = _text(c, "01ab", 1, 3).encode()
        if chance(c, 20):
            value += bytes(c.below(3))  # senders pad the one-byte form's value with NULs
        return value[:max_len]
    sizes = {EXT_ABS_SEND_TIME: 3, EXT_TWCC: 2, EXT_AUDIO_LEVEL: 1, EXT_DD: between(c, 3, 10)}
    size = sizes.get(ext_id, between(c, 1, max_len))
    if chance(c, 15):
        size = between(c, 0, max_len)
    return c.raw(min(size, max_len))


def _extension_block(c: Chooser) -> tuple[int, bytes]:
    form = c.below(4)
    block = bytearray()
    ids = (EXT_MID, EXT_ABS_SEND_TIME, EXT_TWCC, EXT_AUDIO_LEVEL, EXT_DD)
    if form <= 1:
        for _ in range(c.below(6)):
            if chance(c, 10):
                block += bytes(between(c, 1, 3))  # padding bytes between elements
            ext_id = pick(c, ids) if chance(c, 80) else pick(c, (0, 5, 13, 14, 15))
            value = _element_value(c, ext_id, 16) or b"\x00"
            block.append((ext_id << 4) | (len(value) - 1))
            block += value
        profile = PROFILE_ONE_BYTE
    elif form == 2:
        for _ in range(c.below(6)):
            if chance(c, 10):
                block += bytes(between(c, 1, 3))
            ext_id = pick(c, ids) if chance(c, 70) else bits(c, 8)
            value = _element_value(c, ext_id, 40)
            block += bytes((ext_id, len(value))) + value
        profile = PROFILE_TWO_BYTE | bits(c, 4)
    else:
        profile = bits(c, 16)  # a profile that is neither RFC 8285 form: opaque
        block += c.raw(4 * c.below(4))
    block += bytes(-len(block) % 4)
    return profile, bytes(block)


def _vp8_payload(c: Chooser) -> bytes:
    x = chance(c, 60)
    first = (0x80 if x else 0) | (0x10 if chance(c, 60) else 0) | bits(c, 3) | (bits(c, 1) << 5)
    out = bytearray((first,))
    if x:
        ext = bits(c, 4) << 4
        out.append(ext)
        if ext & 0x80:
            if chance(c, 60):
                out += (0x8000 | bits(c, 15)).to_bytes(2)
            else:
                out.append(bits(c, 7))
        if ext & 0x40:
            out.append(bits(c, 8))
        if ext & 0x30:
            out.append(bits(c, 8))
    keyframe = chance(c, 40)
    out.append(0x00 if keyframe else 0x01)  # the frame's inverse key-frame bit P
    out += c.raw(between(c, 0, 40))
    return bytes(out)


def _h264_payload(c: Chooser) -> bytes:
    nal = pick(c, (1, 5, 7, 8, 24, 28))
    out = bytearray((0x60 | nal,))
    if nal == 24:  # STAP-A: 16-bit size, then the first aggregated NAL unit
        out += between(c, 1, 30).to_bytes(2) + bytes((0x60 | pick(c, (1, 5, 7)),))
    elif nal == 28:  # FU-A: S/E bits and the fragmented NAL unit's type
        out.append((bits(c, 2) << 6) | pick(c, (1, 5, 7)))
    return bytes(out) + c.raw(between(c, 0, 30))


def rtp_payload(c: Chooser) -> bytes:
    kind = c.below(5)
    if kind <= 1:
        return _vp8_payload(c)
    if kind == 2:
        return _h264_payload(c)
    if kind == 3:
        return b""
    return c.raw(between(c, 1, 64))


def rtp_packet(c: Chooser) -> bytes:
    version = 2 if chance(c, 95) else bits(c, 2)
    cc = pick(c, (0, 0, 0, 1, 2, 15))
    has_ext = chance(c, 75)
    marker = bits(c, 1)
    pt = pick(c, (96, 97, 111, bits(c, 7)))
    fixed = struct.pack(
        "!BBHII",
        (version << 6) | (has_ext << 4) | cc,
        (marker << 7) | pt,
        bits(c, 16),
        bits(c, 32),
        bits(c, 32),
    )
    csrcs = c.raw(4 * cc if chance(c, 90) else 4 * c.below(cc + 1))
    ext = b""
    if has_ext:
        profile, block = _extension_block(c)
        words = len(block) // 4
        if chance(c, 10):
            words = pick(c, (0, words + 1, max(words - 1, 0), 0xFFFF))
        ext = struct.pack("!HH", profile, words) + block
    body = rtp_payload(c)
    packet = bytearray(fixed + csrcs + ext + body)
    if chance(c, 20):
        pad = between(c, 1, 24)
        packet += bytes(pad - 1) + bytes((pad if chance(c, 80) else pick(c, (0, 255)),))
        packet[0] |= 0x20
    return bytes(packet)


# -- RTCP ---------------------------------------------------------------------------------------


def _report(c: Chooser) -> rtcp.ReportBlock:
    return rtcp.ReportBlock(
        bits(c, 32),
        bits(c, 8),
        between(c, -0x800000, 0x7FFFFF),
        bits(c, 32),
        bits(c, 32),
        bits(c, 32),
        bits(c, 32),
    )


def twcc_feedback(c: Chooser) -> bytes:
    """Real TWCC feedback from the SFU's own encoder, over a random arrival pattern."""
    recorder = TwccRecorder()
    seq = bits(c, 16)
    now = 1000.0
    for _ in range(between(c, 1, 40)):
        seq = (seq + pick(c, (1, 1, 1, 2, 5, 0x7FFF))) & 0xFFFF
        now += pick(c, (0.0, 0.001, 0.02, 0.3, 9.0))
        recorder.record(seq, now)
    packets = recorder.build_feedback(bits(c, 32), bits(c, 32), now + 0.05) or []
    return packets[0] if packets else b""


def _rtcp_one(c: Chooser) -> bytes:
    kind = c.below(12)
    ssrc = bits(c, 32)
    if kind == 0:
        reports = [_report(c) for _ in range(c.below(3))]
        return rtcp.build_sr(ssrc, bits(c, 64), bits(c, 32), bits(c, 32), bits(c, 32), reports)
    if kind == 1:
        return rtcp.build_rr(ssrc, [_report(c) for _ in range(c.below(3))])
    if kind == 2:
        start = bits(c, 16)
        lost = [start + between(c, 0, 80) for _ in range(between(c, 1, 20))]
        return rtcp.build_nack(ssrc, bits(c, 32), lost)
    if kind == 3:
        return rtcp.build_pli(ssrc, bits(c, 32))
    if kind == 4:
        return rtcp.build_fir(ssrc, bits(c, 32), bits(c, 8))
    if kind == 5:
        ssrcs = [bits(c, 32) for _ in range(c.below(4))]
        return rtcp.build_remb(ssrc, bits(c, 40), ssrcs)
    if kind == 6:
        reason = c.raw(c.below(20)) if chance(c, 50) else b""
        return rtcp.build_bye([bits(c, 32) for _ in range(c.below(3))], reason)
    if kind == 7:
        return twcc_feedback(c)
    # SDES, APP, XR, other feedback formats and unknown types: framing only.
    pt = pick(c, (rtcp.PT_SDES, rtcp.PT_APP, 207, rtcp.PT_RTPFB, rtcp.PT_PSFB, bits(c, 8)))
    body = c.raw(4 * between(c, 0, 6))
    return struct.pack("!BBH", 0x80 | bits(c, 5), pt, len(body) // 4) + body


def _with_padding(c: Chooser, packet: bytes) -> bytes:
    """The packet with RFC 3550 padding: P bit, padding bytes, count in the last one."""
    pad = 4 * between(c, 1, 3)
    count = pad if chance(c, 80) else pick(c, (0, pad + 4, 255))
    padded = bytearray(packet + bytes(pad - 1) + bytes((count,)))
    padded[0] |= 0x20
    struct.pack_into("!H", padded, 2, len(padded) // 4 - 1)
    return bytes(padded)


def rtcp_compound(c: Chooser) -> bytes:
    out = b""
    for _ in range(between(c, 1, 4)):
        packet = _rtcp_one(c)
        if packet and chance(c, 15):
            packet = _with_padding(c, packet)
        out += packet
    return out


# -- DTLS ---------------------------------------------------------------------------------------


@cache
def dtls_certificate() -> DtlsCertificate:
    return DtlsCertificate.generate()


@cache
def client_hello() -> bytes:
    """A real DTLS 1.2 ClientHello offering the SRTP profiles, as a browser's first flight."""
    certificate = dtls_certificate()
    context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    context.use_certificate(certificate.certificate)
    context.use_privatekey(certificate.private_key)
    context.set_tlsext_use_srtp(SRTP_PROFILE_LIST)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):  # it waits for the server's answer
        connection.do_handshake()
    return bytes(connection.bio_read(65536))


def dtls_datagram(c: Chooser) -> bytes:
    if chance(c, 30):
        return client_hello()
    out = b""
    for _ in range(between(c, 1, 3)):
        content_type = pick(c, (20, 21, 22, 23, between(c, 20, 63)))
        version = pick(c, (0xFEFD, 0xFEFF, bits(c, 16)))
        body = c.raw(between(c, 0, 48))
        if content_type == 22 and body and chance(c, 50):
            body = bytes((1,)) + body[1:]  # a handshake record that claims to be a ClientHello
        length = len(body) if chance(c, 85) else pick(c, (0, len(body) + 1, 0xFFFF))
        out += struct.pack("!BHH", content_type, version, bits(c, 16))
        out += bits(c, 48).to_bytes(6) + struct.pack("!H", length) + body
    return out


# -- SDP ----------------------------------------------------------------------------------------

FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)
_CODECS = (
    ("111", "opus/48000/2", "minptime=10;useinbandfec=1", "audio"),
    ("0", "PCMU/8000", "", "audio"),
    ("96", "VP8/90000", "", "video"),
    ("98", "VP9/90000", "profile-id=0", "video"),
    ("102", "H264/90000", "packetization-mode=1;profile-level-id=42e01f", "video"),
    ("45", "AV1/90000", "", "video"),
)
_EXTMAPS = (
    "urn:ietf:params:rtp-hdrext:sdes:mid",
    "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension",
    "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
)
# Lines that are legal-looking but odd, or that broke an SDP parser somewhere once.
_ODD_LINES = (
    "a=group: ",
    "a=group:",
    "a=group:BUNDLE",
    "a=ssrc-group:",
    "a=ssrc-group:FID",
    "a=ssrc-group:FID 1 x",
    "a=rtpmap:97",
    "a=rtpmap:300 VP8/90000",
    "a=rtpmap:96 VP8/0",
    "a=rtpmap:96 VP8/90000/",
    "a=fmtp:\u00b2 apt=96",
    "a=fmtp:97 apt=\u0661\u0662",
    "a=rtcp-fb:* nack",
    "a=rtcp-fb:",
    "a=extmap:0 urn:x",
    "a=extmap:999 urn:x",
    "a=extmap:1/sendonly",
    "a=extmap:",
    "a=setup:passive",
    "a=setup:",
    "a=fingerprint:sha-256",
    "a=fingerprint:md5 AB:CD",
    "a=fingerprint:sha-256 AB:CD",
    "a=ice-ufrag:",
    "a=ice-pwd:",
    "a=mid:",
    "a=mid:0\r",
    "a=ssrc:99999999999 cname:x",
    "a=ssrc:",
    "a=rid:",
    "a=rid:h send",
    "a=simulcast:send h;l",
    "a=bundle-only",
    "a=inactive",
    "a=",
    "a=:",
    "c=IN IP4 0.0.0.0",
    "b=AS:30",
    "m=",
    "m=video",
    "m=video 9 UDP/TLS/RTP/SAVPF",
    "m=video 0 UDP/TLS/RTP/SAVPF 96",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "m=audio 99999999999 RTP/AVP 0",
    "m=video 9/2 UDP/TLS/RTP/SAVPF 96",
    "x",
    "xy",
    "v=0",
)


def _sdp_section(c: Chooser, mid: str) -> list[str]:
    kind = pick(c, ("audio", "video", "audio", "video", "video", "application"))
    codecs = [codec for codec in _CODECS if codec[3] == kind or chance(c, 10)]
    chosen = [codec for codec in codecs if chance(c, 70)] or codecs[:1]
    formats = [pt for pt, *_ in chosen]
    rtx_lines = []
    if kind == "video" and chosen and chance(c, 70):
        rtx_pt = int(formats[0]) + 1
        rtx_lines = [f"a=rtpmap:{rtx_pt} rtx/90000", f"a=fmtp:{rtx_pt} apt={formats[0]}"]
        formats.append(str(rtx_pt))
    port = pick(c, ("9", "9", "0", "7"))
    proto = "UDP/TLS/RTP/SAVPF" if chance(c, 85) else pick(c, ("RTP/AVP", "UDP/DTLS/SCTP"))
    lines = [f"m={kind} {port} {proto} {' '.join(formats) or '96'}", "c=IN IP4 0.0.0.0"]
    if chance(c, 90):
        lines += ["a=ice-ufrag:cli1", "a=ice-pwd:clientpassword0123456789"]
    if chance(c, 90):
        lines.append(f"a=fingerprint:{FINGERPRINT}")
    setup = pick(c, ("actpass", "active")) if chance(c, 90) else pick(c, ("passive", "holdconn"))
    lines.append(f"a=setup:{setup}")
    if chance(c, 90):
        lines.append(f"a=mid:{mid}")
    for index, uri in enumerate(_EXTMAPS, start=1):
        if chance(c, 50):
            ext_id = index if chance(c, 97) else pick(c, (0, 14, 15, 255, 256))
            lines.append(f"a=extmap:{ext_id} {uri}")
    lines.append(f"a={pick(c, ('sendonly', 'sendrecv', 'recvonly', 'inactive', 'sendonly'))}")
    lines += ["a=rtcp-mux", "a=rtcp-rsize"]
    for pt, rtpmap, fmtp, _ in chosen:
        lines.append(f"a=rtpmap:{pt} {rtpmap}")
        for fb in ("nack", "nack pli", "ccm fir", "transport-cc", "goog-remb"):
            if chance(c, 40):
                lines.append(f"a=rtcp-fb:{pt} {fb}")
        if fmtp:
            lines.append(f"a=fmtp:{pt} {fmtp}")
    lines += rtx_lines
    if chance(c, 60):
        ssrc, rtx = bits(c, 32), bits(c, 32)
        if rtx_lines and chance(c, 70):
            lines.append(f"a=ssrc-group:FID {ssrc} {rtx}")
        lines += [f"a=ssrc:{ssrc} cname:x", f"a=ssrc:{rtx} cname:x"]
    return lines


def sdp_offer(c: Chooser) -> bytes:
    mids = [str(i) if chance(c, 90) else pick(c, ("a", "", "0")) for i in range(between(c, 1, 3))]
    lines = ["v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    if chance(c, 85):
        bundled = [m for m in mids if chance(c, 90)]
        lines.append("a=group:BUNDLE " + " ".join(bundled))
    if chance(c, 50):
        lines.append("a=extmap-allow-mixed")
    for mid in mids:
        lines += _sdp_section(c, mid)
    for _ in range(c.below(4)):
        lines.insert(between(c, 1, len(lines)), pick(c, _ODD_LINES))
    if chance(c, 10):
        del lines[c.below(len(lines))]
    newline = pick(c, ("\r\n", "\r\n", "\n"))
    return (newline.join(lines) + newline).encode("utf-8")


# -- Room protocol messages ---------------------------------------------------------------------

_MESSAGE_TYPES = (
    "join",
    "publish_offer",
    "subscribe_answer",
    "subscribe",
    "mute",
    "relay",
    "ping",
    "ice_candidate",
    "leave",
)
_FIELDS = (
    "sdp",
    "tracks",
    "muted",
    "track",
    "payload",
    "to",
    "ts",
    "token",
    "resume",
    "name",
    "version",
    "reuse_sections",
    "subscribe",
)


def _stack_depth() -> int:
    frame: FrameType | None = sys._getframe()
    depth = 0
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return depth


def json_value(c: Chooser, depth: int = 0) -> Any:
    kind = c.below(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return chance(c, 50)
    if kind == 2:
        return pick(c, (0, 1, -1, 2**53, 2**64, 10**300))
    if kind == 3:
        return pick(c, (0.5, 1.0, float("nan"), float("inf"), -0.0, 1e308))
    if kind == 4:
        return "all"
    if kind == 5:
        return _text(c, "ab01 +/=", 0, 12)
    if kind == 6:
        return pick(c, ("", "\ud800", "\x00", "é", "p-1"))
    if kind == 7:
        return "AAAA"  # valid base64
    if kind == 8:
        return [json_value(c, depth + 1) for _ in range(c.below(3))]
    if kind == 9:
        return {pick(c, _FIELDS): json_value(c, depth + 1) for _ in range(c.below(3))}
    if kind == 10:
        return [_text(c, "abc", 1, 4) for _ in range(c.below(3))]
    # Nested about as deep as json.loads can go from here: a value that decoded may still
    # be too deep for whatever walks it next (str(), repr(), comparisons).
    remaining = sys.getrecursionlimit() - _stack_depth()
    nest = max(1, remaining - between(c, 0, 60))
    return _Raw("[" * nest + "]" * nest)


class _Raw:
    """JSON text spliced in as is (nesting too deep for json.dumps to write)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _dump(value: Any) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def room_message(c: Chooser) -> bytes:
    fields: dict[str, Any] = {}
    if chance(c, 95):
        fields["type"] = pick(c, _MESSAGE_TYPES) if chance(c, 90) else json_value(c)
    for _ in range(c.below(4)):
        fields[pick(c, _FIELDS)] = json_value(c)
    if chance(c, 10):
        return _dump(json_value(c)).encode("utf-8", "surrogatepass")
    return _dump(fields).encode("utf-8", "surrogatepass")


# -- SFrame envelopes ---------------------------------------------------------------------------


def _sframe_header(c: Chooser, kid: int, ctr: int) -> bytes:
    config, tail = 0, b""
    if kid < 8:
        config |= kid << 4
    else:
        raw = kid.to_bytes((kid.bit_length() + 7) // 8)
        config |= 0x80 | (len(raw) - 1) << 4
        tail += raw
    if ctr < 8:
        config |= ctr
    else:
        raw = ctr.to_bytes((ctr.bit_length() + 7) // 8)
        config |= 0x08 | (len(raw) - 1)
        tail += raw
    return bytes((config,)) + tail


def envelope_stream(c: Chooser) -> bytes:
    """A codec byte, then length-prefixed RTP packets: one track's first packets of frames,
    mostly a consistent SFrame chain (one KID, counter stepping up), with breaks."""
    codec = c.below(3)  # vp8, opus, a codec without a clear prefix
    out = bytearray((codec,))
    kid = pick(c, (0, 3, 7, 8, 300, 2**40))
    ctr = pick(c, (0, 5, 255, 2**32))
    ts = bits(c, 32)
    for _ in range(between(c, 1, 30)):
        ctr += pick(c, (1, 1, 1, 2, 3, 33, -1))
        ctr = max(ctr, 0)
        if chance(c, 5):
            kid = bits(c, 16)
        header = _sframe_header(c, kid, ctr) if chance(c, 90) else c.raw(between(c, 0, 4))
        body = c.raw(between(c, 0, 24))
        if codec == 0:
            keyframe = chance(c, 20)
            prefix = bytes((0x00 if keyframe else 0x01,)) + c.raw(9 if keyframe else 2)
            descriptor = bytes((0x10,)) if chance(c, 90) else bytes((bits(c, 8),))
            payload = descriptor + prefix + header + body
        else:
            payload = header + body
        if chance(c, 90):
            ts = (ts + 3000) & 0xFFFFFFFF
        packet = struct.pack("!BBHII", 0x80, 96, bits(c, 16), ts, 0x1234) + payload
        out += struct.pack("!H", len(packet)) + packet
    return bytes(out)


# -- JWT ----------------------------------------------------------------------------------------

# First byte of a JWT input: what the rest is.
JWT_SIGN = ord("s")  # header JSON, a newline, payload bytes: the target signs them (HS256)
JWT_EDIT = ord("e")  # as JWT_SIGN after 3 bytes saying which character of the token to replace
JWT_TEXT = ord("t")  # the token text itself

_JWT_CLAIMS = ("exp", "nbf", "iat", "sub", "room", "grants", "name", "iss", "jti")


def _claim_value(c: Chooser, name: str, now: int) -> Any:
    if chance(c, 85):
        good = {
            "exp": now + 3600,
            "nbf": now - 10,
            "iat": now - 10,
            "sub": "alice",
            "room": "room1",
            "grants": {"publish": True, "subscribe": bool(c.below(2))},
            "name": "Alice",
            "iss": "devkey",
            "jti": "x",
        }
        return good[name]
    return json_value(c)


def _jwt_header(c: Chooser, kid: str) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT", "kid": kid}
    if chance(c, 20):
        header["alg"] = pick(c, ("none", "HS512", "RS256", "", json_value(c)))
    if chance(c, 15):
        header["kid"] = pick(c, ("nokey", "", json_value(c)))
    if chance(c, 10):
        header[pick(c, ("crit", "b64", "typ", "jku"))] = json_value(c)
    return header


def jwt_input(c: Chooser, now: int, kid: str) -> bytes:
    """A header and claims for the target to sign with the key `kid` names: the claims valid,
    or with arbitrary values and types, the header sometimes odd. Or token text: such a token
    signed here (later mutations then hit its signature or segments), or an odd string."""
    claims = {name: _claim_value(c, name, now) for name in _JWT_CLAIMS if chance(c, 92)}
    if chance(c, 10):
        claims[pick(c, ("aud", "crit", "kid", "grants"))] = json_value(c)
    header = _dump(_jwt_header(c, kid)).encode("utf-8", "surrogatepass")
    payload = _dump(claims).encode("utf-8", "surrogatepass")
    roll = c.below(100)
    if roll < 65:
        return bytes((JWT_SIGN,)) + header + b"\n" + payload
    if roll < 85:
        return bytes((JWT_EDIT,)) + c.raw(3) + header + b"\n" + payload
    text = pick(
        c,
        (
            "",
            ".",
            "..",
            "a.b.c",
            "eyJhbGciOiJIUzI1NiJ9.e30.",
            "eyJhbGciOiJub25lIiwia2lkIjoiZGV2a2V5In0.e30.",
            "\ud800.\udfff.x",
            "Bearer x",
        ),
    ).encode("utf-8", "surrogatepass")
    return bytes((JWT_TEXT,)) + text
