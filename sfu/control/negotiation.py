"""Offer/answer for WHIP publishers and WHEP subscribers (RFC 8829 rules, SFU choices).

Publisher: each audio/video m-section the SFU can forward is answered `recvonly` with exactly
one codec (the first forwardable one the publisher offered) plus its RTX, so subscribers know
precisely what bitstream they will get. Subscriber: each offered m-section is matched, in
order, to a published track of the same kind; the subscriber must offer the publisher's codec
(same format parameters), and gets it under its own payload type and extension ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sfu.control.problems import ApiError
from sfu.control.sdp import (
    EXT_ABS_SEND_TIME,
    EXT_MID,
    EXT_REPAIRED_RID,
    EXT_RID,
    EXT_TRANSPORT_CC,
    RTX_CODEC,
    Codec,
    LocalTransport,
    MediaSection,
    SdpError,
    SessionDescription,
    codec_lines,
    media_fb,
    rejected_section,
    render,
    session_header,
    transport_lines,
    usable_codecs,
)
from sfu.media.producer import TrackCodec

# Describe the publisher's own hop, never forwarded. transport-cc is negotiated with
# publishers (the SFU sends them transport-wide feedback, sfu/media/twcc.py); abs-send-time
# is not (it only serves REMB, which the SFU does not send).
HOP_BY_HOP_EXTENSIONS = frozenset({EXT_TRANSPORT_CC, EXT_ABS_SEND_TIME})
NOT_NEGOTIATED_WITH_PUBLISHERS = frozenset({EXT_ABS_SEND_TIME})
# Identify a stream on the publisher's transport; subscribers are told SSRCs instead.
# (A subscriber that negotiates transport-cc gets the publisher's element renamed to its own
# id, but never its value: the SFU stamps its own numbers there, see subscriber_transport_cc.)
NOT_FORWARDED_EXTENSIONS = HOP_BY_HOP_EXTENSIONS | {EXT_MID, EXT_RID, EXT_REPAIRED_RID}
SUPPORTED_NAMES = "Opus, VP8, VP9, H.264, AV1"
# Simulcast layers accepted per video track (RFC 8853); more are left out of the answer.
MAX_SIMULCAST_LAYERS = 3


class NegotiationError(ApiError):
    """The offer is well-formed but cannot be served; `code` is a documented problem code."""


@dataclass(frozen=True)
class PublishedTrack:
    kind: str
    mid: str
    codec: TrackCodec
    ext_ids: dict[str, int]
    ssrc: int | None
    rtx_ssrc: int | None
    # Simulcast layers by RID, lowest first (the order of the offer's a=simulcast:send);
    # empty: one stream.
    rids: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublisherPlan:
    tracks: list[PublishedTrack]
    answer_sections: list[tuple[MediaSection, list[str] | None]]  # None: rejected


def _bundle_mids(offer: SessionDescription) -> list[str]:
    for name, value in offer.attributes:
        # `a=group:` may have no value, or only spaces.
        parts = value.split() if name == "group" and value else []
        if parts[:1] == ["BUNDLE"]:
            return parts[1:]
    return []


def _check_bundle(offer: SessionDescription, accepted: Sequence[MediaSection]) -> None:
    if len(accepted) > 1:
        bundled = set(_bundle_mids(offer))
        if not all(m.mid in bundled for m in accepted):
            raise NegotiationError(
                400, "bundle_required", "offers with several media sections must BUNDLE them"
            )
    for m in accepted:
        if not m.mid:
            raise NegotiationError(400, "invalid_sdp", f"m={m.kind} section has no a=mid")


def _declared_ssrcs(m: MediaSection) -> tuple[int | None, int | None]:
    for semantics, ids in m.ssrc_groups():
        if semantics == "FID" and len(ids) == 2:
            return ids[0], ids[1]
    ssrcs = m.ssrcs()
    return (ssrcs[0] if ssrcs else None), None


def plan_publisher(offer: SessionDescription) -> PublisherPlan:
    tracks: list[PublishedTrack] = []
    sections: list[tuple[MediaSection, list[str] | None]] = []
    unusable: list[str] = []
    for m in offer.media:
        sends = m.direction in ("sendonly", "sendrecv")
        if m.kind not in ("audio", "video") or m.rejected or not sends:
            sections.append((m, None))
            continue
        codecs = usable_codecs(m)
        media = [c for c in codecs if c.key != RTX_CODEC]
        if not media:
            offered = ", ".join(sorted({c.name for c in m.codecs()})) or "none"
            unusable.append(f"m={m.kind} (mid {m.mid}) offers {offered}")
            sections.append((m, None))
            continue
        primary = media[0]
        rtx = next(
            (c for c in codecs if c.key == RTX_CODEC and c.apt == primary.payload_type), None
        )
        ext_ids = {
            uri: ext_id
            for uri, ext_id in m.extmaps().items()
            if uri not in NOT_NEGOTIATED_WITH_PUBLISHERS
        }
        ssrc, rtx_ssrc = _declared_ssrcs(m)
        rids = _simulcast_rids(m, ext_ids)
        if rids:
            ssrc = rtx_ssrc = None  # each layer's SSRC is learnt from its RID extension
        mid = m.mid or ""
        tracks.append(
            PublishedTrack(
                kind=m.kind,
                mid=mid,
                codec=TrackCodec(
                    name=primary.name,
                    clock_rate=primary.clock_rate,
                    payload_type=primary.payload_type,
                    rtx_payload_type=rtx.payload_type if rtx else None,
                    channels=primary.channels,
                    fmtp=primary.fmtp,
                ),
                ext_ids=ext_ids,
                ssrc=ssrc,
                rtx_ssrc=rtx_ssrc if rtx else None,
                rids=rids,
            )
        )
        answer_codecs = [_with_fb(primary, _publisher_fb(primary, ext_ids))]
        if rtx is not None:
            answer_codecs.append(_with_fb(rtx, []))
        lines = [f"a=extmap:{i} {uri}" for uri, i in ext_ids.items()]
        lines += codec_lines(answer_codecs)
        if rids:
            lines += [f"a=rid:{rid} recv" for rid in rids]
            lines.append("a=simulcast:recv " + ";".join(rids))
        sections.append((m, [*lines, "a=recvonly"]))
    if not tracks:
        reason = "; ".join(unusable) or "no sendonly/sendrecv audio or video section"
        raise NegotiationError(
            400,
            "no_usable_media",
            f"the offer has nothing the SFU can forward ({reason}); supported: {SUPPORTED_NAMES}",
        )
    _check_bundle(offer, [m for m, lines in sections if lines is not None])
    return PublisherPlan(tracks, sections)


def _simulcast_rids(m: MediaSection, ext_ids: dict[str, int]) -> tuple[str, ...]:
    """The simulcast layers the SFU accepts for this section: video only, at most
    MAX_SIMULCAST_LAYERS, and only when the RID header extension is negotiated (without it
    the layers' SSRCs could not be told apart). Declined, a browser sends its first
    encoding only."""
    if m.kind != "video" or EXT_RID not in ext_ids:
        return ()
    rids = m.simulcast_send()
    return tuple(rids[:MAX_SIMULCAST_LAYERS]) if len(rids) > 1 else ()


def _publisher_fb(codec: Codec, ext_ids: dict[str, int]) -> list[str]:
    """rtcp-fb answered to a publisher: what the SFU honours both ways, plus transport-cc when
    the publisher offered it with its extension — the SFU then sends it transport-wide
    feedback (sfu/media/twcc.py). Never goog-remb: the SFU sends no REMB."""
    fb = media_fb(codec)
    if EXT_TRANSPORT_CC in ext_ids and any(f.lower() == "transport-cc" for f in codec.rtcp_fb):
        fb.append("transport-cc")
    return fb


def _with_fb(codec: Codec, rtcp_fb: list[str]) -> Codec:
    return Codec(
        codec.payload_type, codec.name, codec.clock_rate, codec.channels, codec.fmtp, rtcp_fb
    )


def render_answer(
    offer: SessionDescription,
    local: LocalTransport,
    sections: Sequence[tuple[MediaSection, list[str] | None]],
    session_id: int,
) -> str:
    lines = session_header(session_id)
    accepted = [m.mid for m, body in sections if body is not None and m.mid]
    if accepted:
        lines.append("a=group:BUNDLE " + " ".join(accepted))
    if any(name == "extmap-allow-mixed" for name, _ in offer.attributes):
        lines.append("a=extmap-allow-mixed")
    for m, body in sections:
        if body is None:
            lines += rejected_section(m)
            continue
        formats = [line.split()[0].split(":")[1] for line in body if line.startswith("a=rtpmap:")]
        lines.append(f"m={m.kind} 9 {m.proto} {' '.join(formats)}")
        lines.append("c=IN IP4 0.0.0.0")
        # Only a section answered inactive can lack a mid (_check_bundle requires one of the
        # others); the answer mirrors the offer rather than inventing "None".
        if m.mid is not None:
            lines.append(f"a=mid:{m.mid}")
        lines += transport_lines(local, offer, m)
        lines += body
    return render(lines)


# ---------------------------------------------------------------------------------------------
# Subscribers


@dataclass(frozen=True)
class SubscribedTrack:
    section: MediaSection
    track_index: int  # which published track (index into the publication's tracks)
    payload_type: int
    rtx_payload_type: int | None
    codec: Codec  # the subscriber's entry for the publisher's codec
    ext_map: dict[int, int]  # publisher id -> subscriber id
    ext_lines: list[str]
    # The subscriber's transport-cc id when it negotiated it (the SFU then stamps its own
    # transport-wide numbers and estimates its bandwidth), else 0.
    transport_cc: int = 0


class Track(Protocol):
    """What matching needs of a published track (a ProducerInfo has these)."""

    @property
    def kind(self) -> str: ...
    @property
    def codec(self) -> TrackCodec: ...
    @property
    def ext_ids(self) -> Mapping[str, int]: ...


def _inactive_body(m: MediaSection) -> list[str] | None:
    """Answer lines for a section with nothing to send: kept in the bundle as inactive, which
    every stack accepts (aiortc, for one, refuses a rejected section's missing attributes)."""
    codecs = [c for c in m.codecs() if c.key != RTX_CODEC]
    if not codecs:
        return None
    return [*codec_lines([_with_fb(codecs[0], [])]), "a=inactive"]


PlanItem = SubscribedTrack | MediaSection | tuple[MediaSection, list[str]]


def plan_subscriber(offer: SessionDescription, published: Sequence[Track]) -> list[PlanItem]:
    """Match each offered section to a track. Besides SubscribedTrack, an item is a bare
    MediaSection (declined) or (section, answer lines) for an inactive one."""
    plan: list[PlanItem] = []
    used: set[int] = set()
    for m in offer.media:
        receives = m.direction in ("recvonly", "sendrecv")
        index = next(
            (
                i
                for i, track in enumerate(published)
                if i not in used and track.kind == m.kind and receives and not m.rejected
            ),
            None,
        )
        if index is None:
            inactive = _inactive_body(m) if receives and not m.rejected else None
            plan.append((m, inactive) if inactive is not None else m)
            continue
        track = published[index]
        offered = m.codecs()
        wanted = Codec(
            0, track.codec.name, track.codec.clock_rate, track.codec.channels, track.codec.fmtp
        )
        match = next((c for c in offered if c.key != RTX_CODEC and c.same_format(wanted)), None)
        if match is None:
            fmtp = f" ({track.codec.fmtp})" if track.codec.fmtp else ""
            raise NegotiationError(
                406,
                "codec_not_offered",
                f"the stream's {m.kind} is {track.codec.name}/{track.codec.clock_rate}{fmtp}, "
                f"which the offer's m={m.kind} section (mid {m.mid}) does not include; the SFU "
                "forwards the publisher's codec as is and cannot transcode",
            )
        rtx = next((c for c in offered if c.key == RTX_CODEC and c.apt == match.payload_type), None)
        sub_ext = m.extmaps()
        ext_map = {
            track.ext_ids[uri]: sub_id
            for uri, sub_id in sub_ext.items()
            if uri in track.ext_ids and uri not in NOT_FORWARDED_EXTENSIONS
        }
        ext_lines = [
            f"a=extmap:{sub_id} {uri}"
            for uri, sub_id in sub_ext.items()
            if uri in track.ext_ids and uri not in NOT_FORWARDED_EXTENSIONS
        ]
        transport_cc = subscriber_transport_cc(sub_ext, match)
        if transport_cc:
            ext_lines.append(f"a=extmap:{transport_cc} {EXT_TRANSPORT_CC}")
            publisher_id = track.ext_ids.get(EXT_TRANSPORT_CC)
            if publisher_id is not None:
                # The publisher's element is the slot the SFU's own number goes into.
                ext_map[publisher_id] = transport_cc
        used.add(index)
        plan.append(
            SubscribedTrack(
                section=m,
                track_index=index,
                payload_type=match.payload_type,
                rtx_payload_type=rtx.payload_type if rtx else None,
                codec=_with_fb(match, media_fb(match) + (["transport-cc"] if transport_cc else [])),
                ext_map=ext_map,
                ext_lines=ext_lines,
                transport_cc=transport_cc,
            )
        )
    if not any(isinstance(p, SubscribedTrack) for p in plan):
        kinds = ", ".join(sorted({t.kind for t in published}))
        raise NegotiationError(
            400,
            "no_matching_media",
            f"the offer has no recvonly/sendrecv section for the stream's tracks ({kinds})",
        )
    _check_bundle(offer, [p.section for p in plan if isinstance(p, SubscribedTrack)])
    return plan


def subscriber_transport_cc(ext_ids: dict[str, int], codec: Codec) -> int:
    """The subscriber's transport-cc extension id if it offers (or answers) both the
    extension and `a=rtcp-fb:<pt> transport-cc` for the codec it gets, else 0.

    With it the SFU is the sender of a transport-wide sequence (draft-holmer-rmcat-
    transport-wide-cc-extensions-01): it stamps its own numbers into the 2-byte slot each
    forwarded packet carries (the publisher's element, renamed in place) and estimates the
    subscriber's bandwidth from the feedback (sfu/media/bwe.py). Ids above 14 work too: the
    copy is then rebuilt in the two-byte form, as for any such id."""
    ext_id = ext_ids.get(EXT_TRANSPORT_CC, 0)
    if not 0 < ext_id < 256 or not any(f.lower() == "transport-cc" for f in codec.rtcp_fb):
        return 0
    return ext_id


def subscriber_section_lines(
    sub: SubscribedTrack, stream: str, ssrc: int, rtx_ssrc: int | None, cname: str
) -> list[str]:
    track_id = f"{sub.section.kind}-{sub.section.mid}"
    codecs = [sub.codec]
    if sub.rtx_payload_type is not None:
        codecs.append(
            Codec(
                sub.rtx_payload_type, "rtx", sub.codec.clock_rate, None, f"apt={sub.payload_type}"
            )
        )
    lines = [*sub.ext_lines, *codec_lines(codecs), "a=sendonly", f"a=msid:{stream} {track_id}"]
    if rtx_ssrc is not None:
        lines.append(f"a=ssrc-group:FID {ssrc} {rtx_ssrc}")
    for one in [ssrc] + ([rtx_ssrc] if rtx_ssrc is not None else []):
        lines.append(f"a=ssrc:{one} cname:{cname}")
        lines.append(f"a=ssrc:{one} msid:{stream} {track_id}")
    return lines


def require_dtls_offer(offer: SessionDescription) -> None:
    """What any offer must be for the SFU to answer it, checked before anything is created
    for it (a refusal later would leave a half-made session holding the stream name)."""
    for m in offer.media:
        if m.rejected:
            continue
        if m.kind in ("audio", "video") and "SAVPF" not in m.proto:
            raise SdpError(f"m={m.kind} uses {m.proto}; WebRTC needs UDP/TLS/RTP/SAVPF")
        if offer.setup(m) == "passive":
            raise SdpError(
                f"m={m.kind} has a=setup:passive; the SFU is always the DTLS server, so an "
                "offer must say a=setup:actpass or a=setup:active"
            )
