"""The subscriber side of a room participant: the SFU offers, the client answers.

One transport per participant carries every track it subscribes to, one m-section per track.
Tracks come and go, so the SFU renegotiates. A section whose track ended is *retired*: offered
`a=inactive`, still inside the BUNDLE group, never rejected with port 0 — rejecting the section
that tags the BUNDLE group makes the client tear down the one transport every stream shares.
Once the client has answered a retirement, the section is free and, for a client that said it
can take one (`reuse_sections` in its join), the next track of the same kind reuses it (same
mid, new SSRC and msid), so sections do not pile up over a long call.
Sections are never reordered or removed, as offer/answer requires (RFC 8829 §5.2.2). The SFU
offers each track with the publisher's own payload type and extension ids, so forwarding needs
no payload-type rewrite; a client that cannot decode the codec rejects the section (port 0 in
its answer) and is told so; such a section stays rejected.

Transport-cc is offered on every section under one id for the whole transport (the first
publisher's own id when it fits the one-byte form, so Chrome's copies need no rename): a
client that answers it gets the SFU's own transport-wide numbers in each copy's slot, and its
feedback drives the media plane's bandwidth estimate for the transport. A later track whose
publisher uses that id for another extension goes without that extension.

A new section's subscription stays paused until the client's answer arrives: before that the
client does not know the SSRC and could mis-route the packets by payload type.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

from sfu.control.negotiation import NOT_FORWARDED_EXTENSIONS, subscriber_transport_cc
from sfu.control.sdp import (
    EXT_TRANSPORT_CC,
    Codec,
    LocalTransport,
    MediaSection,
    SdpError,
    candidate_lines,
    codec_lines,
    parse_sdp,
    render,
)
from sfu.media.api import MediaApi, ProducerInfo, SubscriptionInfo

SUBSCRIBER_FEEDBACK = ["nack", "nack pli", "ccm fir"]


@dataclass(eq=False)
class OfferedTrack:
    mid: str
    kind: str
    producer: ProducerInfo
    stream: str
    subscription: SubscriptionInfo
    ended: bool = False
    accepted: bool = False
    # The client's answer said port 0: the section is out of the BUNDLE group for good.
    rejected: bool = False
    # Offer versions in which the section first carried this track, and first showed it retired;
    # an answer only concerns what the offer it answers contained.
    offered_in: int | None = None
    retired_in: int | None = None
    # The client answered the retirement: the section may carry a new track.
    free: bool = False


@dataclass(eq=False)
class SubscriberOffers:
    """The m-sections offered so far, in order, and the offer/answer state. Subscriptions
    are made paused (the hub does that) and started here when the answer arrives."""

    local: LocalTransport
    media: MediaApi
    transport_id: str
    session_id: int = field(default_factory=lambda: secrets.randbits(62))
    version: int = 0
    sections: list[OfferedTrack] = field(default_factory=list)
    awaiting_answer: bool = False
    # Changes made while an offer is outstanding wait for its answer (no glare by design:
    # only the SFU offers on this transport).
    dirty: bool = False
    cname: str = field(default_factory=lambda: secrets.token_hex(8))
    # How many sections the outstanding offer had: tracks added while it is outstanding
    # belong to the next offer, not to the answer being waited for.
    offered: int = 0
    # Whether the client can take a new track on a retired section (browsers can; aiortc's
    # receivers are one-shot and cannot). Without it, sections are appended as before.
    recycle: bool = False
    # The transport-cc id offered on every section (chosen with the first track; 0 before).
    transport_cc: int = 0

    def add(
        self, producer: ProducerInfo, stream: str, subscription: SubscriptionInfo
    ) -> OfferedTrack:
        for index, old in enumerate(self.sections if self.recycle else ()):
            if old.free and old.kind == producer.kind:
                track = OfferedTrack(old.mid, producer.kind, producer, stream, subscription)
                self.sections[index] = track
                break
        else:
            mid = str(len(self.sections))
            track = OfferedTrack(mid, producer.kind, producer, stream, subscription)
            self.sections.append(track)
        self.dirty = True
        return track

    def ext_map_for(self, producer: ProducerInfo) -> dict[int, int]:
        """Publisher extension id -> the id this transport's copies carry it under: the
        forwarded extensions keep their ids, the publisher's transport-cc element is pointed
        at the transport's id (the slot the SFU's number goes into), and an extension of
        this track that uses that id is dropped."""
        publisher_id = producer.ext_ids.get(EXT_TRANSPORT_CC, 0)
        forwarded = {
            i for uri, i in producer.ext_ids.items() if uri not in NOT_FORWARDED_EXTENSIONS
        }
        if not self.transport_cc:
            free = [i for i in range(1, 15) if i not in forwarded]
            self.transport_cc = publisher_id if 0 < publisher_id < 15 else (free or [0])[0]
        ext_map = {i: i for i in forwarded}
        if not self.transport_cc:
            return ext_map  # every one-byte id is taken by this track's extensions: offer none
        ext_map.pop(self.transport_cc, None)
        if publisher_id:
            ext_map[publisher_id] = self.transport_cc
        return ext_map

    def end(self, producer_id: str) -> OfferedTrack | None:
        for track in self.sections:
            if track.producer.id == producer_id and not track.ended:
                track.ended = True
                self.media.end_subscription(track.subscription.id, bye=True)
                self.dirty = True
                return track
        return None

    def close(self) -> None:
        """The transport is gone: stop every subscription (no BYE can reach the client)."""
        for track in self.sections:
            if not track.ended:
                track.ended = True
                self.media.end_subscription(track.subscription.id, bye=False)

    def live(self) -> list[OfferedTrack]:
        return [t for t in self.sections if not t.ended]

    def next_offer(self) -> str | None:
        """The next offer to send, or None if nothing changed or an answer is pending."""
        if self.awaiting_answer or not self.dirty:
            return None
        self.dirty = False
        self.awaiting_answer = True
        self.version += 1
        self.offered = len(self.sections)
        for track in self.sections:
            if track.offered_in is None:
                track.offered_in = self.version
            if track.ended and track.retired_in is None:
                track.retired_in = self.version
        return self._render()

    def _render(self) -> str:
        bundled = [t.mid for t in self.sections if not t.rejected]
        lines = [
            "v=0",
            f"o=- {self.session_id} {self.version} IN IP4 0.0.0.0",
            "s=blindfold",
            "t=0 0",
            "a=ice-lite",
            "a=msid-semantic: WMS *",
        ]
        if bundled:
            lines.append("a=group:BUNDLE " + " ".join(bundled))
        for track in self.sections:
            lines += self._section(track)
        return render(lines)

    def _section(self, track: OfferedTrack) -> list[str]:
        codec = track.producer.codec
        media = Codec(
            codec.payload_type,
            codec.name,
            codec.clock_rate,
            codec.channels,
            codec.fmtp,
            (list(SUBSCRIBER_FEEDBACK) if track.kind == "video" else []) + ["transport-cc"],
        )
        codecs = [media]
        rtx_pt = track.subscription.rtx_payload_type
        if rtx_pt is not None:
            codecs.append(Codec(rtx_pt, "rtx", codec.clock_rate, None, f"apt={codec.payload_type}"))
        formats = " ".join(str(c.payload_type) for c in codecs)
        local = self.local
        if track.ended:
            # Retired (inactive, port 9, still bundled) or rejected by the client (port 0).
            return [
                f"m={track.kind} {0 if track.rejected else 9} UDP/TLS/RTP/SAVPF {formats}",
                "c=IN IP4 0.0.0.0",
                f"a=mid:{track.mid}",
                # Only the BUNDLE tag needs them, but aiortc refuses a section without them.
                f"a=ice-ufrag:{local.ice_ufrag}",
                f"a=ice-pwd:{local.ice_pwd}",
                f"a=fingerprint:{local.fingerprint}",
                "a=setup:actpass",
                "a=rtcp-mux",
                "a=inactive",
                *codec_lines(codecs),
            ]
        track_id = track.producer.id
        subscription = track.subscription
        lines = [
            f"m={track.kind} 9 UDP/TLS/RTP/SAVPF {formats}",
            "c=IN IP4 0.0.0.0",
            f"a=mid:{track.mid}",
            f"a=ice-ufrag:{local.ice_ufrag}",
            f"a=ice-pwd:{local.ice_pwd}",
            f"a=fingerprint:{local.fingerprint}",
            # An offerer must say actpass (RFC 8842 §5.2); the client answers active, which
            # keeps the SFU the DTLS server as on every other transport.
            "a=setup:actpass",
            "a=rtcp-mux",
            "a=rtcp-rsize",
            *candidate_lines(local.candidates),
            "a=end-of-candidates",
        ]
        for uri, ext_id in track.producer.ext_ids.items():
            if uri not in NOT_FORWARDED_EXTENSIONS and ext_id != self.transport_cc:
                lines.append(f"a=extmap:{ext_id} {uri}")
        if self.transport_cc:
            lines.append(f"a=extmap:{self.transport_cc} {EXT_TRANSPORT_CC}")
        lines += codec_lines(codecs)
        lines += ["a=sendonly", f"a=msid:{track.stream} {track_id}"]
        ssrcs = [subscription.ssrc]
        if subscription.rtx_ssrc is not None:
            ssrcs.append(subscription.rtx_ssrc)
            lines.append(f"a=ssrc-group:FID {subscription.ssrc} {subscription.rtx_ssrc}")
        for ssrc in ssrcs:
            lines.append(f"a=ssrc:{ssrc} cname:{self.cname}")
            lines.append(f"a=ssrc:{ssrc} msid:{track.stream} {track_id}")
        return lines

    def apply_answer(self, text: str) -> tuple[list[OfferedTrack], list[OfferedTrack]]:
        """Take the client's answer: (tracks now flowing, tracks the client rejected).

        Raises SdpError if the answer does not fit the outstanding offer.
        """
        if not self.awaiting_answer:
            raise SdpError("no offer is waiting for an answer")
        answer = parse_sdp(text)
        if len(answer.media) != self.offered:
            raise SdpError(
                f"the answer has {len(answer.media)} media sections; the offer had {self.offered}"
            )
        started: list[OfferedTrack] = []
        rejected: list[OfferedTrack] = []
        for track, section in zip(self.sections[: self.offered], answer.media, strict=True):
            if section.mid is not None and section.mid != track.mid:
                raise SdpError(f"answer section {section.mid!r} does not match offer {track.mid!r}")
            if track.offered_in is None or track.offered_in > self.version:
                continue  # recycled after this offer went out: the next offer carries it
            if track.ended:
                if section.rejected:
                    track.rejected = True
                elif track.retired_in is not None and track.retired_in <= self.version:
                    track.free = not track.rejected
                continue
            payload_types = {c.payload_type for c in section.codecs()}
            if section.rejected or track.producer.codec.payload_type not in payload_types:
                track.ended = True
                track.rejected = section.rejected
                self.media.end_subscription(track.subscription.id, bye=False)
                rejected.append(track)
                self.dirty = True
                continue
            if answer.setup(section) == "passive":
                raise SdpError("the answer chose a=setup:passive; the SFU is the DTLS server")
            accepted_ids = set(section.extmaps().values())
            if not self._answers_transport_cc(section, track):
                accepted_ids.discard(self.transport_cc)
            rtx = track.subscription.rtx_payload_type in payload_types
            self.media.negotiated(track.subscription.id, extension_ids=accepted_ids, rtx=rtx)
            if not rtx and track.subscription.rtx_payload_type is not None:
                track.subscription = dataclasses.replace(
                    track.subscription, rtx_ssrc=None, rtx_payload_type=None
                )
            if not track.accepted:
                track.accepted = True
                self.media.set_paused(track.subscription.id, False)
                started.append(track)
        self.awaiting_answer = False
        return started, rejected

    def _answers_transport_cc(self, section: MediaSection, track: OfferedTrack) -> bool:
        """Whether the client kept transport-cc for this section (extension and feedback);
        the first time it does, the transport starts stamping and estimating."""
        codec = next(
            (c for c in section.codecs() if c.payload_type == track.producer.codec.payload_type),
            None,
        )
        ext_id = 0 if codec is None else subscriber_transport_cc(section.extmaps(), codec)
        if not ext_id or ext_id != self.transport_cc:
            return False
        self.media.enable_bandwidth_estimation(self.transport_id, ext_id)
        return True
