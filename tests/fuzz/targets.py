"""One fuzz target per parser that sees client input: what it is fed, which error it documents,
and the properties its output must have. Used by tests/fuzz (hypothesis, small budgets) and
by bench/fuzz.py (millions of inputs).

A target's `run` takes raw bytes (text formats are decoded the way the server decodes them),
calls the parser and everything that consumes its result, and checks the output. The one
error type each step documents is caught and recorded through `Outcome.refuse`; any other
exception, and any failed assertion, escapes: that is a finding.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from OpenSSL import SSL

from sfu.client import sframe
from sfu.config import DEV_API_KEY, DEV_API_SECRET, Config
from sfu.control import auth, negotiation, sdp
from sfu.control.rooms import messages
from sfu.control.rooms.errors import ProtocolError
from sfu.media import codecs, dtls, rtcp, rtp, stun, twcc
from sfu.media.envelope import STATES, EnvelopeJudge, parse_sframe_header
from sfu.media.producer import TrackCodec
from sfu.names import display_name_problem, identity_problem, room_name_problem
from tests.fuzz import generators
from tests.fuzz.mutation import Chooser, between, mutate

# Longest unstructured input; structured ones stay far below the 1200-byte MTU too.
MAX_NOISE = 300


class Outcome:
    """What one run refused, as `Type: message` strings (bench/fuzz.py counts them)."""

    __slots__ = ("refusals",)

    def __init__(self) -> None:
        self.refusals: list[str] = []

    def refuse(self, exc: Exception) -> bool:
        self.refusals.append(f"{type(exc).__name__}: {exc}")
        return False


@dataclass(frozen=True)
class Target:
    name: str
    source: str  # the module(s) under test
    documented: str  # the error contract, as the module's docstring states it
    generate: Callable[[Chooser], bytes]
    run: Callable[[bytes, Outcome], bool]  # True: the input was accepted


def make_input(target: Target, c: Chooser) -> bytes:
    """Mostly a generated message, often mutated; sometimes plain noise."""
    roll = c.below(100)
    if roll < 8:
        return c.raw(c.below(MAX_NOISE + 1))
    data = target.generate(c)
    if roll < 35:
        return data
    return mutate(c, data, between(c, 1, 4))


# -- STUN ---------------------------------------------------------------------------------------


def run_stun(data: bytes, out: Outcome) -> bool:
    try:
        msg = stun.parse(data)
    except stun.StunError as exc:
        return out.refuse(exc)
    body = len(data) - stun.HEADER_SIZE
    types = msg.attribute_types()
    assert len(types) <= body // 4
    for attr_type in types:
        value = msg.get(attr_type)
        assert value is not None
        assert len(value) <= body - 4
    repr(msg)
    assert len(msg.transaction_id) == 12
    assert 0 <= msg.method <= 0xFFF
    assert 0 <= msg.message_class <= 3
    # These cannot fail on a message that parsed: parse() checked their sizes.
    priority = msg.priority
    assert priority is None or 0 <= priority < 2**32
    msg.use_candidate  # noqa: B018
    msg.ice_controlling  # noqa: B018
    msg.ice_controlled  # noqa: B018
    # These decode a value and document StunError for a bad one.
    for read in (
        lambda: msg.username,
        lambda: msg.xor_mapped_address,
        lambda: msg.error_code,
    ):
        try:
            read()
        except stun.StunError as exc:
            out.refuse(exc)
    msg.check_integrity(generators.STUN_KEY)
    msg.check_fingerprint()
    return True


# -- RTP ----------------------------------------------------------------------------------------

_NEW_SSRC, _NEW_SEQ, _NEW_TS, _NEW_PT = 0xDEADBEEF, 70_000, 2**33 + 5, 100
_RTX_SSRC, _RTX_SEQ, _RTX_PT = 0x0BADCAFE, 12, 101
# id maps a down-track uses: keep, drop some, renumber within the one-byte range, renumber
# above it (one-byte blocks then need rebuilding).
_ID_MAPS: tuple[dict[int, int], ...] = (
    {i: i for i in range(1, 256)},
    {1: 1, 4: 4, 12: 12},
    {1: 3, 3: 1, 4: 9, 12: 14, 200: 5},
    {1: 20, 12: 255},
)


def _elements(data: bytes | bytearray, hdr: rtp.RtpHeader) -> list[tuple[int, bytes]]:
    return [(i, bytes(data[o : o + n])) for i, o, n in rtp.iter_extensions(data, hdr)]


def _expected_after_map(
    elements: list[tuple[int, bytes]], mapping: dict[int, int]
) -> list[tuple[int, bytes]]:
    return [(mapping[i], value) for i, value in elements if mapping.get(i, 0)]


def _check_readers(data: bytes, hdr: rtp.RtpHeader) -> list[tuple[int, bytes]]:
    size = len(data)
    assert rtp.FIXED_HEADER_SIZE <= hdr.header_len <= hdr.payload_end <= size
    if hdr.has_extension:
        assert hdr.ext_start == rtp.FIXED_HEADER_SIZE + 4 * hdr.csrc_count + 4
        assert hdr.ext_start <= hdr.ext_end == hdr.header_len
    located = list(rtp.iter_extensions(data, hdr))
    assert len(located) <= hdr.ext_end - hdr.ext_start
    first: dict[int, tuple[int, int]] = {}
    for ext_id, off, length in located:
        assert hdr.ext_start <= off <= off + length <= hdr.ext_end
        first.setdefault(ext_id, (off, length))
    for ext_id in {*generators.RTP_READ_IDS, *first}:
        found = rtp.find_extension(data, hdr, ext_id)
        assert found == first.get(ext_id), (ext_id, found, first.get(ext_id))
        seq = rtp.read_transport_seq(data, hdr, ext_id)
        if found is not None and found[1] >= 2:
            assert seq == int.from_bytes(data[found[0] : found[0] + 2])
        else:
            assert seq == -1
        level = rtp.read_audio_level(data, hdr, ext_id)
        assert level is None or 0 <= level[1] <= 127
        mid = rtp.read_sdes_extension(data, hdr, ext_id)
        assert mid is None or (mid.isascii() and 0 < len(mid) <= 255)
        rtp.read_dependency_descriptor(data, hdr, ext_id)
    vp8 = codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)
    if vp8 is not None:
        assert hdr.header_len < vp8.header_offset < hdr.payload_end
        for offset in (vp8.picture_id_offset, vp8.tl0picidx_offset, vp8.tid_offset):
            assert offset == -1 or hdr.header_len < offset < vp8.header_offset
    # The allocation-free inspector must read the descriptor exactly as the full parser.
    flags = codecs.inspector("vp8", "video")(data, hdr)
    assert bool(flags & codecs.KEYFRAME) == (vp8 is not None and vp8.keyframe)
    if vp8 is not None and vp8.start_of_partition and vp8.partition_id == 0:
        assert codecs.frame_offset(flags) == vp8.header_offset
    if vp8 is not None and vp8.tid >= 0:
        assert codecs.tid(flags) == vp8.tid
    for name in ("vp9", "h264", "av1", "opus"):
        flags = codecs.inspector(name, "audio" if name == "opus" else "video")(data, hdr)
        if flags & codecs.FRAME_START:
            assert hdr.header_len <= codecs.frame_offset(flags) <= hdr.payload_end
    return [(i, bytes(data[o : o + n])) for i, o, n in located]


def _check_rewrites(data: bytes, hdr: rtp.RtpHeader, elements: list[tuple[int, bytes]]) -> None:
    size = len(data)
    copy = rtp.rewritten_copy(data, _NEW_SSRC, _NEW_SEQ, _NEW_TS, _NEW_PT)
    assert len(copy) == size
    assert copy[0] == data[0]
    assert copy[12:] == data[12:]
    again = rtp.parse_header(copy)
    assert again is not None
    assert (again.header_len, again.payload_end, again.ext_start, again.ext_end) == (
        hdr.header_len,
        hdr.payload_end,
        hdr.ext_start,
        hdr.ext_end,
    )
    assert (again.ssrc, again.seq, again.timestamp, again.payload_type, again.marker) == (
        _NEW_SSRC,
        _NEW_SEQ & 0xFFFF,
        _NEW_TS & 0xFFFFFFFF,
        _NEW_PT,
        hdr.marker,
    )
    in_place = bytearray(data)
    rtp.rewrite_header(in_place, _NEW_SSRC, _NEW_SEQ, _NEW_TS, _NEW_PT)
    assert in_place == copy

    rfc8285 = hdr.ext_profile == rtp.PROFILE_ONE_BYTE or (
        hdr.ext_profile >= 0 and hdr.ext_profile & 0xFFF0 == rtp.PROFILE_TWO_BYTE
    )
    for mapping in _ID_MAPS:
        expected = _expected_after_map(elements, mapping)
        buf = bytearray(data)
        if rtp.remap_extension_ids(buf, hdr, rtp.id_map_list(mapping)):
            # Only the extension block may change, and it keeps its size.
            assert len(buf) == size
            assert buf[: hdr.ext_start] == data[: hdr.ext_start]
            assert buf[hdr.ext_end :] == data[hdr.ext_end :]
            assert _elements(buf, hdr) == (expected if rfc8285 else elements)
        for two_byte in (False, True):
            rebuilt = rtp.rebuild_extensions(data, hdr, mapping, two_byte)
            if rebuilt is None:
                continue
            new = rtp.parse_header(rebuilt)
            assert new is not None
            assert rebuilt[new.header_len :] == data[hdr.header_len :]
            assert _elements(rebuilt, new) == expected
            assert len(rebuilt) <= size + len(elements) + 3

    rtx = rtp.build_rtx(data, hdr, _RTX_SSRC, _RTX_SEQ, _RTX_PT)
    rtx_hdr = rtp.parse_header(rtx)
    assert rtx_hdr is not None
    assert not rtx_hdr.padding
    assert rtx_hdr.header_len == hdr.header_len
    assert rtx_hdr.payload_len == hdr.payload_len + 2
    original = rtp.rtx_to_original(rtx, rtx_hdr, hdr.ssrc, hdr.payload_type)
    expected_original = bytearray(data[: hdr.payload_end])
    expected_original[0] &= 0xDF  # the repaired packet carries no padding
    assert original == bytes(expected_original)
    # The input itself read as an RTX packet.
    repaired = rtp.rtx_to_original(data, hdr, 1, 96)
    assert repaired is None or len(repaired) <= size - 2


def run_rtp(data: bytes, out: Outcome) -> bool:
    hdr = rtp.parse_header(data)
    if hdr is None:
        out.refusals.append("parse_header: None")
        return False
    elements = _check_readers(data, hdr)
    _check_rewrites(data, hdr, elements)
    return True


# -- RTCP and transport-wide CC feedback --------------------------------------------------------


def _check_feedback(fb: twcc.TransportFeedback) -> None:
    assert len(fb.symbols) <= 0xFFFF
    assert all(0 <= s <= 3 for s in fb.symbols)
    with_delta = sum(1 for s in fb.symbols if s in (twcc.SMALL_DELTA, twcc.LARGE_DELTA))
    assert len(fb.deltas) == with_delta
    assert len(fb.arrivals_us()) == len(fb.symbols)


def run_rtcp(data: bytes, out: Outcome) -> bool:
    packets, ok = rtcp.parse_rtcp(data)
    words = len(data) // 4
    assert len(packets) <= words
    for packet in packets:
        if isinstance(packet, rtcp.Nack):
            # Every 4-byte PID/BLP pair names at most 17 sequence numbers.
            assert len(packet.seqs) <= 17 * words
            assert all(0 <= s <= 0xFFFF for s in packet.seqs)
        elif isinstance(packet, rtcp.TransportCC):
            assert packet.offset >= 12
            assert packet.offset + packet.length <= len(data)
            assert packet.length >= 8
            fb = twcc.parse_transport_feedback(data[packet.offset - 12 :])
            if fb is not None:
                assert len(fb.symbols) == packet.status_count
                _check_feedback(fb)
        elif isinstance(packet, rtcp.Bye):
            assert len(packet.ssrcs) <= 31
            assert len(packet.reason) <= 255
        elif isinstance(packet, rtcp.SenderReport | rtcp.ReceiverReport):
            assert len(packet.reports) <= 31
            assert all(-0x800000 <= r.packets_lost <= 0x7FFFFF for r in packet.reports)
        elif isinstance(packet, rtcp.Remb):
            assert packet.bitrate >= 0
            assert len(packet.ssrcs) <= 255
        elif isinstance(packet, rtcp.Fir):
            assert len(packet.entries) <= words
    fb = twcc.parse_transport_feedback(data)
    if fb is not None:
        # Whatever the TWCC decoder accepts, the RTCP parser reads as the same feedback.
        _check_feedback(fb)
        assert packets, "parse_transport_feedback accepted what parse_rtcp refused"
        first = packets[0]
        assert isinstance(first, rtcp.TransportCC)
        assert (first.sender_ssrc, first.media_ssrc, first.base_seq, first.status_count) == (
            fb.sender_ssrc,
            fb.media_ssrc,
            fb.base_seq,
            len(fb.symbols),
        )
        assert (first.reference_time, first.fb_pkt_count) == (fb.reference_time, fb.fb_count)
    if not ok:
        out.refusals.append("parse_rtcp: malformed")
    return ok


# -- DTLS ---------------------------------------------------------------------------------------

_PACK_MTU = 200


@cache
def _dtls_context() -> SSL.Context:
    return dtls.create_server_context(generators.dtls_certificate())


def run_dtls(data: bytes, out: Outcome) -> bool:
    records = dtls._split_records(data)
    if records is None:
        out.refusals.append("_split_records: None")
    else:
        assert b"".join(records) == data
        for record in records:
            assert len(record) == 13 + int.from_bytes(record[11:13])
    datagrams = dtls._pack_datagrams(data, _PACK_MTU)
    assert b"".join(datagrams) == data
    if records is not None:
        # Whole records only, and several only when they fit the MTU together.
        assert all(len(d) <= _PACK_MTU or dtls._split_records(d) == [d] for d in datagrams)
    server = dtls.DtlsServer(_dtls_context())
    sent = server.feed(data)
    assert all(isinstance(d, bytes) and 0 < len(d) <= server.mtu for d in sent)
    if not data or records is None or not 20 <= data[0] <= 63:
        assert server.malformed_datagrams == 1
        assert not sent
    if server.state is dtls.DtlsState.FAILED:
        out.refusals.append(f"DtlsServer: {server.failure_reason}")
    elif server.malformed_datagrams:
        out.refusals.append("DtlsServer: malformed datagram")
    return records is not None


# -- SDP offers and the answers built from them -------------------------------------------------

LOCAL = sdp.LocalTransport(
    "srvufrag", "serverpassword0123456789", generators.FINGERPRINT, [("203.0.113.7", 7882)]
)


@dataclass(frozen=True)
class _Published:
    """A published track as plan_subscriber sees one (sfu.control.negotiation.Track)."""

    kind: str
    codec: TrackCodec
    ext_ids: dict[str, int]


PUBLISHED = (
    _Published(
        "audio",
        TrackCodec("opus", 48000, 111, None, 2, "minptime=10;useinbandfec=1"),
        {sdp.EXT_AUDIO_LEVEL: 1, sdp.EXT_MID: 4},
    ),
    _Published(
        "video",
        TrackCodec("VP8", 90000, 96, 97),
        {sdp.EXT_MID: 4, sdp.EXT_DEPENDENCY_DESCRIPTOR: 12, sdp.EXT_TRANSPORT_CC: 3},
    ),
)


def _check_offer(offer: sdp.SessionDescription) -> None:
    """What the answer builders and the media plane read as numbers was checked at parse
    time, so reading it again cannot fail."""
    assert 1 <= len(offer.media) <= sdp.MAX_MEDIA_SECTIONS
    for m in offer.media:
        for codec in m.codecs():
            assert 0 <= codec.payload_type <= sdp.MAX_PAYLOAD_TYPE
            assert 1 <= codec.clock_rate <= sdp.MAX_CLOCK_RATE
            codec.apt  # noqa: B018
            codec.same_format(codec)
        assert all(1 <= i <= sdp.MAX_EXTENSION_ID for i in m.extmaps().values())
        assert all(0 <= s <= sdp.MAX_SSRC for s in m.ssrcs())
        for _, ids in m.ssrc_groups():
            assert all(0 <= s <= sdp.MAX_SSRC for s in ids)
        m.rids()
        sdp.usable_codecs(m)
        assert m.direction in ("sendrecv", "sendonly", "recvonly", "inactive")
        offer.setup(m)


def _check_answer(offer: sdp.SessionDescription, text: str, answer: str) -> None:
    # Our own answer must be SDP our own parser takes, section for section.
    parsed = sdp.parse_sdp(answer)
    assert len(parsed.media) == len(offer.media)
    for theirs, ours in zip(offer.media, parsed.media, strict=True):
        assert ours.kind == theirs.kind
        if not ours.rejected:
            assert ours.mid == theirs.mid
    # Bounded by what the offer carried: nothing is repeated per codec or per extension.
    assert len(answer) <= 2 * len(text) + 1024 * len(offer.media) + 512


def _publisher_answer(offer: sdp.SessionDescription, text: str, out: Outcome) -> bool:
    try:
        negotiation.require_dtls_offer(offer)
        plan = negotiation.plan_publisher(offer)
        first = next(m for m in offer.media if not m.rejected)
        offer.ice_credentials(first)
        algorithm, digest = offer.fingerprint(first)
    except (sdp.SdpError, negotiation.NegotiationError) as exc:
        return out.refuse(exc)
    try:
        dtls.Fingerprint(algorithm, digest)
    except ValueError as exc:  # sfu.media.dtls.Fingerprint documents ValueError
        return out.refuse(exc)
    assert 1 <= len(plan.tracks) <= len(offer.media)
    answer = negotiation.render_answer(offer, LOCAL, plan.answer_sections, 1)
    _check_answer(offer, text, answer)
    return True


def _subscriber_answer(offer: sdp.SessionDescription, text: str, out: Outcome) -> bool:
    try:
        negotiation.require_dtls_offer(offer)
        plan = negotiation.plan_subscriber(offer, PUBLISHED)
    except (sdp.SdpError, negotiation.NegotiationError) as exc:
        return out.refuse(exc)
    sections: list[tuple[sdp.MediaSection, list[str] | None]] = []
    for item in plan:
        if isinstance(item, sdp.MediaSection):
            sections.append((item, None))
        elif isinstance(item, tuple):
            sections.append(item)
        else:
            rtx_ssrc = 2222 if item.rtx_payload_type is not None else None
            lines = negotiation.subscriber_section_lines(item, "cam", 1111, rtx_ssrc, "cname")
            sections.append((item.section, lines))
    answer = negotiation.render_answer(offer, LOCAL, sections, 2)
    _check_answer(offer, text, answer)
    return True


def run_sdp(data: bytes, out: Outcome) -> bool:
    # surrogateescape: an offer inside a room-protocol JSON string can hold any code point,
    # lone surrogates included; invalid UTF-8 bytes become those.
    text = data.decode("utf-8", "surrogateescape")
    try:
        offer = sdp.parse_sdp(text)
    except sdp.SdpError as exc:
        return out.refuse(exc)
    _check_offer(offer)
    published = _publisher_answer(offer, text, out)
    subscribed = _subscriber_answer(offer, text, out)
    return published or subscribed


# -- Room protocol messages ---------------------------------------------------------------------

_PARSERS: tuple[Callable[[dict[str, object]], object], ...] = (
    messages.PublishOffer.parse,
    messages.SubscribeAnswer.parse,
    messages.Subscribe.parse,
    messages.Mute.parse,
    messages.Relay.parse,
    messages.Ping.parse,
    messages.IceCandidate.parse,
    messages.Leave.parse,
)


def run_messages(data: bytes, out: Outcome) -> bool:
    text = data.decode("utf-8", "surrogateescape")
    try:
        kind, fields = messages.decode(text)
    except ProtocolError as exc:
        return out.refuse(exc)
    assert fields["type"] == kind
    # Join is never refused by parsing (its docstring); its subscribe field is, later.
    join = messages.Join.parse(fields)
    try:
        messages.parse_tracks(join.subscribe)
    except ProtocolError as exc:
        out.refuse(exc)
    # Every parser on every message: a field's type must be checked whatever `type` says.
    for parse in _PARSERS:
        try:
            parsed = parse(fields)
        except ProtocolError as exc:
            out.refuse(exc)
            continue
        if isinstance(parsed, messages.Relay):
            assert parsed.payload
            assert parsed.to is None or isinstance(parsed.to, str)
        elif isinstance(parsed, messages.Subscribe):
            assert parsed.tracks == "all" or all(isinstance(t, str) for t in parsed.tracks)
    return True


# -- SFrame envelopes ---------------------------------------------------------------------------

_ENVELOPE_CODECS = ("vp8", "opus", "h264")


def _same_as_client(data: bytes, pos: int, end: int) -> None:
    """The server's key-free header reader and the client's decoder agree on every input."""
    server = parse_sframe_header(data, pos, end)
    try:
        header, after = sframe.decode_header(data[:end], pos)
        client: tuple[int, int, int] | None = (header.kid, header.ctr, after - pos)
    except sframe.SFrameError:
        client = None
    assert server == client, (pos, end, server, client)
    if server is not None:
        kid, ctr, length = server
        assert 1 <= length <= 17
        # Minimal encodings only, so the header re-encodes to exactly the bytes read.
        assert sframe.encode_header(kid, ctr) == data[pos : pos + length]


def run_envelope(data: bytes, out: Outcome) -> bool:
    if not data:
        return False
    for pos in range(min(len(data), 4)):
        _same_as_client(data, pos, len(data))
    judge = EnvelopeJudge(_ENVELOPE_CODECS[data[0] % len(_ENVELOPE_CODECS)])
    packets = 0
    pos = 1
    while pos + 2 <= len(data):
        size = int.from_bytes(data[pos : pos + 2])
        packet = data[pos + 2 : pos + 2 + size]
        pos += 2 + size
        hdr = rtp.parse_header(packet)
        if hdr is None:
            continue
        packets += 1
        kind = "audio" if judge.codec == "opus" else "video"
        judge.on_packet(packet, hdr, codecs.inspector(judge.codec, kind)(packet, hdr))
        for at in range(hdr.header_len, min(hdr.payload_end, hdr.header_len + 16) + 1):
            _same_as_client(packet, at, hdr.payload_end)
    assert judge.frames_judged <= packets
    assert judge.state in STATES
    return packets > 0


# -- JWT access tokens --------------------------------------------------------------------------

CONFIG = Config()
NOW = 1_700_000_000  # in the past: PyJWT checks iat against the real clock
_SECRET = DEV_API_SECRET.encode()
_TOKEN_ALPHABET = b"ABCabc012-_.=+/ \x00"


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def sign(header: bytes, payload: bytes) -> bytes:
    """An HS256 JWS over exactly these header and payload bytes, with the server's key:
    whatever they say, the signature is right."""
    signing_input = _b64(header) + b"." + _b64(payload)
    return signing_input + b"." + _b64(hmac.digest(_SECRET, signing_input, hashlib.sha256))


def _token(data: bytes) -> str:
    mode, rest = data[:1], data[1:]
    if mode == bytes((generators.JWT_SIGN,)):
        header, _, payload = rest.partition(b"\n")
        return sign(header, payload).decode()
    if mode == bytes((generators.JWT_EDIT,)) and len(rest) >= 3:
        header, _, payload = rest[3:].partition(b"\n")
        token = bytearray(sign(header, payload))
        token[int.from_bytes(rest[:2]) % len(token)] = _TOKEN_ALPHABET[
            rest[2] % len(_TOKEN_ALPHABET)
        ]
        return token.decode()
    # Header values and JSON strings can carry any code point, lone surrogates included.
    return rest.decode("utf-8", "surrogateescape")


def run_jwt(data: bytes, out: Outcome) -> bool:
    try:
        grants = auth.verify_token(CONFIG, _token(data), now=NOW)
    except auth.AuthError as exc:
        return out.refuse(exc)
    assert room_name_problem(grants.room) is None
    assert identity_problem(grants.identity) is None
    assert grants.name is None or display_name_problem(grants.name) is None
    assert isinstance(grants.can_publish, bool)
    assert isinstance(grants.can_subscribe, bool)
    assert math.isfinite(grants.expires_at)
    assert grants.expires_at + CONFIG.auth.clock_skew > NOW
    assert grants.api_key == DEV_API_KEY
    return True


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "stun",
            "sfu/media/stun.py",
            "StunError (parse and the value accessors)",
            generators.stun_message,
            run_stun,
        ),
        Target(
            "rtp",
            "sfu/media/rtp.py, keyframe detectors in sfu/media/producer.py",
            "none: readers return None (or stop iterating) on malformed input",
            generators.rtp_packet,
            run_rtp,
        ),
        Target(
            "rtcp",
            "sfu/media/rtcp.py, sfu/media/twcc.py",
            "none: parse_rtcp returns ok=False, parse_transport_feedback None",
            generators.rtcp_compound,
            run_rtcp,
        ),
        Target(
            "dtls",
            "sfu/media/dtls.py (record splitter, DtlsServer.feed)",
            "none: the splitter returns None, feed() counts the datagram as malformed",
            generators.dtls_datagram,
            run_dtls,
        ),
        Target(
            "sdp",
            "sfu/control/sdp.py, sfu/control/negotiation.py",
            "SdpError (parsing); NegotiationError (a well-formed offer that cannot be served)",
            generators.sdp_offer,
            run_sdp,
        ),
        Target(
            "messages",
            "sfu/control/rooms/messages.py",
            "ProtocolError",
            generators.room_message,
            run_messages,
        ),
        Target(
            "envelope",
            "sfu/media/envelope.py",
            "none: parse_sframe_header returns None, EnvelopeJudge never raises",
            generators.envelope_stream,
            run_envelope,
        ),
        Target(
            "jwt",
            "sfu/control/auth.py",
            "AuthError",
            lambda c: generators.jwt_input(c, NOW, DEV_API_KEY),
            run_jwt,
        ),
    )
}
