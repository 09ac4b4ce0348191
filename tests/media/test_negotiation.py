"""Offer/answer policy on browser-shaped SDP: what publishers and subscribers are answered."""

from __future__ import annotations

import pytest

from sfu.control.negotiation import (
    NegotiationError,
    SubscribedTrack,
    plan_publisher,
    plan_subscriber,
    render_answer,
)
from sfu.control.sdp import (
    EXT_DEPENDENCY_DESCRIPTOR,
    LocalTransport,
    parse_sdp,
)
from sfu.control.sdp import (
    EXT_TRANSPORT_CC as TCC,
)

FP = "sha-256 " + ":".join(["AB"] * 32)
LOCAL = LocalTransport("srvufrag", "serverpassword0123456789", FP, [("203.0.113.7", 7882)])


def offer(video_codecs: str, direction: str = "sendonly", extra_video: str = "") -> str:
    """A Chrome-shaped offer: audio + video, BUNDLE, extensions, RTX, simulcast on request."""
    return (
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
        "a=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\n"
        "a=ice-ufrag:cli1\r\na=ice-pwd:clientpassword0123456789\r\n"
        f"a=fingerprint:{FP}\r\na=setup:actpass\r\na=mid:0\r\n"
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n"
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
        f"a={direction}\r\na=rtcp-mux\r\na=rtcp-rsize\r\n"
        "a=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 transport-cc\r\n"
        "a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=ssrc:1111 cname:x\r\n"
        f"m=video 9 UDP/TLS/RTP/SAVPF {' '.join(pt for pt, _ in VIDEO[video_codecs])}\r\n"
        "c=IN IP4 0.0.0.0\r\n"
        "a=ice-ufrag:cli1\r\na=ice-pwd:clientpassword0123456789\r\n"
        f"a=fingerprint:{FP}\r\na=setup:actpass\r\na=mid:1\r\n"
        "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\r\n"
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n"
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
        "a=extmap:13 urn:3gpp:video-orientation\r\n"
        f"a=extmap:12 {EXT_DEPENDENCY_DESCRIPTOR}\r\n"
        f"a={direction}\r\na=rtcp-mux\r\na=rtcp-rsize\r\n"
        + "".join(lines for _, lines in VIDEO[video_codecs])
        + extra_video
        + "a=ssrc-group:FID 2222 3333\r\na=ssrc:2222 cname:x\r\na=ssrc:3333 cname:x\r\n"
    )


def _codec(pt: str, name: str, fmtp: str = "", rtx: str = "") -> list[tuple[str, str]]:
    lines = (
        f"a=rtpmap:{pt} {name}/90000\r\na=rtcp-fb:{pt} goog-remb\r\n"
        f"a=rtcp-fb:{pt} transport-cc\r\na=rtcp-fb:{pt} ccm fir\r\n"
        f"a=rtcp-fb:{pt} nack\r\na=rtcp-fb:{pt} nack pli\r\n"
    )
    if fmtp:
        lines += f"a=fmtp:{pt} {fmtp}\r\n"
    out = [(pt, lines)]
    if rtx:
        out.append((rtx, f"a=rtpmap:{rtx} rtx/90000\r\na=fmtp:{rtx} apt={pt}\r\n"))
    return out


VIDEO = {
    "vp8-first": _codec("96", "VP8", rtx="97")
    + _codec("98", "VP9", "profile-id=0", "99")
    + _codec(
        "102",
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "103",
    ),
    "h264-first": _codec(
        "102",
        "H264",
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "103",
    )
    + _codec("96", "VP8", rtx="97"),
    "av1-first": _codec("45", "AV1", "level-idx=5;profile=0;tier=0", "46")
    + _codec("96", "VP8", rtx="97"),
    "vp9-only": _codec("98", "VP9", "profile-id=2", "99"),
    "unknown-only": _codec("120", "FOO"),
}


def section_of(answer: str, kind: str) -> str:
    return answer.split(f"m={kind} ")[1].split("\r\nm=")[0]


@pytest.mark.parametrize(
    ("codecs", "name", "pt", "rtx"),
    [("vp8-first", "VP8", 96, 97), ("h264-first", "H264", 102, 103), ("av1-first", "AV1", 45, 46)],
)
def test_publisher_gets_exactly_one_codec_with_its_rtx(
    codecs: str, name: str, pt: int, rtx: int
) -> None:
    sdp = parse_sdp(offer(codecs))
    plan = plan_publisher(sdp)
    video = next(t for t in plan.tracks if t.kind == "video")
    assert (video.codec.name, video.codec.payload_type, video.codec.rtx_payload_type) == (
        name,
        pt,
        rtx,
    )
    assert (video.ssrc, video.rtx_ssrc) == (2222, 3333)
    answer = render_answer(sdp, LOCAL, plan.answer_sections, 42)
    body = section_of(answer, "video")
    assert body.startswith(f"9 UDP/TLS/RTP/SAVPF {pt} {rtx}\r\n")
    assert f"a=rtpmap:{pt} {name}/90000" in body
    assert f"a=fmtp:{rtx} apt={pt}" in body
    # Only the feedback the SFU itself honours is accepted.
    assert f"a=rtcp-fb:{pt} nack pli" in body
    assert f"a=rtcp-fb:{pt} ccm fir" in body
    assert "goog-remb" not in body
    # The SFU sends publishers transport-wide feedback, so it keeps transport-cc (extension
    # and rtcp-fb); abs-send-time serves only REMB, which it does not send.
    assert f"a=rtcp-fb:{pt} transport-cc" in body
    assert "transport-wide-cc-extensions-01" in body
    assert "abs-send-time" not in body
    # Extensions the SFU forwards or reads stay, with the publisher's ids.
    assert f"a=extmap:12 {EXT_DEPENDENCY_DESCRIPTOR}" in body
    assert "a=extmap:13 urn:3gpp:video-orientation" in body
    assert "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid" in body
    assert "a=recvonly" in body
    for line in ("a=ice-lite", "a=group:BUNDLE 0 1", "a=extmap-allow-mixed"):
        assert line in answer.split("m=")[0]
    assert "a=setup:passive" in body
    assert "a=rtcp-mux" in body
    assert "a=rtcp-rsize" in body
    assert "a=candidate:1 1 udp" in body
    assert "203.0.113.7 7882 typ host" in body


def test_publisher_audio_keeps_opus_fmtp_and_drops_pcmu() -> None:
    sdp = parse_sdp(offer("vp8-first"))
    plan = plan_publisher(sdp)
    audio = next(t for t in plan.tracks if t.kind == "audio")
    assert (audio.codec.name, audio.codec.channels, audio.codec.fmtp) == (
        "opus",
        2,
        "minptime=10;useinbandfec=1",
    )
    body = section_of(render_answer(sdp, LOCAL, plan.answer_sections, 1), "audio")
    assert body.startswith("9 UDP/TLS/RTP/SAVPF 111\r\n")
    assert "PCMU" not in body
    assert "a=fmtp:111 minptime=10;useinbandfec=1" in body


def test_simulcast_without_the_rid_extension_is_answered_without_simulcast() -> None:
    # Without RIDs in the packets the layers' SSRCs could not be told apart.
    rids = "a=rid:h send\r\na=rid:l send\r\na=simulcast:send h;l\r\n"
    sdp = parse_sdp(offer("vp8-first", extra_video=rids))
    # The parser keeps what it does not act on.
    assert sdp.media[1].rids() == ["h", "l"]
    assert sdp.media[1].value("simulcast") == "send h;l"
    answer = render_answer(sdp, LOCAL, plan_publisher(sdp).answer_sections, 1)
    assert "a=simulcast" not in answer
    assert "a=rid" not in answer


def test_simulcast_layers_are_accepted_lowest_first_up_to_three() -> None:
    rids = (
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n"
        "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\r\n"
        "a=rid:q send\r\na=rid:h send\r\na=rid:f send max-width=1280\r\na=rid:x send\r\n"
        "a=simulcast:send q;~h,z;f;x\r\n"
    )
    sdp = parse_sdp(offer("vp8-first", extra_video=rids))
    plan = plan_publisher(sdp)
    video = next(t for t in plan.tracks if t.kind == "video")
    # Paused (~) layers are accepted, alternatives beyond the first and a fourth are not.
    assert video.rids == ("q", "h", "f")
    assert (video.ssrc, video.rtx_ssrc) == (None, None)  # learnt from each layer's RID
    body = section_of(render_answer(sdp, LOCAL, plan.answer_sections, 1), "video")
    assert "a=rid:q recv\r\na=rid:h recv\r\na=rid:f recv\r\n" in body
    assert "a=simulcast:recv q;h;f\r\n" in body
    assert "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id" in body
    assert "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id" in body
    audio = next(t for t in plan.tracks if t.kind == "audio")
    assert audio.rids == ()


def test_video_with_no_forwardable_codec_is_rejected_but_audio_kept() -> None:
    sdp = parse_sdp(offer("unknown-only"))
    plan = plan_publisher(sdp)
    assert [t.kind for t in plan.tracks] == ["audio"]
    answer = render_answer(sdp, LOCAL, plan.answer_sections, 1)
    assert "m=video 0 " in answer
    assert "a=group:BUNDLE 0\r\n" in answer


def test_subscriber_gets_publishers_codec_under_its_own_ids() -> None:
    published = plan_publisher(parse_sdp(offer("h264-first"))).tracks
    # The subscriber lists VP8 first and numbers everything differently.
    sub_offer = (
        offer("vp8-first", direction="recvonly")
        .replace("a=extmap:12 ", "a=extmap:7 ")
        .replace(
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=extmap:9 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        )
        .replace(f"a=extmap:3 {TCC}", f"a=extmap:5 {TCC}")
    )
    plan = plan_subscriber(parse_sdp(sub_offer), published)
    video = next(p for p in plan if isinstance(p, SubscribedTrack) and p.section.kind == "video")
    audio = next(p for p in plan if isinstance(p, SubscribedTrack) and p.section.kind == "audio")
    assert (video.codec.name, video.payload_type, video.rtx_payload_type) == ("H264", 102, 103)
    pub_video = next(t for t in published if t.kind == "video")
    # Publisher id 12 (dependency descriptor) becomes the subscriber's 7; orientation keeps 13;
    # MID is not forwarded. The publisher's transport-cc element (3) becomes the slot for the
    # SFU's own numbers under the subscriber's id (5).
    assert video.ext_map == {12: 7, 13: 13, 3: 5}
    assert pub_video.ext_ids[EXT_DEPENDENCY_DESCRIPTOR] == 12
    assert audio.ext_map == {1: 9, 3: 5}
    for track in (video, audio):
        assert track.transport_cc == 5
        assert "transport-cc" in track.codec.rtcp_fb
        assert f"a=extmap:5 {TCC}" in track.ext_lines


def test_subscriber_without_transport_cc_gets_none() -> None:
    """aiortc offers neither the extension nor the feedback: nothing is stamped for it, and
    the publisher's element is dropped from its copies as before."""
    published = plan_publisher(parse_sdp(offer("vp8-first"))).tracks
    sub_offer = offer("vp8-first", direction="recvonly").replace(f"a=extmap:3 {TCC}\r\n", "")
    plan = plan_subscriber(parse_sdp(sub_offer), published)
    for track in (p for p in plan if isinstance(p, SubscribedTrack)):
        assert track.transport_cc == 0
        assert 3 not in track.ext_map
        assert "transport-cc" not in track.codec.rtcp_fb
        assert not any(TCC in line for line in track.ext_lines)
    # The extension without the feedback is not enough either.
    no_fb = offer("vp8-first", direction="recvonly").replace("transport-cc\r\n", "x-none\r\n")
    plan = plan_subscriber(parse_sdp(no_fb), published)
    assert all(p.transport_cc == 0 for p in plan if isinstance(p, SubscribedTrack))


def test_subscriber_lacking_the_codec_profile_gets_a_clear_406() -> None:
    published = plan_publisher(parse_sdp(offer("vp9-only"))).tracks  # VP9 profile 2
    sub_offer = offer("vp8-first", direction="recvonly")  # offers VP9 profile 0 only
    with pytest.raises(NegotiationError) as caught:
        plan_subscriber(parse_sdp(sub_offer), published)
    assert caught.value.status == 406
    assert caught.value.code == "codec_not_offered"
    assert "VP9/90000 (profile-id=2)" in caught.value.detail


def test_subscriber_section_without_a_track_is_inactive() -> None:
    published = [
        t for t in plan_publisher(parse_sdp(offer("vp8-first"))).tracks if t.kind == "video"
    ]
    plan = plan_subscriber(parse_sdp(offer("vp8-first", direction="recvonly")), published)
    assert isinstance(plan[0], tuple)  # audio: nothing to send
    assert plan[0][1][-1] == "a=inactive"
    assert isinstance(plan[1], SubscribedTrack)
