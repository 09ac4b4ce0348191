"""/metrics from media snapshots: the collector exports what it is given, merged across
media workers, and reads no live media object."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sfu.config import LimitsConfig
from sfu.media.snapshot import MediaSnapshot, build_snapshot, merge
from sfu.metrics import MediaCollector
from sfu.rooms import Rooms
from tests.engine.harness import EngineHarness
from tests.media.test_snapshot import run_traffic


class Hub:
    """The room protocol's read-only view (RoomsView): no participants, no relay traffic."""

    relay_messages = 0
    relay_bytes = 0

    def participant_identities(self) -> Iterable[tuple[str, str]]:
        return ()


class Admission:
    limits = LimitsConfig()

    def sessions(self) -> int:
        return 0


def scrape(
    snapshot: MediaSnapshot,
) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition text of a collector fed `snapshot`, and its samples by (name, labels)."""
    registry = CollectorRegistry()
    registry.register(MediaCollector(lambda: snapshot, Rooms(10), Hub(), Admission()))
    text = generate_latest(registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def test_metrics_of_merged_worker_snapshots_are_summed() -> None:
    a, b = EngineHarness(), EngineHarness(fastpath="off")
    run_traffic(a)
    run_traffic(b)
    first, second = build_snapshot(a.engine), build_snapshot(b.engine)

    _, one = scrape(first)
    text, both = scrape(merge([first, second]))

    video_in = ("sfu_rtp_packets_total", (("direction", "in"), ("kind", "video")))
    assert both[video_in] == first.rtp_by_kind["video"][0] + second.rtp_by_kind["video"][0] > 0
    assert 'sfu_rtp_packets_total{direction="in",kind="video"}' in text
    summed = [
        video_in,
        ("sfu_rtp_bytes_total", (("direction", "out"), ("kind", "audio"))),
        ("sfu_ice_checks_total", (("result", "ok"),)),
        ("sfu_udp_datagrams_dropped_total", (("reason", "unknown_address"),)),
        ("sfu_keyframe_requests_received_total", (("type", "pli"),)),
        ("sfu_subscriptions", ()),
        ("sfu_published_tracks", (("kind", "video"),)),
        ("sfu_transports", (("state", "connected"),)),
        ("sfu_join_latency_seconds_count", ()),
        ("sfu_join_latency_seconds_sum", ()),
        ("sfu_join_latency_seconds_bucket", (("le", "0.5"),)),
        ("sfu_first_frame_seconds_count", (("kind", "video"),)),
    ]
    for key in summed:
        assert one[key] > 0, key
        assert both[key] == 2 * one[key], key  # both engines saw the same traffic
    # Control-plane numbers come from the control plane's views, not from the snapshots.
    assert both[("sfu_rooms", ())] == 0
    assert both[("sfu_media_sessions", (("kind", "whip"),))] == 0
    # One worker on the pure-Python path: the merged plane is not all native.
    assert both[("sfu_media_fastpath_enabled", ())] == 0


def test_a_snapshot_off_the_wire_renders_as_the_one_built() -> None:
    harness = EngineHarness()
    run_traffic(harness)
    snapshot = build_snapshot(harness.engine)
    wired = MediaSnapshot.from_dict(snapshot.to_dict())
    assert scrape(wired)[0] == scrape(snapshot)[0]
