"""Simulcast through the real engine (both forwarding paths): layers learnt by RID, one copy
per subscriber that switches layers only at keyframes, with continuous numbering."""

from __future__ import annotations

import struct

from sfu.control.sdp import EXT_MID, EXT_REPAIRED_RID, EXT_RID, EXT_TRANSPORT_CC
from sfu.media.rtcp import Pli
from sfu.media.simulcast import SimulcastDownTrack, SimulcastProducer
from tests.engine.harness import VP8, Client, EngineHarness, header_of, payload_of, rtp_packet

MID_ID, RID_ID, RRID_ID, TWCC_ID = 1, 2, 3, 4
RIDS = ("q", "h", "f")
SIZES = {"q": (160, 120), "h": (320, 240), "f": (640, 480)}
SSRCS = {"q": 0x5100, "h": 0x5200, "f": 0x5300}
LAYER_UNITS = {"q": 20, "h": 80, "f": 320}
RTX_SSRCS = {"q": 0x6100, "h": 0x6200, "f": 0x6300}


def sdes(ext_id: int, value: str) -> bytes:
    raw = value.encode()
    return bytes([(ext_id << 4) | (len(raw) - 1)]) + raw


def layer_packet(
    rid: str, seq: int, ts: int, *, keyframe: bool = False, twcc: int | None = None
) -> bytes:
    """A packet of one layer, naming its MID and RID (as browsers do on early packets), and
    with `twcc`, a transport-wide number under TWCC_ID (as browsers send when negotiated)."""
    if keyframe:
        width, height = SIZES[rid]
        payload = bytes([0x10, 0x10, 0x00, 0x00, 0x9D, 0x01, 0x2A])
        payload += struct.pack("<HH", width, height)
    else:
        payload = bytes([0x10, 0x11, 0x00, 0x00])
    payload += bytes([len(rid), seq & 0xFF]) * LAYER_UNITS[rid]  # larger layers, more bytes
    return rtp_packet(
        seq,
        ts,
        SSRCS[rid],
        payload,
        payload_type=VP8.payload_type,
        marker=True,
        extensions=sdes(MID_ID, "0")
        + sdes(RID_ID, rid)
        + (b"" if twcc is None else bytes([TWCC_ID << 4 | 1]) + twcc.to_bytes(2, "big")),
    )


class Call:
    def __init__(self, harness: EngineHarness, *, stamps: bool = False) -> None:
        self.harness = harness
        self.stamps = stamps
        self.twcc = 0
        self.publisher = harness.client("whip")
        transport = self.publisher.transport
        transport.mid_ext_id, transport.rid_ext_id = MID_ID, RID_ID
        transport.repaired_rid_ext_id = RRID_ID
        track = harness.engine.add_producer(
            transport,
            kind="video",
            mid="0",
            codec=VP8,
            ext_ids={EXT_MID: MID_ID, EXT_RID: RID_ID, EXT_REPAIRED_RID: RRID_ID}
            | ({EXT_TRANSPORT_CC: TWCC_ID} if stamps else {}),
            ssrc=None,
            rtx_ssrc=None,
            rids=RIDS,
        )
        assert isinstance(track, SimulcastProducer)
        self.track = track
        for layer in track.layers:
            layer.clock = harness.clock
            layer.created_at = layer.last_packet_at = harness.clock()
        self.seq = dict.fromkeys(RIDS, 1000)
        self.ts = dict.fromkeys(RIDS, 50_000)

    def subscriber(
        self, rtx: int | None = None, ext_map: dict[int, int] | None = None
    ) -> tuple[Client, SimulcastDownTrack]:
        client = self.harness.client("whep")
        downtrack = self.harness.add_downtrack(
            client,
            self.track,  # type: ignore[arg-type]
            rtx_payload_type=rtx,
            ext_map=ext_map,
        )
        assert isinstance(downtrack, SimulcastDownTrack)
        return client, downtrack

    def frame(self, *, keyframes: tuple[str, ...] = ()) -> dict[str, bytes]:
        """One frame on every layer (one packet each), 33 ms later."""
        self.harness.clock.now += 0.033
        sent = {}
        for rid in RIDS:
            self.seq[rid] += 1
            self.ts[rid] += 3000
            self.twcc += 1
            packet = layer_packet(
                rid,
                self.seq[rid],
                self.ts[rid],
                keyframe=rid in keyframes,
                twcc=self.twcc if self.stamps else None,
            )
            self.publisher.send_rtp(packet)
            sent[rid] = packet
        return sent

    def allocate(self) -> None:
        self.harness.clock.now += 0.6  # past a rate window
        self.harness.engine.allocate_layers(self.harness.clock())


def test_each_layer_is_bound_by_its_rid_and_rtx_by_its_repaired_rid(
    harness: EngineHarness,
) -> None:
    call = Call(harness)
    call.frame(keyframes=RIDS)
    layers = call.track.by_rid
    assert {rid: layers[rid].ssrc for rid in RIDS} == SSRCS
    transport = call.publisher.transport
    assert {transport.producers_by_ssrc[SSRCS[rid]] for rid in RIDS} == set(layers.values())
    # An RTX packet of the middle layer names the layer it repairs.
    original = layer_packet("h", 990, 1, keyframe=False)
    rtx_payload = struct.pack("!H", 990) + original[12 + 8 :]
    call.publisher.send_rtp(
        rtp_packet(
            7,
            1,
            RTX_SSRCS["h"],
            rtx_payload,
            payload_type=VP8.rtx_payload_type or 0,
            extensions=sdes(MID_ID, "0") + sdes(RRID_ID, "h"),
        )
    )
    assert layers["h"].rtx_ssrc == RTX_SSRCS["h"]
    assert transport.rtx_by_ssrc[RTX_SSRCS["h"]] is layers["h"]
    assert layers["h"].rtx_packets_received == 1
    assert layers["q"].rtx_ssrc is None


def test_a_subscriber_switches_up_at_a_keyframe_of_the_new_layer_with_continuous_numbering(
    harness: EngineHarness,
) -> None:
    call = Call(harness)
    client, downtrack = call.subscriber()
    first = call.frame(keyframes=RIDS)
    call.frame()
    # It starts on the lowest layer.
    got = client.receive().rtp
    assert payload_of(got[0]) == payload_of(first["q"])
    assert len(got) == 2
    # Nothing limits it: the top layer is chosen, and asked for a keyframe.
    call.publisher.receive()
    call.allocate()
    assert downtrack.target is call.track.by_rid["f"]
    plis = call.publisher.receive().rtcp_of(Pli)
    assert [p.media_ssrc for p in plis] == [SSRCS["f"]]  # type: ignore[attr-defined]
    # Until that keyframe comes, the low layer keeps flowing: no frozen picture.
    before = call.frame()
    got = client.receive().rtp
    assert [payload_of(p) for p in got] == [payload_of(before["q"])]
    # The frame that brings the keyframe: its low-layer packet still goes (it came first),
    # then the keyframe, and from then on only the top layer.
    switch = call.frame(keyframes=("f",))
    after = call.frame()
    got = client.receive().rtp
    assert [payload_of(p) for p in got] == [
        payload_of(switch["q"]),
        payload_of(switch["f"]),
        payload_of(after["f"]),
    ]
    # One stream for the subscriber: same SSRC, numbers +1 each, time moving forward.
    seqs = [header_of(p).seq for p in got]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(3)]
    stamps = [header_of(p).timestamp for p in got]
    assert 0 < (stamps[1] - stamps[0]) & 0xFFFFFFFF < 0x80000000
    assert (stamps[2] - stamps[1]) & 0xFFFFFFFF == 3000
    assert {header_of(p).ssrc for p in got} == {downtrack.ssrc}
    assert downtrack.layer is call.track.by_rid["f"]
    assert harness.engine.stats.layer_switches == {("up", "bandwidth"): 1}


def test_the_size_a_subscriber_shows_caps_its_layer_and_zero_pauses_its_video(
    harness: EngineHarness,
) -> None:
    call = Call(harness)
    client, downtrack = call.subscriber()
    call.frame(keyframes=RIDS)
    call.allocate()
    call.frame(keyframes=("f",))
    assert downtrack.layer is call.track.by_rid["f"]
    client.receive()
    # A thumbnail: the smallest layer at least 200 x 150 is the middle one (320 x 240).
    downtrack.max_width, downtrack.max_height = 200, 150
    call.allocate()
    assert downtrack.target is call.track.by_rid["h"]
    sent = call.frame(keyframes=("h",))
    assert [payload_of(p) for p in client.receive().rtp] == [payload_of(sent["h"])]
    assert harness.engine.stats.layer_switches[("down", "size")] == 1
    # No video at all: nothing is forwarded and the subscription counts as paused.
    downtrack.max_width = downtrack.max_height = 0
    call.allocate()
    call.frame(keyframes=RIDS)
    assert client.receive().rtp == []
    assert downtrack.suspended
    assert harness.engine.stats.video_paused == 1
    # Shown again: it resumes at a keyframe, numbering on from where it stopped.
    last = downtrack.last_out_seq
    downtrack.max_width, downtrack.max_height = 160, 120
    call.allocate()
    assert not downtrack.suspended
    assert harness.engine.stats.video_paused == 0
    sent = call.frame(keyframes=("q",))
    got = client.receive().rtp
    assert [payload_of(p) for p in got] == [payload_of(sent["q"])]
    assert header_of(got[0]).seq == (last + 1) & 0xFFFF


def test_a_nack_after_a_switch_is_served_from_the_layer_that_sent_the_packet(
    harness: EngineHarness,
) -> None:
    call = Call(harness)
    client, downtrack = call.subscriber(rtx=97)
    early = call.frame(keyframes=RIDS)
    call.allocate()
    call.frame(keyframes=("f",))
    got = client.receive().rtp
    low_seq = header_of(got[0]).seq
    downtrack.on_nack((low_seq,))
    resent = client.receive().rtp
    assert len(resent) == 1
    osn_and_payload = payload_of(resent[0])
    assert osn_and_payload[:2] == low_seq.to_bytes(2, "big")  # RFC 4588: the OSN first
    assert osn_and_payload[2:] == payload_of(early["q"])


class FixedEstimate:
    """The subscriber's estimate, set by the test (the estimator has its own tests)."""

    def __init__(self, bps: float) -> None:
        self.estimate_bps = bps


def test_the_estimate_moves_a_subscription_down_then_up_ever_more_reluctantly(
    harness: EngineHarness,
) -> None:
    call = Call(harness)
    client, downtrack = call.subscriber()
    estimate = FixedEstimate(20_000_000)
    client.transport.bwe = estimate  # type: ignore[assignment]
    rids = call.track.by_rid

    def settle(keyframe: str) -> None:
        for _ in range(20):  # rates measured over a few frames, then the keyframe
            call.frame()
        call.allocate()
        for _ in range(20):  # a shortfall must last before a move down
            call.frame()
        call.allocate()
        call.frame(keyframes=(keyframe,))

    call.frame(keyframes=RIDS)
    call.allocate()  # the layers' first rate windows start
    settle("f")
    assert downtrack.layer is rids["f"]
    # The estimate falls below the top layer's rate: down at the middle layer's keyframe.
    rate_f = rids["f"].bitrate
    estimate.estimate_bps = rate_f * 0.8
    settle("h")
    assert downtrack.layer is rids["h"]
    assert harness.engine.stats.layer_switches[("down", "bandwidth")] == 1
    # Plenty again, but it was only just moved down: it stays until the hold ends.
    estimate.estimate_bps = 20_000_000
    settle("f")
    assert downtrack.layer is rids["h"]
    harness.clock.now = downtrack.up_hold_until
    settle("f")
    assert downtrack.layer is rids["f"]
    # Undone again soon after: the next hold is twice as long.
    first_hold = 4.0
    rate_f = rids["f"].bitrate
    estimate.estimate_bps = rate_f * 0.8
    settle("h")
    assert downtrack.layer is rids["h"]
    assert downtrack.up_hold_until - harness.clock.now >= 2 * first_hold - 1.0
    # Not even the lowest layer fits: first down to it, and once that has lasted, video
    # paused.
    estimate.estimate_bps = 10_000
    call.allocate()
    assert not downtrack.suspended
    assert downtrack.target is rids["q"]
    for _ in range(4):
        call.frame()
        call.allocate()
    assert downtrack.suspended
    assert downtrack.reason == "bandwidth"


def test_a_publisher_retransmission_of_a_packet_already_forwarded_is_dropped(
    harness: EngineHarness,
) -> None:
    """Browsers probe their uplink by resending old packets over RTX: forwarded, every
    subscriber would pay for the publisher's probe."""
    call = Call(harness)
    client, _ = call.subscriber()
    sent = call.frame(keyframes=RIDS)
    client.receive()
    original = sent["q"]
    osn = original[2:4]
    rtx_payload = osn + original[header_of(original).header_len :]
    call.publisher.send_rtp(
        rtp_packet(
            1,
            1,
            RTX_SSRCS["q"],
            rtx_payload,
            payload_type=VP8.rtx_payload_type or 0,
            extensions=sdes(MID_ID, "0") + sdes(RRID_ID, "q"),
        )
    )
    layer = call.track.by_rid["q"]
    assert layer.rtx_packets_received == 1
    assert layer.rtx_duplicates == 1
    assert client.receive().rtp == []


def test_a_new_subscriber_starts_on_the_lowest_layer_whose_cache_can_start_it(
    harness: EngineHarness,
) -> None:
    call = Call(harness)
    call.frame(keyframes=RIDS)
    call.frame()
    call.track.by_rid["q"].cached_gop().clear()  # e.g. the lowest layer's GOP outgrew it
    client, downtrack = call.subscriber()
    sent = call.frame()
    # Started at once on the middle layer's cache: its keyframe, its delta, this frame's.
    got = client.receive().rtp
    assert downtrack.layer is call.track.by_rid["h"]
    assert len(got) == 3
    assert payload_of(got[-1]) == payload_of(sent["h"])
    assert harness.engine.stats.keyframe_cache_hits == 1
