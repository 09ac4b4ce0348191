"""The pure parts of bench/compare.py's Janus client and the load generator's counting
receiver: Janus replies, our answer to Janus's subscriber offer, answering a full ICE agent's
checks, and loss counted from sequence numbers without decrypting."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from array import array

import pytest

from bench.janus_api import JanusError, build_answer, check_reply, plugin_data, room_request
from bench.loadgen_media import MARK, CountingStream, Window
from bench.loadgen_peer import Answer, Peer, client_context, parse_answer
from sfu.media import stun
from sfu.media.dtls import DtlsCertificate
from sfu.media.srtp import PROFILES, SrtpKeyingMaterial, SrtpSession

# What Janus 1.1.2's VideoRoom sent a subscriber of one of the bench's publishers.
JANUS_SUBSCRIBER_OFFER = """v=0
o=- 1795868330593756 1 IN IP4 127.0.0.1
s=VideoRoom 77
t=0 0
a=group:BUNDLE 0 1
a=ice-options:trickle
a=fingerprint:sha-256 {fingerprint}
a=extmap-allow-mixed
a=msid-semantic: WMS *
m=video 9 UDP/TLS/RTP/SAVPF 96 97
c=IN IP4 127.0.0.1
a=sendonly
a=mid:0
a=rtcp-mux
a=ice-ufrag:8Lht
a=ice-pwd:fIqgxJCINK3Dk9vDwx/Cuo
a=ice-options:trickle
a=setup:actpass
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 transport-cc
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
a=ssrc-group:FID 2203499805 3858288534
a=msid:janus janus0
a=ssrc:2203499805 cname:janus
a=ssrc:3858288534 cname:janus
a=candidate:1 1 udp 2015363327 127.0.0.1 41107 typ host
a=end-of-candidates
m=audio 9 UDP/TLS/RTP/SAVPF 111
c=IN IP4 127.0.0.1
a=sendonly
a=mid:1
a=rtcp-mux
a=ice-ufrag:8Lht
a=ice-pwd:fIqgxJCINK3Dk9vDwx/Cuo
a=ice-options:trickle
a=setup:actpass
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=fmtp:111 useinbandfec=1
a=msid:janus janus1
a=ssrc:640266371 cname:janus
a=candidate:1 1 udp 2015363327 127.0.0.1 41107 typ host
a=end-of-candidates
""".format(fingerprint=":".join(["37:3A:18:BA:66:C8:1A:54"] * 4)).replace("\n", "\r\n")

FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)


def test_janus_replies_success_and_errors() -> None:
    created = {
        "janus": "success",
        "transaction": "t1",
        "sender": 7468741185672570,
        "plugindata": {
            "plugin": "janus.plugin.videoroom",
            "data": {"videoroom": "created", "room": 4242, "permanent": False},
        },
    }
    assert check_reply(created) is created
    assert plugin_data(created)["videoroom"] == "created"
    assert plugin_data({"janus": "ack"}) == {}
    with pytest.raises(JanusError, match="458: No such session"):
        check_reply({"janus": "error", "error": {"code": 458, "reason": "No such session"}})
    plugin_error = {
        "janus": "event",
        "plugindata": {
            "plugin": "janus.plugin.videoroom",
            "data": {"videoroom": "event", "error_code": 427, "error": "Room 1 already exists"},
        },
    }
    with pytest.raises(JanusError, match="427: Room 1 already exists"):
        check_reply(plugin_error)
    body = room_request(77, 3)
    assert body["require_e2ee"] is True
    assert body["publishers"] == 3
    assert body["bitrate"] == 0


def test_answer_to_janus_subscriber_offer() -> None:
    answer, mids = build_answer(
        JANUS_SUBSCRIBER_OFFER, ufrag="abcd", pwd="p" * 24, fingerprint=FINGERPRINT, port=40123
    )
    assert mids == ["0", "1"]
    lines = answer.split("\r\n")
    assert "a=group:BUNDLE 0 1" in lines
    assert "m=video 9 UDP/TLS/RTP/SAVPF 96 97" in lines
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 111" in lines
    assert lines.count("a=recvonly") == 2
    assert lines.count("a=setup:active") == 2
    assert "a=fmtp:97 apt=96" in lines
    assert "a=rtpmap:111 opus/48000/2" in lines
    # No header extensions accepted, so Janus adds none to what it forwards.
    assert not any(line.startswith("a=extmap") for line in lines)
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    assert len(candidates) == 1
    assert candidates[0].split()[4:6] == ["127.0.0.1", "40123"]

    # The offer is the remote description the peer connects with.
    remote = parse_answer(JANUS_SUBSCRIBER_OFFER)
    assert remote.candidate == ("127.0.0.1", 41107)
    assert remote.ice_ufrag == "8Lht"
    assert remote.ssrc_kinds == {2203499805: "video", 3858288534: "rtx", 640266371: "audio"}


def test_answer_declines_sections_it_cannot_take() -> None:
    offer = (
        JANUS_SUBSCRIBER_OFFER.replace(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111", "m=audio 9 UDP/TLS/RTP/SAVPF 0"
        )
        + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:2\r\n"
    )
    answer, mids = build_answer(offer, ufrag="abcd", pwd="p" * 24, fingerprint=FINGERPRINT, port=1)
    assert mids == ["0"]
    lines = answer.split("\r\n")
    assert "a=group:BUNDLE 0" in lines
    assert "m=audio 0 UDP/TLS/RTP/SAVPF 0" in lines
    assert "m=application 0 UDP/DTLS/SCTP webrtc-datachannel" in lines
    with pytest.raises(ValueError, match="no VP8 or Opus"):
        build_answer(
            offer.replace("VP8/90000", "H264/90000"),
            ufrag="abcd",
            pwd="p" * 24,
            fingerprint=FINGERPRINT,
            port=1,
        )


async def test_peer_answers_a_full_agents_checks() -> None:
    certificate = DtlsCertificate.generate()
    peer = Peer(client_context(certificate), certificate, controlling=False)
    port = peer.open()
    agent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    agent.bind(("127.0.0.1", 0))
    agent.settimeout(2)
    try:
        tid = os.urandom(12)
        request = stun.encode(
            stun.BINDING_REQUEST,
            tid,
            [
                (stun.ATTR_USERNAME, f"{peer.local_ufrag}:janus".encode()),
                (stun.ATTR_ICE_CONTROLLING, struct.pack("!Q", 1)),
                (stun.ATTR_USE_CANDIDATE, b""),
            ],
            integrity_key=peer.local_pwd.encode(),
        )
        loop = asyncio.get_running_loop()
        agent.sendto(request, ("127.0.0.1", port))
        data = await loop.run_in_executor(None, agent.recv, 2048)
        response = stun.parse(data)
        assert response.msg_type == stun.BINDING_SUCCESS
        assert response.transaction_id == tid
        assert response.check_integrity(peer.local_pwd.encode())
        assert response.xor_mapped_address == agent.getsockname()
        assert peer.checks_answered == 1

        # Signed with another password, or for another ufrag: no answer.
        for username, key in ((f"{peer.local_ufrag}:j", b"wrong"), ("other:j", b"x")):
            bad = stun.encode(
                stun.BINDING_REQUEST,
                os.urandom(12),
                [(stun.ATTR_USERNAME, username.encode())],
                integrity_key=peer.local_pwd.encode() if key == b"x" else key,
            )
            agent.sendto(bad, ("127.0.0.1", port))
        await asyncio.sleep(0.2)
        agent.setblocking(False)
        with pytest.raises(BlockingIOError):
            agent.recv(2048)
        assert peer.checks_answered == 1
    finally:
        agent.close()
        peer.close()


async def test_counting_stream_loss_from_sequence_gaps() -> None:
    profile = PROFILES["SRTP_AEAD_AES_128_GCM"]
    keys = SrtpKeyingMaterial.from_exported(profile, os.urandom(profile.exporter_length))
    sfu_side = SrtpSession(keys, role="server")
    certificate = DtlsCertificate.generate()
    peer = Peer(client_context(certificate), certificate)
    peer.srtp = SrtpSession(keys, role="client")
    video, audio = 1111, 2222
    kinds = {video: "video", audio: "audio"}
    peer.answer = Answer("u", "p", None, ("127.0.0.1", 9), kinds, {})  # type: ignore[arg-type]
    window = Window()
    now = time.monotonic_ns()
    window.start_ns, window.end_ns = now, now + 10**9
    video_latency: array[int] = array("q")
    audio_latency: array[int] = array("q")
    stream = CountingStream(0, 0, peer, window, video_latency, audio_latency, sample_every=10)

    def packet(ssrc: int, seq: int, sent_ns: int) -> bytes:
        # An audio-shaped payload: a 1-byte SFrame header (KID 1, CTR 1), then the mark.
        body = bytes([0x11]) + MARK.pack(sent_ns, 0, seq) + b"\0" * 40
        rtp = struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, 0, ssrc) + body
        protected = sfu_side.protect_rtp(rtp)
        assert protected is not None
        return protected

    dropped = {5, 6, 70}
    # Audio wraps its sequence number; video is only there to make the stream "started".
    for k in range(100):
        seq = (65500 + k) & 0xFFFF
        if k not in dropped:
            stream.on_srtp(packet(audio, seq, now), now + 1000)
    stream.on_srtp(packet(video, 7, now), now + 1000)
    stream.on_srtp(packet(video, 8, now), now + 2 * 10**9)  # after the window: not counted
    assert stream._ready.done()
    assert stream.win_audio == 97
    assert stream.win_video == 1
    assert stream.expected() == 101  # 100 audio (3 lost inside the range) + 1 video
    assert stream.reordered == 0
    # 98 packets in the window, every 10th decrypted: its mark gives the latency.
    assert stream.samples == 9
    assert stream.srtp_failures == 0
    assert list(audio_latency) == [1000] * len(audio_latency)
    assert len(audio_latency) == 9

    stream.reset_window()
    assert stream.expected() == 0
    assert stream.win_audio == 0
    peer.close()
