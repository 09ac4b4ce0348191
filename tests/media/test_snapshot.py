"""Media snapshots: what a media worker sends for /metrics, built from a real engine.

The engine is the in-process one of tests/engine/harness.py (real demultiplexer, ICE agent,
transports, SRTP), driven with real packets on both forwarding paths.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from sfu.media.downtrack import DownTrack, JoinTimer
from sfu.media.producer import Producer
from sfu.media.rtcp import build_pli
from sfu.media.snapshot import HistogramData, MediaSnapshot, build_snapshot, merge
from tests.engine.conftest import native_core_built
from tests.engine.harness import (
    AUDIO_SSRC,
    OPUS,
    VP8,
    Client,
    EngineHarness,
    opus_packet,
    vp8_packet,
)

# Of each kind: together more than one forward-latency sample (1 in FORWARD_SAMPLE_EVERY).
PACKETS = 40
JOIN_DELAY = 0.25
STRANGER = ("203.0.113.7", 5000)  # TEST-NET-3: no ICE check ever came from it


@pytest.fixture(params=["native", "python"])
def harness(request: pytest.FixtureRequest) -> EngineHarness:
    """A harness on each forwarding path, so the native core's folded counters are covered."""
    if request.param == "native" and not native_core_built():
        pytest.skip("the native fast path is not built here")
    return EngineHarness(fastpath="auto" if request.param == "native" else "off")


def subscribe(
    harness: EngineHarness, client: Client, producer: Producer, join: JoinTimer
) -> DownTrack:
    """`harness.add_downtrack` with the subscribe request's timer, as signaling passes it."""
    downtrack = harness.engine.add_downtrack(
        client.transport,
        producer,
        payload_type=producer.codec.payload_type,
        rtx_payload_type=None,
        ext_map={},
        join=join,
    )
    downtrack.clock = harness.clock
    downtrack.wallclock = harness.wallclock
    return downtrack


def run_traffic(harness: EngineHarness) -> tuple[int, int]:
    """A publisher of video and audio, one subscriber to both that asked JOIN_DELAY before
    the first packet, PACKETS packets of each, a PLI, one stray datagram and a second of timer
    ticks. Returns the RTP bytes received by the SFU and those the subscriber decrypted."""
    publisher, video = harness.publisher()
    audio = harness.add_producer(publisher, codec=OPUS, kind="audio", mid="1", ssrc=AUDIO_SSRC)
    audio.e2ee_required = True  # as the control plane marks tracks of an e2ee: required room
    subscriber = harness.client("whep")
    join = JoinTimer(harness.clock)
    video_copy = subscribe(harness, subscriber, video, join)
    subscribe(harness, subscriber, audio, join)
    harness.clock.now += JOIN_DELAY
    sent = 0
    for seq in range(PACKETS):
        for packet in (vp8_packet(seq, 3000 * seq, keyframe=seq == 0), opus_packet(seq, 960 * seq)):
            publisher.send_rtp(packet)
            sent += len(packet)
    subscriber.send_rtcp(build_pli(subscriber.rtcp_ssrc, video_copy.ssrc))
    harness.engine.deliver(b"\x80" + bytes(30), STRANGER)
    harness.advance(1.0)
    received = sum(len(p) for p in subscriber.receive().rtp)
    return sent, received


def test_a_snapshot_of_an_engine_after_traffic_has_its_counters(harness: EngineHarness) -> None:
    sent, received = run_traffic(harness)
    snapshot = build_snapshot(harness.engine)

    video_in, video_bytes_in, video_out, _ = snapshot.rtp_by_kind["video"]
    audio_in, audio_bytes_in, audio_out, _ = snapshot.rtp_by_kind["audio"]
    assert (video_in, video_out, audio_in, audio_out) == (PACKETS, PACKETS, PACKETS, PACKETS)
    assert video_bytes_in + audio_bytes_in == sent
    assert snapshot.rtp_by_kind["video"][3] + snapshot.rtp_by_kind["audio"][3] == received
    assert snapshot.ice_requests_ok == 2  # one nominating check per client
    assert snapshot.dropped_unknown_address == 1
    assert snapshot.pli_received == 1
    assert snapshot.srtp_failures == 0
    assert snapshot.transports_by_state == {"connected": 2}
    assert snapshot.published_tracks == {"audio": 1, "video": 1}
    # PACKETS frames without an SFrame envelope each: both judged plaintext.
    assert snapshot.e2ee_tracks[("plaintext_suspected", "optional")] == 1
    assert snapshot.e2ee_tracks[("plaintext_suspected", "required")] == 1
    assert sum(snapshot.e2ee_tracks.values()) == 2
    assert snapshot.subscriptions == 2
    assert snapshot.join_latency.total == JOIN_DELAY
    assert sum(snapshot.join_latency.counts) == 1
    for kind in ("audio", "video"):
        assert sum(snapshot.first_frame_latency[kind].counts) == 1
    assert sum(snapshot.forward_latency.counts) >= 1
    assert snapshot.fastpath_enabled == harness.engine.fastpath_enabled
    # Whatever the engine counted, the snapshot says the same.
    stats = harness.engine.stats
    assert snapshot.rtcp_in == stats.rtcp_in > 0
    assert snapshot.rtcp_out == stats.rtcp_out > 0
    assert snapshot.keyframe_requests_forwarded == stats.keyframe_requests[0] > 0
    assert snapshot.integrity_match == stats.integrity[0]
    assert snapshot.e2ee_frames == {kind: tuple(row) for kind, row in stats.e2ee_frames.items()}
    assert all(none > 0 and sframe == 0 for none, sframe in snapshot.e2ee_frames.values())
    assert snapshot.integrity_mismatch == 0
    assert snapshot.send_errors == harness.engine.demux.send_errors


def test_closed_tracks_and_subscriptions_are_not_counted_and_simulcast_counts_once(
    harness: EngineHarness,
) -> None:
    publisher, video = harness.publisher()
    harness.engine.add_producer(
        publisher.transport,
        kind="video",
        mid="1",
        codec=VP8,
        ext_ids={},
        ssrc=None,
        rtx_ssrc=None,
        rids=("q", "h", "f"),
    )
    harness.subscriber(video)
    second, _ = harness.subscriber(video)
    assert build_snapshot(harness.engine).published_tracks == {"audio": 0, "video": 2}

    harness.engine.close_transport(second.transport, "test")
    snapshot = build_snapshot(harness.engine)
    assert snapshot.subscriptions == 1
    assert snapshot.transports_by_state == {"connected": 2, "closed": 1}

    harness.engine.close_transport(publisher.transport, "test")
    snapshot = build_snapshot(harness.engine)
    assert snapshot.published_tracks == {"audio": 0, "video": 0}
    assert sum(snapshot.e2ee_tracks.values()) == 0
    assert snapshot.subscriptions == 0  # the first subscriber's copy ended with its track


def test_json_round_trip_is_exact(harness: EngineHarness) -> None:
    run_traffic(harness)
    snapshot = build_snapshot(harness.engine)
    assert snapshot.join_latency.total > 0  # a float that JSON must carry exactly

    wire = json.dumps(snapshot.to_dict())
    back = MediaSnapshot.from_dict(json.loads(wire))
    assert back == snapshot
    assert json.dumps(back.to_dict()) == wire
    # Same types as built, not merely equal values (a list would compare unequal to a
    # tuple anyway, but a dict key order or an int/float swap would not show above).
    for field in dataclasses.fields(MediaSnapshot):
        assert type(getattr(back, field.name)) is type(getattr(snapshot, field.name)), field.name
    assert isinstance(back.first_frame_latency["video"], HistogramData)
    assert type(back.join_latency.total) is float


def test_merging_two_snapshots_doubles_counters_and_histogram_counts(
    harness: EngineHarness,
) -> None:
    run_traffic(harness)
    one = build_snapshot(harness.engine)
    both = merge([one, MediaSnapshot.from_dict(json.loads(json.dumps(one.to_dict())))])

    assert both.rtp_by_kind == {
        kind: tuple(2 * n for n in row) for kind, row in one.rtp_by_kind.items()
    }
    assert both.rtcp_in == 2 * one.rtcp_in
    assert both.ice_requests_ok == 4
    assert both.dropped_unknown_address == 2
    assert both.subscriptions == 4
    assert both.published_tracks == {"audio": 2, "video": 2}
    assert both.e2ee_tracks == {key: 2 * n for key, n in one.e2ee_tracks.items()}
    assert both.transports_by_state == {"connected": 4}
    for name in ("forward_latency", "join_latency", "bwe_estimates"):
        single, merged = getattr(one, name), getattr(both, name)
        assert merged.bounds == single.bounds
        assert merged.counts == tuple(2 * n for n in single.counts)
        assert merged.total == 2 * single.total
    video = both.first_frame_latency["video"]
    assert video.counts == tuple(2 * n for n in one.first_frame_latency["video"].counts)
    assert both.fastpath_enabled == one.fastpath_enabled
    assert merge([one]) == one


def test_merge_is_fastpath_enabled_only_if_every_worker_is(harness: EngineHarness) -> None:
    one = build_snapshot(harness.engine)
    on = dataclasses.replace(one, fastpath_enabled=True)
    off = dataclasses.replace(one, fastpath_enabled=False)
    assert merge([on, on]).fastpath_enabled is True
    assert merge([on, off]).fastpath_enabled is False


def test_merge_keeps_keys_only_some_workers_have(harness: EngineHarness) -> None:
    one = build_snapshot(harness.engine)
    other = dataclasses.replace(
        one, layer_switches={("up", "bandwidth"): 3}, rtp_by_kind={"video": (1, 2, 3, 4)}
    )
    merged = merge([one, other])
    assert merged.layer_switches == {("up", "bandwidth"): 3}
    assert merged.rtp_by_kind["video"] == tuple(
        n + m for n, m in zip(one.rtp_by_kind["video"], (1, 2, 3, 4), strict=True)
    )
    assert merged.rtp_by_kind["audio"] == one.rtp_by_kind["audio"]


def test_merge_refuses_histograms_with_other_bounds(harness: EngineHarness) -> None:
    one = build_snapshot(harness.engine)
    join = one.join_latency
    other = dataclasses.replace(
        one, join_latency=HistogramData(join.bounds[:-1], join.counts[:-1], join.total)
    )
    with pytest.raises(ValueError, match="join_latency"):
        merge([one, other])
    video = one.first_frame_latency["video"]
    moved = HistogramData(tuple(2 * b for b in video.bounds), video.counts, video.total)
    other = dataclasses.replace(
        one, first_frame_latency={"audio": one.first_frame_latency["audio"], "video": moved}
    )
    with pytest.raises(ValueError, match=r"first_frame_latency\[video\]"):
        merge([one, other])
    with pytest.raises(ValueError, match="at least one"):
        merge([])
