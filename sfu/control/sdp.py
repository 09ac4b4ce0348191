"""SDP (RFC 8866) parsing that keeps every attribute, and the answers an SFU gives.

The SFU forwards what a publisher sends to subscribers that negotiated their own payload types
and extension ids, so it must keep what it does not itself consume: every `a=extmap` (the AV1
dependency descriptor included), `a=rid`/`a=simulcast`, `a=fmtp`, `a=rtcp-fb`,
`a=ssrc-group`. Attributes are stored in order as (name, value) pairs and never dropped.

Codec choice never depends on what a decoder could handle (the SFU has none): a subscriber
gets the publisher's codec, or a clear error saying which one it lacks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_MEDIA_SECTIONS = 32
MAX_PAYLOAD_TYPE = 127  # 7 bits in the RTP header (RFC 3550 §5.1)
# RTP clocks in use are 8-90 kHz; the bound keeps timestamp arithmetic within 32 bits.
MAX_CLOCK_RATE = 1_000_000

# Codecs whose payload the SFU forwards untouched (RFC 7587, 7741, 9628, 6184, AV1 RTP spec).
FORWARDABLE_CODECS = {
    "opus": "audio",
    "vp8": "video",
    "vp9": "video",
    "h264": "video",
    "av1": "video",
}
RTX_CODEC = "rtx"

EXT_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
EXT_RID = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
EXT_REPAIRED_RID = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
EXT_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
EXT_TRANSPORT_CC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
EXT_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
EXT_DEPENDENCY_DESCRIPTOR = (
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension"
)
# Extensions a subscriber's stream can carry unchanged from the publisher's packets. MID is
# rewritten per subscriber; transport-cc and abs-send-time describe the publisher's hop, and
# forwarding them would mislead the subscriber's congestion control, so they are not offered.
FORWARDED_EXTENSIONS = (EXT_MID, EXT_AUDIO_LEVEL, EXT_DEPENDENCY_DESCRIPTOR)


class SdpError(ValueError):
    """The SDP cannot be used; the message says where and why (shown to the client)."""


@dataclass
class Codec:
    payload_type: int
    name: str
    clock_rate: int
    channels: int | None = None
    fmtp: str | None = None
    rtcp_fb: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def apt(self) -> int | None:
        """For RTX: the payload type it repairs (RFC 4588 §8.6)."""
        match = re.search(r"(?:^|;)\s*apt=(\d{1,3})(?!\d)", self.fmtp or "")
        return int(match.group(1)) if match else None

    def fmtp_params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        for part in (self.fmtp or "").split(";"):
            name, eq, value = part.strip().partition("=")
            if name:
                params[name.lower()] = value.strip() if eq else ""
        return params

    def same_format(self, other: Codec) -> bool:
        """Whether a decoder for `other` can take this codec's bitstream as it is."""
        if (self.key, self.clock_rate) != (other.key, other.clock_rate):
            return False
        if self.key == "opus":
            return (self.channels or 1) == (other.channels or 1)
        mine, theirs = self.fmtp_params(), other.fmtp_params()
        if self.key == "h264":
            # profile_idc and constraint flags must match; the level may differ (RFC 6184 §8.2.2).
            return (
                mine.get("packetization-mode", "0") == theirs.get("packetization-mode", "0")
                and mine.get("profile-level-id", "42001f")[:4].lower()
                == theirs.get("profile-level-id", "42001f")[:4].lower()
            )
        if self.key == "vp9":
            return mine.get("profile-id", "0") == theirs.get("profile-id", "0")
        if self.key == "av1":
            return mine.get("profile", "0") == theirs.get("profile", "0")
        return True


@dataclass
class MediaSection:
    kind: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    other_lines: list[str] = field(default_factory=list)  # c=, b=, i=, k= kept verbatim

    def values(self, name: str) -> list[str]:
        return [v or "" for k, v in self.attributes if k == name]

    def value(self, name: str) -> str | None:
        for key, val in self.attributes:
            if key == name:
                return val or ""
        return None

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)

    @property
    def mid(self) -> str | None:
        return self.value("mid")

    @property
    def direction(self) -> str:
        for key, _ in self.attributes:
            if key in ("sendrecv", "sendonly", "recvonly", "inactive"):
                return key
        return "sendrecv"

    @property
    def rejected(self) -> bool:
        # RFC 8843 §7.3.3: port 0 with a=bundle-only is an offer to share the BUNDLE
        # transport (webrtcbin's and whipsink's max-bundle offers), not a rejection.
        return self.port == 0 and not self.has("bundle-only")

    def codecs(self) -> list[Codec]:
        """Payload formats with their rtpmap, fmtp and rtcp-fb, in the m-line's order."""
        by_pt: dict[int, Codec] = {}
        for value in self.values("rtpmap"):
            match = re.fullmatch(r"(\d{1,3})\s+([^/\s]+)/(\d{1,10})(?:/(\d{1,2}))?", value.strip())
            if not match:
                raise SdpError(
                    f"m={self.kind[:20]}: malformed a=rtpmap:{value[:60]} "
                    "(expected <payload type> <codec>/<clock rate>[/<channels>])"
                )
            pt = int(match.group(1))
            if pt > MAX_PAYLOAD_TYPE:
                raise SdpError(
                    f"m={self.kind[:20]}: payload type {pt} is outside 0-{MAX_PAYLOAD_TYPE}"
                )
            clock_rate = int(match.group(3))
            if not 1 <= clock_rate <= MAX_CLOCK_RATE:
                raise SdpError(
                    f"m={self.kind[:20]}: clock rate {clock_rate} of payload type {pt} is "
                    f"outside 1-{MAX_CLOCK_RATE}"
                )
            channels = int(match.group(4)) if match.group(4) else None
            by_pt[pt] = Codec(pt, match.group(2), clock_rate, channels)
        for value in self.values("fmtp"):
            pt_text, _, params = value.partition(" ")
            if _is_decimal(pt_text) and int(pt_text) in by_pt:
                by_pt[int(pt_text)].fmtp = params.strip()
        for value in self.values("rtcp-fb"):
            pt_text, _, fb = value.partition(" ")
            if pt_text == "*":
                for codec in by_pt.values():
                    codec.rtcp_fb.append(fb.strip())
            elif _is_decimal(pt_text) and int(pt_text) in by_pt:
                by_pt[int(pt_text)].rtcp_fb.append(fb.strip())
        ordered = []
        for fmt in self.formats:
            if _is_decimal(fmt) and int(fmt) in by_pt:
                ordered.append(by_pt[int(fmt)])
        return ordered

    def extmaps(self) -> dict[str, int]:
        """Extension URI -> id as negotiated in this section (RFC 8285 §5)."""
        out: dict[str, int] = {}
        for value in self.values("extmap"):
            match = re.fullmatch(r"(\d+)(?:/\w+)?\s+(\S+).*", value.strip())
            if match:
                out[match.group(2)] = int(match.group(1))
        return out

    def ssrcs(self) -> list[int]:
        """SSRCs declared by a=ssrc lines, in order, without repeats."""
        seen: list[int] = []
        for value in self.values("ssrc"):
            head = value.split(" ", 1)[0]
            if _is_decimal(head) and int(head) not in seen:
                seen.append(int(head))
        return seen

    def ssrc_groups(self) -> list[tuple[str, list[int]]]:
        groups = []
        for value in self.values("ssrc-group"):
            parts = value.split()
            if not parts:
                raise SdpError(f"m={self.kind[:20]}: a=ssrc-group has no semantics")
            semantics, *ids = parts
            groups.append((semantics, [_number(i, "a=ssrc-group SSRC", MAX_SSRC) for i in ids]))
        return groups

    def rids(self, direction: str = "send") -> list[str]:
        return [
            v.split()[0]
            for v in self.values("rid")
            if len(v.split()) >= 2 and v.split()[1] == direction
        ]

    def simulcast_send(self) -> list[str]:
        """The RIDs of `a=simulcast:send` (RFC 8853 section 5.1), in the offer's order, each
        layer's first alternative, a paused mark (`~`) dropped; only RIDs that also have an
        `a=rid:<id> send` line (section 5.2 requires it). Empty without simulcast."""
        declared = set(self.rids("send"))
        for value in self.values("simulcast"):
            parts = value.split()
            for direction, layers in zip(parts[::2], parts[1::2], strict=False):
                if direction != "send":
                    continue
                rids = []
                for layer in layers.split(";"):
                    first = layer.split(",")[0].removeprefix("~")
                    if first in declared and first not in rids:
                        rids.append(first)
                return rids
        return []


@dataclass
class SessionDescription:
    lines_before_media: list[str]
    attributes: list[tuple[str, str | None]]
    media: list[MediaSection]

    def session_value(self, name: str) -> str | None:
        for key, value in self.attributes:
            if key == name:
                return value or ""
        return None

    def ice_credentials(self, section: MediaSection) -> tuple[str, str]:
        ufrag = section.value("ice-ufrag") or self.session_value("ice-ufrag")
        pwd = section.value("ice-pwd") or self.session_value("ice-pwd")
        if not ufrag or not pwd:
            raise SdpError("offer has no a=ice-ufrag / a=ice-pwd")
        return ufrag, pwd

    def fingerprint(self, section: MediaSection) -> tuple[str, str]:
        value = section.value("fingerprint") or self.session_value("fingerprint")
        if not value or " " not in value.strip():
            raise SdpError("offer has no a=fingerprint (DTLS is required)")
        algorithm, _, digest = value.strip().partition(" ")
        if algorithm.lower() not in ("sha-1", "sha-224", "sha-256", "sha-384", "sha-512"):
            raise SdpError(f"a=fingerprint uses an unsupported hash {algorithm!r}")
        if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+", digest.strip()):
            raise SdpError("a=fingerprint digest is not colon-separated hex")
        return algorithm.lower(), digest.strip().upper()

    def setup(self, section: MediaSection) -> str:
        return (section.value("setup") or self.session_value("setup") or "actpass").lower()


def parse_sdp(text: str) -> SessionDescription:
    """Parse an offer; SdpError names the first line that cannot be understood."""
    lines = [line for line in re.split(r"\r?\n", text) if line.strip()]
    if not lines or not lines[0].startswith("v=0"):
        raise SdpError("not an SDP body (expected it to start with v=0)")
    before: list[str] = []
    session_attrs: list[tuple[str, str | None]] = []
    media: list[MediaSection] = []
    for number, line in enumerate(lines, start=1):
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"line {number}: expected <type>=<value>, got {line[:40]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            media.append(_media_line(value, number))
            if len(media) > MAX_MEDIA_SECTIONS:
                raise SdpError(f"more than {MAX_MEDIA_SECTIONS} media sections")
        elif kind == "a":
            name, colon, rest = value.partition(":")
            attr = (name, rest if colon else None)
            (media[-1].attributes if media else session_attrs).append(attr)
        elif media:
            media[-1].other_lines.append(line)
        else:
            before.append(line)
    if not media:
        raise SdpError("offer has no media sections (m= lines)")
    for m in media:
        _check_section(m)
    return SessionDescription(before, session_attrs, media)


MAX_SSRC = 0xFFFFFFFF
MAX_EXTENSION_ID = 255  # RFC 8285 two-byte form; 1-14 in the one-byte form


def _is_decimal(text: str) -> bool:
    # str.isdigit() also accepts digits int() refuses, such as "²".
    return text.isascii() and text.isdigit()


def _number(text: str, what: str, high: int, low: int = 0) -> int:
    """A decimal field within [low, high]: anything else is the client's error, caught here
    once so that no later int() or struct.pack sees a value it cannot take."""
    if not _is_decimal(text) or len(text) > 10:
        raise SdpError(f"{what} {text[:20]!r} is not a number in {low}-{high}")
    value = int(text)
    if not low <= value <= high:
        raise SdpError(f"{what} {value} is outside {low}-{high}")
    return value


def _check_section(m: MediaSection) -> None:
    """Everything the answer builders and the media plane later read as numbers is checked
    at parse time, so a bad offer is refused before any session or transport exists."""
    where = f"m={m.kind[:20]}"
    if "RTP/" in m.proto.upper():
        for fmt in m.formats:
            _number(fmt, f"{where}: payload type", MAX_PAYLOAD_TYPE)
    m.codecs()  # rtpmap shape and ranges
    for name in ("fmtp", "rtcp-fb"):
        for value in m.values(name):
            pt_text = value.partition(" ")[0]
            if pt_text != "*":
                _number(pt_text, f"{where}: a={name} payload type", MAX_PAYLOAD_TYPE)
    for value in m.values("extmap"):
        match = re.fullmatch(r"(\d+)(?:/\w+)?\s+\S+.*", value.strip())
        if not match:
            raise SdpError(f"{where}: malformed a=extmap:{value[:60]}")
        _number(match.group(1), f"{where}: a=extmap id", MAX_EXTENSION_ID, low=1)
    for value in m.values("ssrc"):
        _number(value.split(" ", 1)[0], f"{where}: a=ssrc", MAX_SSRC)
    m.ssrc_groups()


def _media_line(value: str, number: int) -> MediaSection:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError(f"line {number}: malformed m= line {value[:60]!r}")
    port = _number(parts[1].split("/")[0], f"line {number}: m= port", 65535)
    return MediaSection(parts[0], port, parts[2], parts[3:])


# ---------------------------------------------------------------------------------------------
# Answers


@dataclass(frozen=True)
class LocalTransport:
    """What the media plane offers for one client transport."""

    ice_ufrag: str
    ice_pwd: str
    fingerprint: str  # "sha-256 AB:CD:..."
    candidates: Sequence[tuple[str, int]]  # (ip, port) host candidates, announced or bound


def candidate_lines(candidates: Iterable[tuple[str, int]]) -> list[str]:
    lines = []
    for index, (ip, port) in enumerate(candidates, start=1):
        # Host candidates only: the SFU has a public (announced) address. Priority per
        # RFC 8445 §5.1.2.1 with type preference 126 (host) and decreasing local preference.
        priority = (126 << 24) | ((65535 - index) << 8) | 255
        lines.append(f"a=candidate:{index} 1 udp {priority} {ip} {port} typ host")
    return lines


def session_header(session_id: int) -> list[str]:
    return [
        "v=0",
        f"o=- {session_id} 1 IN IP4 0.0.0.0",
        "s=blindfold",
        "t=0 0",
        "a=ice-lite",
        "a=msid-semantic: WMS *",
    ]


def transport_lines(local: LocalTransport, offer: SessionDescription, m: MediaSection) -> list[str]:
    lines = [
        f"a=ice-ufrag:{local.ice_ufrag}",
        f"a=ice-pwd:{local.ice_pwd}",
        f"a=fingerprint:{local.fingerprint}",
        # The client connects to us: ICE-lite can't be the DTLS client reliably (it sends no
        # checks, so it may not know the client's address when it would have to start).
        "a=setup:passive",
    ]
    if offer.setup(m) == "passive":
        raise SdpError("offer has a=setup:passive; the SFU is always the DTLS server")
    lines.append("a=rtcp-mux")
    if m.has("rtcp-rsize"):
        lines.append("a=rtcp-rsize")
    lines += candidate_lines(local.candidates)
    lines.append("a=end-of-candidates")
    return lines


def codec_lines(codecs: Sequence[Codec]) -> list[str]:
    lines = []
    for codec in codecs:
        channels = f"/{codec.channels}" if codec.channels else ""
        lines.append(f"a=rtpmap:{codec.payload_type} {codec.name}/{codec.clock_rate}{channels}")
        for fb in codec.rtcp_fb:
            lines.append(f"a=rtcp-fb:{codec.payload_type} {fb}")
        if codec.fmtp:
            lines.append(f"a=fmtp:{codec.payload_type} {codec.fmtp}")
    return lines


def render(lines: Iterable[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


def rejected_section(m: MediaSection) -> list[str]:
    """An m-section the answer declines (port 0, RFC 8843 keeps its mid)."""
    lines = [f"m={m.kind} 0 {m.proto} {' '.join(m.formats)}", "c=IN IP4 0.0.0.0"]
    if m.mid is not None:
        lines.append(f"a=mid:{m.mid}")
    lines.append("a=inactive")
    return lines


def usable_codecs(m: MediaSection) -> list[Codec]:
    """The offered codecs the SFU can forward, with the RTX entries that repair them."""
    codecs = m.codecs()
    media = [c for c in codecs if FORWARDABLE_CODECS.get(c.key) == m.kind]
    wanted = {c.payload_type for c in media}
    rtx = [c for c in codecs if c.key == RTX_CODEC and c.apt in wanted]
    return media + rtx


def media_fb(codec: Codec) -> list[str]:
    """rtcp-fb the SFU honours itself in both directions: NACK (served from cache), PLI/FIR;
    not REMB. transport-cc is added where it is negotiated (negotiation.py)."""
    keep = {"nack", "nack pli", "ccm fir"}
    return [fb for fb in codec.rtcp_fb if fb.lower() in keep]
