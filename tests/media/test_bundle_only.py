"""`a=bundle-only` offers (RFC 8843 §7.3.3), as GStreamer webrtcbin sends with
bundle-policy=max-bundle (and gst-plugins-rs whipsink always): every section but the first
has port 0 and `a=bundle-only`, and must be answered inside the BUNDLE group."""

from __future__ import annotations

import re

from aiortc import RTCPeerConnection, RTCSessionDescription

from sfu.app import Server
from sfu.control.sdp import parse_sdp
from tests.media.harness import (
    SDP,
    ColourTrack,
    ToneTrack,
    bearer,
    post_offer,
    subscribe,
    token,
    wait_for,
)


def max_bundle(offer: str) -> str:
    """Reshape an offer the way webrtcbin's max-bundle does: sections after the first get
    port 0, `a=bundle-only`, and no transport attributes of their own."""
    head, *sections = re.split(r"(?=^m=)", offer, flags=re.M)
    out = [head, sections[0]]
    for section in sections[1:]:
        section = re.sub(r"^(m=\w+) \d+ ", r"\1 0 ", section, count=1, flags=re.M)
        section = re.sub(
            r"^a=(candidate|end-of-candidates|ice-ufrag|ice-pwd|fingerprint).*\r\n",
            "",
            section,
            flags=re.M,
        )
        section = section.replace("a=mid:", "a=bundle-only\r\na=mid:", 1)
        out.append(section)
    return "".join(out)


async def test_bundle_only_sections_are_answered_inside_the_group_and_carry_media(
    sfu: Server,
) -> None:
    pc = RTCPeerConnection()
    sub: RTCPeerConnection | None = None
    try:
        pc.addTransceiver(ColourTrack(), direction="sendonly")
        pc.addTransceiver(ToneTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = max_bundle(pc.localDescription.sdp)
        assert "m=audio 0 " in offer
        assert "a=bundle-only" in offer
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whip/room1/cam",
            offer,
            {**SDP, **bearer(token(sfu, "room1", "pub-cam", publish=True))},
        )
        assert status == 201, body
        answer = parse_sdp(body)
        assert [(m.kind, m.port, m.direction) for m in answer.media] == [
            ("video", 9, "recvonly"),
            ("audio", 9, "recvonly"),
        ]
        mids = [m.mid for m in answer.media]
        assert ("group", "BUNDLE " + " ".join(str(m) for m in mids)) in answer.attributes
        # The section answers with the transport's ICE and DTLS attributes, which webrtcbin
        # requires ("No fingerprint lines in sdp for media 1" otherwise).
        audio = answer.media[1]
        assert audio.value("fingerprint")
        assert audio.value("ice-ufrag")
        assert not audio.has("bundle-only")

        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        sub, counter = await subscribe(sfu)
        await wait_for(
            lambda: counter.frames["video"] > 5 and counter.frames["audio"] > 5,
            what="both bundle-only-negotiated tracks reaching a subscriber",
        )
    finally:
        await pc.close()
        if sub is not None:
            await sub.close()


async def test_offer_without_bundle_is_still_refused_clearly(sfu: Server) -> None:
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver(ColourTrack(), direction="sendonly")
        pc.addTransceiver(ToneTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = re.sub(r"^a=group:BUNDLE.*\r\n", "", pc.localDescription.sdp, flags=re.M)
        status, _, body, _ = await post_offer(
            f"{sfu.url}/whip/room1/cam",
            offer,
            {**SDP, **bearer(token(sfu, "room1", "pub-cam", publish=True))},
        )
        assert status == 400
        assert '"bundle_required"' in body
    finally:
        await pc.close()
