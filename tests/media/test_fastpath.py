"""The native fan-out core against the pure-Python reference, and its payload guarantee.

Parity: one scripted session (audio and video with header extensions, an extension map that
renames, drops and needs a two-byte rebuild, RTP padding, keyframe waits, publisher RTX
repairs, subscriber NACKs answered with and without RTX, sender reports, transport-cc
feedback both ways, the SFU's own transport-wide numbers stamped toward subscribers (in the
loop, on rebuilt copies, RTX and plain resends), a publisher restart on a new SSRC, junk)
goes through the engine once per path, with every source of randomness seeded the same way;
every datagram that leaves, with its destination and in order, must be the same byte for
byte. A second scripted session does the same for simulcast: subscribers that start on a
layer's keyframe cache, switch up and down at keyframes, pause and resume, and ask for
packets that an earlier layer sent.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import struct
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sfu.media import transport as transport_module
from sfu.media.fastpath import probe
from sfu.media.rtcp import build_nack, build_pli
from sfu.media.rtp import build_rtx, read_transport_seq
from sfu.media.simulcast import SWITCH_KEYFRAME_RETRY
from sfu.media.twcc import TwccRecorder
from tests.conftest import IN_CI, run_cli
from tests.engine.harness import (
    AUDIO_SSRC,
    OPUS,
    VIDEO_RTX_SSRC,
    VIDEO_SSRC,
    VP8,
    EngineHarness,
    header_of,
    mid_extension,
    opus_packet,
    payload_of,
    rtp_packet,
    vp8_packet,
    vp8_payload,
)
from tests.engine.test_simulcast import (
    MID_ID,
    RID_ID,
    RIDS,
    RRID_ID,
    RTX_SSRCS,
    TWCC_ID,
    Call,
    FixedEstimate,
    layer_packet,
    sdes,
)
from tests.media.harness import running_server
from tests.media.test_assurance import scrape

MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
TWCC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


@pytest.fixture(autouse=True)
def native_built() -> None:
    if probe()[0] is None:
        if IN_CI:
            pytest.fail("the native fast path is not built (scripts/test.sh builds it)")
        pytest.skip("the native fast path is not built here")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every random choice the engine and the simulated clients make, from one seed."""
    rng = random.Random(seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(secrets, "randbits", rng.getrandbits)
        mp.setattr(secrets, "randbelow", rng.randrange)
        mp.setattr(secrets, "choice", rng.choice)
        mp.setattr(secrets, "token_bytes", lambda n=32: rng.randbytes(n))
        mp.setattr(secrets, "token_hex", lambda n=32: rng.randbytes(n).hex())
        mp.setattr(secrets, "token_urlsafe", lambda n=32: rng.randbytes(n).hex())
        mp.setattr(os, "urandom", rng.randbytes)
        yield


def ext(*elements: tuple[int, bytes]) -> bytes:
    return b"".join(bytes([(i << 4) | (len(v) - 1)]) + v for i, v in elements)


def twcc_ext(seq: int) -> tuple[int, bytes]:
    return (3, struct.pack("!H", seq & 0xFFFF))


def padded(packet: bytes, pad: int) -> bytes:
    """The same packet with RTP padding (P bit, `pad` bytes, the last one the count)."""
    return bytes([packet[0] | 0x20]) + packet[1:] + bytes(pad - 1) + bytes([pad])


def session(
    path: str, scenario: Callable[[EngineHarness], None] | None = None
) -> list[tuple[bytes, tuple[str, int]]]:
    """Run the script (or `scenario`) on one path; return every datagram the engine sent,
    in order."""
    with seeded(1234):
        h = EngineHarness(fastpath=path)
        assert h.engine.fastpath_enabled is (path == "auto")
        # Transport-cc arrival times come from the transport's clock: the harness's.
        fake_time = types.SimpleNamespace(monotonic=h.clock, perf_counter=time.perf_counter)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transport_module, "time", fake_time)
            (scenario or script)(h)
        return list(h.socket.sent)


def script(h: EngineHarness) -> None:
    pub = h.client("whip")
    video = h.add_producer(
        pub,
        codec=VP8,
        kind="video",
        mid="0",
        ssrc=VIDEO_SSRC,
        rtx_ssrc=VIDEO_RTX_SSRC,
        ext_ids={MID: 1, TWCC: 3},
    )
    audio = h.add_producer(
        pub, codec=OPUS, kind="audio", mid="1", ssrc=AUDIO_SSRC, ext_ids={MID: 1, LEVEL: 2}
    )
    pub.transport.mid_ext_id = 1
    pub.transport.enable_twcc(3)
    subscribers = []
    # Ids kept (RTX negotiated), renamed and dropped in place, one that needs the two-byte
    # form (a rebuild the loop leaves to Python), and transport-cc renamed without RTX (plain
    # resends). Where the subscriber has transport-cc, the SFU stamps its own numbers.
    stamping = {0: 3, 2: 200, 3: 4}
    for ext_map, rtx in (
        ({1: 1, 3: 3}, 97),
        ({1: 5, 3: 0}, None),
        ({1: 1, 3: 200}, None),
        ({1: 0, 3: 4}, None),
    ):
        client = h.client("whep")
        downtrack = h.add_downtrack(
            client, video, rtx_payload_type=rtx, ext_map=ext_map, payload_type=100
        )
        if len(subscribers) in stamping:
            client.transport.enable_bwe(stamping[len(subscribers)])
        subscribers.append((client, downtrack))
    recorders = {i: TwccRecorder() for i in stamping}

    def feedback() -> None:
        """Stamping subscribers report what reached them, as a browser would."""
        for i, ext_id in stamping.items():
            client = subscribers[i][0]
            for plain in client.receive().rtp:
                number = read_transport_seq(plain, header_of(plain), ext_id)
                if number >= 0:
                    recorders[i].record(number, h.clock())
            packets = recorders[i].build_feedback(
                client.rtcp_ssrc, subscribers[i][1].ssrc, h.clock()
            )
            for packet in packets or ():
                client.send_rtcp(packet)

    listener = h.client("whep")
    h.add_downtrack(listener, audio, ext_map={2: 4})
    late = h.client("whep", connect=False)
    h.add_downtrack(late, video)

    twcc_seq = 0
    sent: dict[int, bytes] = {}

    def send_video(seq: int, *, key: bool = False, pad: int = 0, skip: bool = False) -> None:
        nonlocal twcc_seq
        twcc_seq += 1
        packet = vp8_packet(
            seq, 3000 * (seq // 3), keyframe=key, extensions=ext((1, b"0"), twcc_ext(twcc_seq))
        )
        if pad:
            packet = padded(packet, pad)
        sent[seq] = packet
        if not skip:
            pub.send_rtp(packet)

    send_video(1)  # mid-GOP: every copy waits, the SFU asks for a keyframe
    send_video(2)
    send_video(3, key=True)
    for seq in range(4, 30):
        send_video(seq, pad=8 if seq % 7 == 0 else 0, skip=seq in (12, 13))
        if seq % 2:
            pub.send_rtp(opus_packet(seq, 960 * seq, extensions=ext((2, b"\x20"))))
        if seq == 10:
            late.connect()  # joins mid-stream: waits for the next keyframe
        if seq == 20:
            send_video(100, key=True)  # out of order and far ahead; dropped by nobody
    h.advance(0.06)  # transport-cc feedback for what arrived so far
    feedback()
    # The publisher repairs 12 with RTX (RFC 4588); 13 stays lost.
    rtx = build_rtx(sent[12], header_of(sent[12]), VIDEO_RTX_SSRC, 1, VP8.rtx_payload_type or 97)
    pub.send_rtp(rtx)
    # Subscribers ask for packets again: by their own sequence numbers.
    for client, downtrack in (*subscribers[:2], subscribers[3]):
        assert client.srtp is not None
        wanted = [(s + downtrack._seq_offset) & 0xFFFF for s in (5, 6, 12, 13)]
        client.send_rtcp(build_nack(client.rtcp_ssrc, downtrack.ssrc, wanted))
        client.send_rtcp(build_pli(client.rtcp_ssrc, downtrack.ssrc))
    h.advance(0.5)
    feedback()
    h.advance(0.6)  # sender reports, feedback, the policy check
    # The publisher's encoder restarts on a new SSRC, announced only by MID.
    for seq in range(500, 520):
        packet = rtp_packet(
            seq,
            90000 + seq,
            0x55555555,
            vp8_payload(seq, keyframe=seq == 503),
            payload_type=VP8.payload_type,
            marker=True,
            extensions=ext((1, b"0"), twcc_ext(1000 + seq)),
        )
        pub.send_rtp(packet)
    pub.send(b"\xff junk that is no protocol")
    pub.send(mid_extension(1, "0"))
    h.advance(0.2)
    feedback()
    h.advance(0.9)
    # The whole sequence reached subscribers, and at least one copy needed the rebuild.
    assert subscribers[2][1].packets_sent > 0
    for i in stamping:
        transport = subscribers[i][0].transport
        assert transport.send_log is not None
        assert transport.send_log.twcc_stamped > 20
        assert transport.bwe is not None
        assert transport.bwe.updates > 0
    # A plain resend went out byte for byte as the first send (same SRTP index, same
    # header, transport-wide number included): the client's replay check drops it.
    resent = subscribers[3][0].datagrams()
    assert len(resent) > len(set(resent))


def test_native_and_python_paths_send_the_same_datagrams() -> None:
    native = session("auto")
    python = session("off")
    assert len(native) == len(python)
    assert len(native) > 200
    for index, (a, b) in enumerate(zip(native, python, strict=True)):
        assert a == b, f"datagram {index} differs: native {a!r} python {b!r}"


class LayeredCall(Call):
    """A simulcast publisher (`Call` of tests/engine/test_simulcast.py: layers q, h, f with
    payloads of 40, 160 and 640 bytes, learnt by RID, transport-wide numbers on every packet)
    that can lose a layer's packet on the way in and repair it over the layer's RTX
    stream."""

    def __init__(self, harness: EngineHarness) -> None:
        super().__init__(harness, stamps=True)
        self.sent: dict[tuple[str, int], bytes] = {}
        self.rtx_seq = 0

    def frame(
        self, *, keyframes: tuple[str, ...] = (), lose: tuple[str, ...] = ()
    ) -> dict[str, bytes]:
        self.harness.clock.now += 0.033
        sent = {}
        for rid in RIDS:
            self.seq[rid] += 1
            self.ts[rid] += 3000
            self.twcc += 1
            packet = layer_packet(
                rid, self.seq[rid], self.ts[rid], keyframe=rid in keyframes, twcc=self.twcc
            )
            self.sent[rid, self.seq[rid]] = packet
            if rid not in lose:
                self.publisher.send_rtp(packet)
            sent[rid] = packet
        return sent

    def frames(self, count: int) -> None:
        for _ in range(count):
            self.frame()

    def allocate(self) -> None:
        """Frames past a rate window (the publisher never falls silent), then a round of
        the layer allocator."""
        self.frames(20)
        self.harness.engine.allocate_layers(self.harness.clock())

    def repair(self, rid: str, seq: int) -> None:
        """The publisher resends a lost packet on the layer's RTX stream (RFC 4588), named
        by repaired-rtp-stream-id (RFC 8852)."""
        original = self.sent[rid, seq]
        hdr = header_of(original)
        self.rtx_seq += 1
        self.publisher.send_rtp(
            rtp_packet(
                self.rtx_seq,
                hdr.timestamp,
                RTX_SSRCS[rid],
                original[2:4] + original[hdr.header_len :],
                payload_type=VP8.rtx_payload_type or 97,
                marker=True,
                extensions=sdes(MID_ID, "0") + sdes(RRID_ID, rid),
            )
        )


def simulcast_script(h: EngineHarness) -> None:
    call = LayeredCall(h)
    rids = call.track.by_rid
    stats = h.engine.stats
    call.publisher.transport.enable_twcc(TWCC_ID)  # transport-cc feedback to the publisher
    call.frame(keyframes=RIDS)
    call.frames(5)
    # Two subscribers join mid-GOP. A: RTX, the SFU's own transport-wide numbers under a
    # renamed id, and an estimate the test sets (no probes: they need a real estimator).
    # B: no RTX, MID renamed and RID kept under a new id, no estimate (sizes decide).
    a_client, a = call.subscriber(rtx=97, ext_map={MID_ID: 1, TWCC_ID: 5})
    a_client.transport.enable_bwe(5)
    estimate = FixedEstimate(20_000_000)
    a_client.transport.bwe = estimate  # type: ignore[assignment]
    a_client.transport.prober = None
    b_client, b = call.subscriber(ext_map={MID_ID: 9, RID_ID: 10})
    # Both start at once on the lowest layer's keyframe cache: its keyframe, the deltas
    # since, then the packet that found them waiting.
    call.frame()
    assert stats.keyframe_cache_hits == 2
    assert a.layer is rids["q"]
    assert b.layer is rids["q"]
    assert len(b_client.receive().rtp) == 7
    call.frames(2)

    # A's estimate pays for the top layer; B shows a thumbnail, and the smallest layer that
    # covers it is the middle one. Both targets are asked for keyframes; until they come,
    # the lowest layer keeps flowing.
    b.max_width, b.max_height = 200, 150
    call.allocate()
    assert a.target is rids["f"]
    assert b.target is rids["h"]
    call.frames(2)
    a_client.send_rtcp(build_pli(a_client.rtcp_ssrc, a.ssrc))  # while its switch waits
    b_last_q = b.last_out_seq
    call.frame(keyframes=("h",))  # B switches up at h's keyframe; A still waits for f's
    assert b.layer is rids["h"]
    assert a.layer is rids["q"]
    assert a.target is rids["f"]
    call.frames(2)
    # B's NACK after its switch (plain resends, no RTX): two packets of the lowest layer,
    # answered from its ring, and the middle layer's keyframe.
    wanted = [(b_last_q + i) & 0xFFFF for i in (0, 1, 2)]
    b_client.send_rtcp(build_nack(b_client.rtcp_ssrc, b.ssrc, wanted))
    assert b.nacks_served == 3
    # No keyframe of f yet: once SWITCH_KEYFRAME_RETRY has passed, A's pending switch asks
    # for one again.
    asked = rids["f"].keyframe_requests_sent
    call.frames(int(SWITCH_KEYFRAME_RETRY / 0.033) + 2)
    assert rids["f"].keyframe_requests_sent > asked
    a_last_q = a.last_out_seq
    call.frame(keyframes=("f",))  # A switches up: q's packet of this frame, then f's
    assert a.layer is rids["f"]
    assert a.target is None
    call.frames(3)
    # A's NACK after its switch (RTX): two packets the lowest layer sent, answered from its
    # ring, and two of the top layer. Then a PLI each, for their new layers: B's goes on to
    # the middle layer, A's comes too soon after its last and is held back.
    served = a.nacks_served
    wanted = [(a_last_q + i) & 0xFFFF for i in (0, 1, 2, 3)]
    a_client.send_rtcp(build_nack(a_client.rtcp_ssrc, a.ssrc, wanted))
    assert a.nacks_served == served + 4
    a_client.send_rtcp(build_pli(a_client.rtcp_ssrc, a.ssrc))
    b_client.send_rtcp(build_pli(b_client.rtcp_ssrc, b.ssrc))
    assert a.keyframe_requests_suppressed == 1
    assert b.keyframe_requests_suppressed == 0
    # A top-layer packet lost on the way in: the SFU asks the publisher, which repairs it
    # over f's RTX stream; the repair goes on to A only.
    call.frame(lose=("f",))
    lost = call.seq["f"]
    call.frames(2)
    h.advance(0.1)
    a_client.receive()
    call.repair("f", lost)
    assert rids["f"].rtx_packets_received == 1
    repaired = [payload_of(p) for p in a_client.receive().rtp]
    assert repaired == [payload_of(call.sent["f", lost])]
    call.frames(20)

    # A's estimate falls below the top layer's rate; once the shortfall has lasted, A
    # moves down to the middle layer, at its keyframe.
    call.allocate()
    estimate.estimate_bps = rids["f"].bitrate * 0.8
    call.allocate()
    assert a.target is None
    assert a.short_since is not None
    call.allocate()
    assert a.target is rids["h"]
    call.frames(3)
    a_last_f = a.last_out_seq
    call.frame(keyframes=("h",))
    assert a.layer is rids["h"]
    call.frames(2)
    # A NACK for the top layer's last packets, from its ring, after the move down.
    served = a.nacks_served
    wanted = [(a_last_f + i) & 0xFFFF for i in (-1, 0, 1)]
    a_client.send_rtcp(build_nack(a_client.rtcp_ssrc, a.ssrc, wanted))
    assert a.nacks_served == served + 3

    # B hides the video (0 x 0): paused, nothing reaches it, keyframes included.
    b.max_width = b.max_height = 0
    call.allocate()
    assert b.suspended
    b_client.receive()
    call.frame(keyframes=RIDS)
    q_keyframe = call.seq["q"]
    call.frames(3)
    assert b_client.receive().rtp == []
    # Shown again as a thumbnail of the lowest layer: it resumes at once on that layer's
    # keyframe cache, its numbering continuing where it stopped.
    b_last = b.last_out_seq
    b.max_width, b.max_height = 160, 120
    call.allocate()
    assert not b.suspended
    call.frame()
    assert stats.keyframe_cache_hits == 3
    resumed = b_client.receive().rtp
    assert len(resumed) == call.seq["q"] - q_keyframe + 1
    assert header_of(resumed[0]).seq == (b_last + 1) & 0xFFFF
    b_client.send_rtcp(build_pli(b_client.rtcp_ssrc, b.ssrc))
    call.frames(5)
    h.advance(1.1)  # sender reports, transport-cc feedback to the publisher
    call.frames(5)
    assert a.layer is rids["h"]
    assert b.layer is rids["q"]
    assert stats.layer_switches == {
        ("up", "bandwidth"): 1,
        ("up", "size"): 1,
        ("down", "bandwidth"): 1,
    }
    assert stats.video_paused == 0
    assert a_client.transport.send_log is not None
    assert a_client.transport.send_log.twcc_stamped > 50


def test_simulcast_layer_switches_send_the_same_datagrams_on_both_paths() -> None:
    native = session("auto", simulcast_script)
    python = session("off", simulcast_script)
    assert len(native) == len(python)
    assert len(native) > 300
    for index, (a, b) in enumerate(zip(native, python, strict=True)):
        assert a == b, f"datagram {index} differs: native {a!r} python {b!r}"


def test_payload_fault_in_the_native_core_is_caught() -> None:
    h = EngineHarness(fastpath="auto", integrity_sample_every=1)
    pub, producer = h.publisher()
    subscriber, _ = h.subscriber(producer)
    pub.send_rtp(vp8_packet(1, 0, keyframe=True))
    for seq in range(2, 12):
        pub.send_rtp(vp8_packet(seq, 3000 * seq))
    assert h.engine.stats.integrity == [11, 0]
    h.engine.router.inject_payload_fault(3)
    for seq in range(12, 22):
        pub.send_rtp(vp8_packet(seq, 3000 * seq))
    assert h.engine.stats.integrity == [18, 3]
    # What left is what the check saw: the corrupted copies really carry a flipped byte.
    received = subscriber.receive().rtp
    assert len(received) == 21
    expected = [vp8_packet(seq, 0, keyframe=seq == 1)[-1] for seq in range(1, 22)]
    assert sum(p[-1] != last for p, last in zip(received, expected, strict=True)) == 3


def test_auto_falls_back_to_python_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As if the extension had not been built: importing it fails.
    monkeypatch.setitem(sys.modules, "sfu.media._fastpath", None)
    h = EngineHarness(fastpath="auto")
    assert not h.engine.fastpath_enabled
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "native fast path unavailable" in warnings[0].getMessage()
    assert "rtc.fastpath: off" in warnings[0].getMessage()
    # And it forwards, in Python.
    pub, producer = h.publisher()
    subscriber, _ = h.subscriber(producer)
    pub.send_rtp(vp8_packet(1, 0, keyframe=True))
    assert len(subscriber.receive().rtp) == 1


def test_off_is_quiet_and_pure_python(caplog: pytest.LogCaptureFixture) -> None:
    h = EngineHarness(fastpath="off")
    assert not h.engine.fastpath_enabled
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_the_gauge_and_sfu_version_say_which_path_runs(mode: str) -> None:
    async with running_server(SFU_RTC__FASTPATH=mode) as server:
        values = await scrape(server)
    assert values["sfu_media_fastpath_enabled"] == (1.0 if mode == "auto" else 0.0)
    assert "native fast path: available" in run_cli("version").stdout
