"""Media through the SFU with real aiortc peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtcpPsfbPacket

from sfu.app import Server
from sfu.media.fastpath import probe
from tests.conftest import IN_CI
from tests.media.harness import (
    SDP,
    ColourTrack,
    ToneTrack,
    bearer,
    make_config,
    post_offer,
    publish,
    running_server,
    subscribe,
    token,
    wait_for,
)


@pytest.fixture(params=["native", "python"])
async def sfu(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """These tests run on both forwarding paths (rtc.fastpath auto and off)."""
    native = request.param == "native"
    if native and probe()[0] is None:
        if IN_CI:
            pytest.fail("the native fast path is not built (scripts/test.sh builds it)")
        pytest.skip("the native fast path is not built here")
    async with running_server(SFU_RTC__FASTPATH="auto" if native else "off") as server:
        assert server.engine.fastpath_enabled is native
        yield server


def mean_rgb(frame) -> tuple[float, float, float]:
    pixels = frame.to_ndarray(format="rgb24")
    return tuple(float(pixels[:, :, i].mean()) for i in range(3))  # type: ignore[return-value]


async def test_one_publisher_two_subscribers_decode_audio_and_video(sfu: Server) -> None:
    colour = ColourTrack((200, 40, 40))
    pub, _ = await publish(sfu, "cam", tracks=[colour, ToneTrack()])
    subs = [await subscribe(sfu, "cam") for _ in range(2)]
    try:
        for _, counter in subs:
            await wait_for(
                lambda c=counter: c.frames["video"] >= 30 and c.frames["audio"] >= 50,
                what="decoded audio and video at each subscriber",
            )
            red, green, blue = mean_rgb(counter.last_video)
            # VP8 is lossy and converts through YUV: allow a few levels per channel.
            assert abs(red - 200) < 12
            assert abs(green - 40) < 12
            assert abs(blue - 40) < 12
        stats = sfu.engine.stats
        assert stats.srtp_failures == 0
        assert stats.rtp_unroutable == 0
        assert sfu.engine.demux.errors == 0
        # The same counts, as an operator scrapes them.
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(f"{sfu.url}/metrics") as r:
            text = await r.text()
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sfu_")
        }
        assert values['sfu_media_sessions{kind="whip"}'] == 1
        assert values['sfu_media_sessions{kind="whep"}'] == 2
        for kind in ("audio", "video"):
            packets_in = values[f'sfu_rtp_packets_total{{direction="in",kind="{kind}"}}']
            packets_out = values[f'sfu_rtp_packets_total{{direction="out",kind="{kind}"}}']
            assert packets_in > 20
            # Two subscribers: about twice as many packets out as in.
            assert packets_out > 1.5 * packets_in - 50
        assert values['sfu_dtls_handshakes_total{result="ok"}'] == 3
        assert values['sfu_transports{state="connected"}'] == 3
        assert values['sfu_published_tracks{kind="video"}'] == 1
        assert values["sfu_subscriptions"] == 4
        assert values["sfu_join_latency_seconds_count"] == 2
        assert values['sfu_first_frame_seconds_count{kind="video"}'] == 2
        assert values["sfu_forward_latency_seconds_count"] > 0
    finally:
        await pub.close()
        for pc, _ in subs:
            await pc.close()


async def test_payload_bytes_are_forwarded_unchanged(sfu: Server) -> None:
    """What the SFU receives from the publisher and what the subscriber receives carry the
    same payloads, byte for byte (only header fields are rewritten)."""
    pub, _ = await publish(sfu, "cam", tracks=[ColourTrack()])
    sub, _ = await subscribe(sfu, "cam", kinds=("video",))
    received_by_sfu: dict[bytes, int] = {}
    received_by_sub: list[bytes] = []
    try:
        publisher_transport = sfu.engine.transports[
            next(s.transport.id for s in sfu.rooms.sessions.values() if s.kind == "whip")
        ]

        def tap(packet: bytes) -> None:
            from sfu.media.rtp import parse_header

            hdr = parse_header(packet)
            assert hdr is not None
            received_by_sfu[packet[hdr.header_len : hdr.payload_end]] = hdr.seq

        publisher_transport.packet_tap = tap
        receiver = sub.getReceivers()[0]
        original = receiver._handle_rtp_packet

        async def spy(packet, arrival_time_ms):  # type: ignore[no-untyped-def]
            if packet.payload_type != 0 and packet.payload:
                received_by_sub.append(bytes(packet.payload))
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = spy
        await wait_for(lambda: len(received_by_sub) >= 100, what="100 packets at the subscriber")
        publisher_transport.packet_tap = None
        tapped = [p for p in received_by_sub if p in received_by_sfu]
        # Every payload the subscriber got is one the publisher sent (RTX aside, none here).
        assert len(tapped) == len(received_by_sub)
    finally:
        await pub.close()
        await sub.close()


async def test_twenty_subscribers_on_one_publisher(sfu: Server) -> None:
    pub, _ = await publish(sfu, "cam", tracks=[ColourTrack(size=(64, 48))])
    subs = [await subscribe(sfu, "cam", kinds=("video",)) for _ in range(20)]
    try:
        await wait_for(
            lambda: all(c.frames["video"] >= 10 for _, c in subs),
            timeout=40,
            what="every one of 20 subscribers decoding video",
        )
        whip = next(s for s in sfu.rooms.sessions.values() if s.kind == "whip")
        producer = sfu.engine.transports[whip.transport.id].producers[0]
        assert len(producer.downtracks) == 20
    finally:
        await pub.close()
        await asyncio.gather(*(pc.close() for pc, _ in subs))


async def test_keyframe_requests_are_budgeted_per_subscriber_and_throttled_per_track(
    sfu: Server,
) -> None:
    pub, _ = await publish(sfu, "cam", tracks=[ColourTrack()])
    sub, counter = await subscribe(sfu, "cam", kinds=("video",))
    other, other_counter = await subscribe(sfu, "cam", kinds=("video",))
    plis: list[float] = []
    try:
        sender = pub.getSenders()[0]
        original = sender._handle_rtcp_packet

        async def spy(packet):  # type: ignore[no-untyped-def]
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == 1:
                plis.append(time.monotonic())
            await original(packet)

        sender._handle_rtcp_packet = spy
        await wait_for(
            lambda: counter.frames["video"] >= 10 and other_counter.frames["video"] >= 10,
            what="video decoding",
        )
        await asyncio.sleep(2.2)  # past both subscribers' budgets for start-up requests
        before = len(plis)
        whip = next(s for s in sfu.rooms.sessions.values() if s.kind == "whip")
        producer = sfu.engine.transports[whip.transport.id].producers[0]
        first, second = producer.downtracks
        receiver = sub.getReceivers()[0]
        # One subscriber asks five times in a row: the first reaches the publisher, the
        # other four are its own budget's to drop, counted as suppressed.
        for _ in range(5):
            await receiver._send_rtcp_pli(first.ssrc)
        await asyncio.sleep(0.3)
        assert len(plis) - before == 1, "five PLIs from one subscriber reach the publisher once"
        assert first.keyframe_requests_suppressed == 4
        # Another subscriber asking within 500 ms is throttled per track (a keyframe is
        # already on its way to both).
        throttled = producer.keyframe_requests_throttled
        await other.getReceivers()[0]._send_rtcp_pli(second.ssrc)
        await asyncio.sleep(0.3)
        assert len(plis) - before == 1
        assert producer.keyframe_requests_throttled == throttled + 1
        # Half a second later the first subscriber is still within its own budget...
        await receiver._send_rtcp_pli(first.ssrc)
        await asyncio.sleep(0.3)
        assert len(plis) - before == 1
        # ...and the operator sees what was dropped and why.
        async with aiohttp.ClientSession() as http, http.get(f"{sfu.url}/metrics") as r:
            text = await r.text()
        line = next(x for x in text.splitlines() if 'requests_total{result="suppressed"}' in x)
        assert float(line.split()[-1]) >= 5
        # Once its interval has passed, its next request goes through.
        await asyncio.sleep(1.5)
        await receiver._send_rtcp_pli(first.ssrc)
        await wait_for(lambda: len(plis) - before == 2, timeout=2, what="PLI after the budget")
    finally:
        await pub.close()
        await sub.close()
        await other.close()


async def test_publisher_leaving_ends_subscriber_tracks(sfu: Server) -> None:
    pub, _ = await publish(sfu, "cam")
    sub, counter = await subscribe(sfu, "cam")
    try:
        await wait_for(lambda: counter.frames["video"] >= 5, what="video decoding")
        await pub.close()
        # RTCP BYE from the SFU stops the subscriber's decoders, which ends its tracks.
        await wait_for(
            lambda: all(t.done() for t in counter.tasks), timeout=10, what="tracks ended"
        )
        assert sfu.rooms.get("room1") is not None  # the WHEP session itself lives on
    finally:
        await sub.close()


class LossyRelay(asyncio.DatagramProtocol):
    """UDP relay between one client and the SFU that drops a share of client→SFU SRTP."""

    def __init__(self, target: tuple[str, int], loss: float, seed: int = 7) -> None:
        self.target = target
        self.loss = loss
        self.random = random.Random(seed)
        self.client: tuple[str, int] | None = None
        self.paused = False
        self.dropped = 0
        self.forwarded = 0
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if relay.client is not None and relay.front is not None and not relay.paused:
                    relay.front.sendto(data, relay.client)

        self.front, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.back, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
        return int(self.front.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        if self.paused or self.back is None:
            return
        is_rtp = 127 < data[0] < 192 and not 64 <= data[1] & 0x7F <= 95
        if is_rtp and self.random.random() < self.loss:
            self.dropped += 1
            return
        self.forwarded += 1
        self.back.sendto(data, self.target)

    def close(self) -> None:
        for transport in (self.front, self.back):
            if transport is not None:
                transport.close()


async def publish_via(server: Server, relay_port: int, track: ColourTrack) -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.addTransceiver(track, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    status, _, body, _ = await post_offer(
        f"{server.url}/whip/room1/cam",
        pc.localDescription.sdp,
        {**SDP, **bearer(token(server, publish=True))},
    )
    assert status == 201, body
    answer = body.replace(
        f"127.0.0.1 {server.config.rtc.udp_port} typ host", f"127.0.0.1 {relay_port} typ host"
    )
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc


async def test_five_percent_loss_is_repaired_by_nack_and_rtx(sfu: Server) -> None:
    relay = LossyRelay(("127.0.0.1", sfu.config.rtc.udp_port), loss=0.05)
    port = await relay.start()
    track = ColourTrack()
    pub = await publish_via(sfu, port, track)
    sub, counter = await subscribe(sfu, "cam", kinds=("video",))
    try:
        await wait_for(lambda: counter.frames["video"] >= 15, what="video decoding through loss")
        sent0, decoded0 = track.sent, counter.frames["video"]
        await asyncio.sleep(6)
        sent, decoded = track.sent - sent0, counter.frames["video"] - decoded0
        whip = next(s for s in sfu.rooms.sessions.values() if s.kind == "whip")
        producer = sfu.engine.transports[whip.transport.id].producers[0]
        assert relay.dropped >= 10, "the relay must actually have dropped packets"
        assert producer.rtx_packets_received > 0, "losses are repaired by the publisher's RTX"
        assert decoded >= 0.99 * sent - 3, f"decoded {decoded} of {sent} frames"
    finally:
        relay.close()
        await pub.close()
        await sub.close()


async def test_silent_client_is_disconnected_when_consent_expires() -> None:
    server = Server(make_config(SFU_RTC__CONSENT_TIMEOUT="2s"))
    await server.start()
    relay = LossyRelay(("127.0.0.1", server.config.rtc.udp_port), loss=0.0)
    port = await relay.start()
    pub = await publish_via(server, port, ColourTrack())
    try:
        await wait_for(lambda: server.engine.stats.rtp_in > 10, what="media arriving")
        relay.paused = True  # the client goes silent: no checks, no media
        await wait_for(lambda: not server.rooms.sessions, timeout=6, what="session closed")
        assert server.engine.agent.consent_expiries == 1
    finally:
        relay.close()
        await pub.close()
        await server.close()


async def test_wrong_dtls_fingerprint_is_rejected(sfu: Server) -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver(ColourTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    lines = []
    for line in pc.localDescription.sdp.splitlines():
        if line.startswith("a=fingerprint:sha-256 "):
            line = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
        lines.append(line)
    status, _, body, _ = await post_offer(
        f"{sfu.url}/whip/room1/cam",
        "\r\n".join(lines) + "\r\n",
        {**SDP, **bearer(token(sfu, publish=True))},
    )
    assert status == 201, body
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    try:
        await wait_for(lambda: sfu.engine.stats.dtls_failed == 1, what="DTLS failure counted")
        await wait_for(lambda: not sfu.rooms.sessions, what="session removed")
        assert sfu.engine.stats.rtp_in == 0
    finally:
        await pc.close()


async def test_garbage_datagrams_do_not_disturb_a_live_session(sfu: Server) -> None:
    pub, _ = await publish(sfu, "cam", tracks=[ColourTrack()])
    sub, counter = await subscribe(sfu, "cam", kinds=("video",))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", sfu.config.rtc.udp_port)
    try:
        await wait_for(lambda: counter.frames["video"] >= 10, what="video decoding")
        session = next(s for s in sfu.rooms.sessions.values() if s.kind == "whip")
        rng = random.Random(42)
        from sfu.media.stun import build_binding_success  # a real STUN message to mangle

        stun_like = build_binding_success(os.urandom(12), ("127.0.0.1", 1), b"k" * 16)
        for i in range(3000):
            kind = i % 6
            if kind == 0:
                data = os.urandom(rng.randrange(1, 1500))
            elif kind == 1:
                data = bytes([rng.choice([0, 1, 22, 23, 128, 144, 200])]) + os.urandom(
                    rng.randrange(0, 40)
                )
            elif kind == 2:
                data = stun_like[: rng.randrange(1, len(stun_like))]
            elif kind == 3:
                data = os.urandom(9000)  # oversized
            elif kind == 4:
                # A Binding request for the live session's ufrag with a bad MESSAGE-INTEGRITY.
                from sfu.media.stun import BINDING_REQUEST, encode

                data = encode(
                    BINDING_REQUEST,
                    os.urandom(12),
                    [
                        (0x0006, f"{session.transport.ice_ufrag}:x".encode()),
                        (0x8029, os.urandom(8)),
                    ],
                    integrity_key=b"wrong-password",
                    fingerprint=True,
                )
            else:
                data = b""
            sock.sendto(data, target)
            if i % 50 == 0:
                # Paced so the kernel's socket buffer, not the SFU, never drops the flood.
                await asyncio.sleep(0.01)
        frames_before = counter.frames["video"]
        await asyncio.sleep(1.5)
        assert counter.frames["video"] > frames_before + 20, "media keeps flowing"
        assert sfu.engine.demux.errors == 0
        # 500 forged checks were sent; allow for the odd datagram the kernel drops.
        assert sfu.engine.agent.requests_unauthenticated >= 450
        assert sfu.engine.demux.dropped_unknown_address > 0
        # The forged checks allocated nothing: the session still knows only its real address.
        assert len(sfu.engine.transports[session.transport.id].ice.addresses) == 1
    finally:
        sock.close()
        await pub.close()
        await sub.close()


async def test_a_session_the_sfu_ends_is_closed_on_the_client_at_once(sfu: Server) -> None:
    """The SFU ends the subscriber's session (as for DELETE, an e2ee policy stop, the drain
    deadline): RTCP BYE then DTLS close_notify, and a standard stack leaves `connected`
    immediately instead of waiting for its own timeouts."""
    pub, _ = await publish(sfu, "cam")
    sub, counter = await subscribe(sfu, "cam")
    try:
        await wait_for(lambda: counter.frames["video"] >= 5, what="video decoding")
        session = next(s for s in sfu.rooms.sessions.values() if s.kind == "whep")
        sfu.media.close_transport(session.transport.id, "ended by the operator")
        await wait_for(
            lambda: sub.connectionState in ("closed", "failed"),
            timeout=2,
            what="the subscriber's stack to see the end",
        )
        # BYE for every stream ended its tracks as well.
        await wait_for(lambda: all(t.done() for t in counter.tasks), timeout=2, what="tracks")
    finally:
        await pub.close()
        await sub.close()
