"""Prometheus metrics for the control plane and the process.

Everything lives on one private registry (not prometheus_client's global one) so several
servers can run in one test process, and so /metrics shows exactly what Blindfold exports.
Media-plane counters are plain ints on the engine, exported by `MediaCollector` at scrape
time: `labels().inc()` costs about 4 µs, too much per packet. The collector reads them from a
`MediaSnapshot` (plain data a media worker process can send), never from live media objects,
so the snapshots of several workers can be merged into one exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sfu import __version__
from sfu.assurance import codecs_loaded
from sfu.media.envelope import STATES
from sfu.media.snapshot import POLICIES, HistogramData, MediaSnapshot
from sfu.media.stats import FORWARD_SAMPLE_EVERY

if TYPE_CHECKING:
    from sfu.cluster import Cluster
    from sfu.config import LimitsConfig
    from sfu.control.federation import Federation
    from sfu.rooms import Rooms

log = logging.getLogger(__name__)

LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, event_loop: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        build = Gauge(
            "sfu_build_info",
            "Always 1; the labels say which build is running.",
            ["version", "python", "event_loop"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version(), event_loop).set(1)
        self.ready = Gauge(
            "sfu_ready", "1 while the server accepts new sessions.", registry=self.registry
        )
        self.draining = Gauge(
            "sfu_draining",
            "1 after SIGTERM/SIGINT while sessions are given time to finish.",
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "sfu_event_loop_lag_seconds",
            "How late a periodic timer fires: time the event loop was blocked.",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "sfu_http_requests",
            "HTTP requests answered, by route pattern (not raw path) and status code.",
            ["route", "method", "code"],
            registry=self.registry,
        )

        self.admission_refusals = Counter(
            "sfu_admission_refusals",
            "New sessions refused by a limit: server_full (limits.max_sessions), rate_identity "
            "/ rate_ip (session_rate_per_*), identity_sessions, room_sessions, room_streams.",
            ["reason"],
            registry=self.registry,
        )
        self.http_malformed = Counter(
            "sfu_http_malformed_requests",
            "HTTP requests refused with 400 before routing because they could not be parsed "
            "(oversized header lines, bad framing); logged at DEBUG only.",
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def measure_loop_lag(histogram: Histogram, interval: float) -> None:
    """Sleep `interval` forever; how much later than asked each wake-up comes is the lag."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - start - interval))


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class AdmissionView(Protocol):
    """What the metrics read of admission control (`sfu.control.admission.Admission`)."""

    @property
    def limits(self) -> LimitsConfig: ...

    def sessions(self) -> int: ...


class RoomsView(Protocol):
    """What the metrics read of the room protocol (`sfu.control.rooms.RoomHub` is one):
    read-only, so the metrics need not import the signaling code."""

    @property
    def relay_messages(self) -> int:
        """Messages forwarded by the blind relay, one per recipient."""
        ...

    @property
    def relay_bytes(self) -> int:
        """Bytes of opaque payload forwarded by the blind relay."""
        ...

    def participant_identities(self) -> Iterable[tuple[str, str]]:
        """(room, identity) of every room-protocol participant."""
        ...


class MediaCollector(Collector):
    """Exports the media plane's plain-int counters at scrape time (none are touched per
    packet by prometheus_client, which would cost microseconds each).

    `snapshots` returns the media plane's numbers as one `MediaSnapshot` (with several media
    workers, `sfu.media.snapshot.merge` of theirs); sessions, rooms, participants and the
    relay are the control plane's and are read from its own views.
    """

    def __init__(
        self,
        snapshots: Callable[[], MediaSnapshot],
        rooms: Rooms,
        hub: RoomsView,
        admission: AdmissionView,
    ) -> None:
        self.snapshots = snapshots
        self.rooms = rooms
        self.hub = hub
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        media = self.snapshots()
        packets = CounterMetricFamily(
            "sfu_rtp_packets",
            "RTP packets received from publishers (in) and sent to subscribers (out, "
            "retransmissions included), by media kind.",
            labels=["direction", "kind"],
        )
        octets = CounterMetricFamily(
            "sfu_rtp_bytes",
            "Bytes of those RTP packets (header and payload, before SRTP).",
            labels=["direction", "kind"],
        )
        for kind, (p_in, b_in, p_out, b_out) in sorted(media.rtp_by_kind.items()):
            packets.add_metric(["in", kind], p_in)
            packets.add_metric(["out", kind], p_out)
            octets.add_metric(["in", kind], b_in)
            octets.add_metric(["out", kind], b_out)
        yield packets
        yield octets
        yield _counter(
            "sfu_rtcp_packets",
            "Compound RTCP datagrams received and sent.",
            "direction",
            {"in": media.rtcp_in, "out": media.rtcp_out},
        )
        yield _counter(
            "sfu_srtp_failures",
            "SRTP/SRTCP packets that failed to unprotect or protect.",
            None,
            {"": media.srtp_failures},
        )
        yield _counter(
            "sfu_dtls_handshakes",
            "DTLS handshakes by result (failed includes fingerprint mismatches).",
            "result",
            {"ok": media.dtls_ok, "failed": media.dtls_failed},
        )
        yield _counter(
            "sfu_ice_checks",
            "ICE connectivity checks (STUN Binding requests) by how they were handled.",
            "result",
            {
                "ok": media.ice_requests_ok,
                "unauthenticated": media.ice_requests_unauthenticated,
                "unknown_ufrag": media.ice_requests_unknown_ufrag,
                "malformed": media.ice_malformed,
                "role_conflict": media.ice_role_conflicts,
                "bad_request": media.ice_bad_requests,
                "address_cap": media.ice_address_cap_rejections,
            },
        )
        yield _counter(
            "sfu_ice_consent_expiries",
            "Transports closed because the client stopped sending ICE checks (RFC 7675).",
            None,
            {"": media.ice_consent_expiries},
        )
        yield _counter(
            "sfu_udp_datagrams_dropped",
            "Datagrams dropped before any session state: from an address no ICE check "
            "authenticated, of no known protocol, or that raised while being handled.",
            "reason",
            {
                "unknown_address": media.dropped_unknown_address,
                "unknown_type": media.dropped_unknown_type,
                "error": media.demux_errors,
                "send_failed": media.send_errors,
            },
        )
        yield _counter(
            "sfu_forward_errors",
            "Copies to one subscriber that could not be built or sent and were skipped; the "
            "other subscribers of the packet still got theirs. Logged once per subscriber track.",
            None,
            {"": media.forward_errors},
        )
        yield _counter(
            "sfu_rtp_unroutable",
            "RTP packets from publishers that matched no published track.",
            None,
            {"": media.rtp_unroutable},
        )
        yield _counter(
            "sfu_nacks",
            "Sequence numbers NACKed by subscribers, and what became of them (resent, not "
            "cached, or not resent by the subscriber's retransmission budget).",
            "result",
            {
                "received": media.nacks_received,
                "served": media.nacks_served,
                "missed": media.nacks_missed,
                "duplicate": media.nacks_duplicate,
                "too_old": media.nacks_too_old,
                "over_budget": media.nacks_over_budget,
            },
        )
        yield _counter(
            "sfu_keyframe_requests",
            "Keyframe requests (PLI) toward publishers: forwarded; throttled because one "
            "went out for that track within rtc.keyframe_request_interval; or suppressed by "
            "the asking subscriber's own budget (rtc.subscriber_keyframe_interval).",
            "result",
            {
                "forwarded": media.keyframe_requests_forwarded,
                "throttled": media.keyframe_requests_throttled,
                "suppressed": media.keyframe_requests_suppressed,
            },
        )
        yield _counter(
            "sfu_transport_feedback_sent",
            "Transport-wide congestion control feedback packets (RTCP RTPFB FMT 15) sent to "
            "publishers, whose own estimators set their send rate from them.",
            None,
            {"": media.twcc_feedback_sent},
        )
        yield _counter(
            "sfu_transport_feedback_received",
            "Transport-wide congestion control feedback packets (RTCP RTPFB FMT 15) received "
            "from subscribers, about the transport-wide numbers the SFU stamps on their media.",
            None,
            {"": media.twcc_feedback_received},
        )
        yield _counter(
            "sfu_transport_feedback_reported_packets",
            "Packets the SFU stamped toward subscribers, as their feedback first reported them: "
            "received or lost.",
            "result",
            {"received": media.twcc_reported_received, "lost": media.twcc_reported_lost},
        )
        yield _histogram(
            "sfu_subscriber_bandwidth_estimate_bps",
            "Send-side bandwidth estimates toward subscribers (bit/s, sfu/media/bwe.py), one "
            "observation per subscriber transport per second while it sends feedback.",
            media.bwe_estimates,
        )
        switches = CounterMetricFamily(
            "sfu_simulcast_layer_switches",
            "Simulcast layer switches of subscriptions, by direction (up, down) and reason: "
            "bandwidth (the subscriber's estimate), size (the size it shows the video at), "
            "publisher (the publisher stopped sending that layer).",
            labels=["direction", "reason"],
        )
        for direction in ("up", "down"):
            for reason in ("bandwidth", "size", "publisher"):
                switches.add_metric(
                    [direction, reason], media.layer_switches.get((direction, reason), 0)
                )
        yield switches
        yield GaugeMetricFamily(
            "sfu_simulcast_paused_subscriptions",
            "Subscriptions to simulcast video whose video is paused now: no layer fits the "
            "subscriber's bandwidth, or it shows the video at 0 x 0 (audio continues).",
            value=media.video_paused,
        )
        yield _counter(
            "sfu_bandwidth_probes",
            "Bandwidth probes toward subscribers (padding on top of their media, to see whether "
            "a higher simulcast layer would get through), by how they ended.",
            "result",
            {"succeeded": media.probes_succeeded, "failed": media.probes_failed},
        )
        yield _counter(
            "sfu_probe_padding_bytes",
            "Padding bytes sent to subscribers by bandwidth probes (RTX padding-only packets).",
            None,
            {"": media.probe_padding_bytes},
        )
        yield _counter(
            "sfu_keyframe_cache_hits",
            "Subscriber video copies started on the track's cached packets since its last "
            "keyframe (rtc.keyframe_cache) instead of waiting for a new keyframe.",
            None,
            {"": media.keyframe_cache_hits},
        )
        yield _counter(
            "sfu_rtx_packets_sent",
            "Retransmissions sent to subscribers on their RTX streams (RFC 4588).",
            None,
            {"": media.rtx_sent},
        )
        yield _histogram(
            "sfu_forward_latency_seconds",
            "Time from receiving an RTP packet to its last send to subscribers, sampled 1 in "
            f"{FORWARD_SAMPLE_EVERY} packets.",
            media.forward_latency,
        )
        yield _histogram(
            "sfu_join_latency_seconds",
            "From a subscribe request to the first packet forwarded to that subscriber.",
            media.join_latency,
        )
        first = HistogramMetricFamily(
            "sfu_first_frame_seconds",
            "From a subscribe request to the first frame forwarded, per media kind (video "
            "waits for a keyframe).",
            labels=["kind"],
        )
        for kind, histogram in sorted(media.first_frame_latency.items()):
            first.add_metric([kind], _buckets(histogram), histogram.total)
        yield first
        states = GaugeMetricFamily(
            "sfu_transports", "Client transports by state (ICE/DTLS progress).", labels=["state"]
        )
        for state in ("new", "connecting", "connected"):
            states.add_metric([state], media.transports_by_state.get(state, 0))
        yield states
        yield _counter(
            "sfu_keyframe_requests_received",
            "PLI and FIR messages received from subscribers.",
            "type",
            {"pli": media.pli_received, "fir": media.fir_received},
        )
        frames = CounterMetricFamily(
            "sfu_e2ee_frames",
            "Frames whose payload, after the documented clear prefix, carries a consistent "
            "SFrame header (envelope=sframe) or not (none); judged without any key.",
            labels=["kind", "envelope"],
        )
        for kind, (none, sframe) in sorted(media.e2ee_frames.items()):
            frames.add_metric([kind, "sframe"], sframe)
            frames.add_metric([kind, "none"], none)
        yield frames
        tracks = GaugeMetricFamily(
            "sfu_e2ee_tracks",
            "Published tracks by envelope verdict over their recent frames, and by the e2ee "
            "policy of their room.",
            labels=["state", "policy"],
        )
        for state in STATES:
            for policy in POLICIES:
                tracks.add_metric([state, policy], media.e2ee_tracks.get((state, policy), 0))
        yield tracks
        tracks_gauge = GaugeMetricFamily(
            "sfu_published_tracks", "Tracks being published, by media kind.", labels=["kind"]
        )
        published = {"audio": 0, "video": 0} | dict(media.published_tracks)
        for kind, count in sorted(published.items()):
            tracks_gauge.add_metric([kind], count)
        yield tracks_gauge
        yield GaugeMetricFamily(
            "sfu_subscriptions",
            "Subscribed tracks (one per subscriber and published track).",
            value=media.subscriptions,
        )
        participants: set[tuple[str, str]] = set(self.hub.participant_identities())
        for session in self.rooms.all_sessions():
            participants.add((session.room, session.identity))
        yield GaugeMetricFamily(
            "sfu_participants",
            "Distinct identities with at least one session, counted per room.",
            value=len(participants),
        )
        yield _counter(
            "sfu_payload_integrity_checks",
            "Sampled comparisons of forwarded payload bytes with received ones; mismatch must "
            "stay 0.",
            "result",
            {"match": media.integrity_match, "mismatch": media.integrity_mismatch},
        )
        sessions = GaugeMetricFamily(
            "sfu_media_sessions",
            "Open WHIP (publish) and WHEP (subscribe) sessions.",
            labels=["kind"],
        )
        counts = {"whip": 0, "whep": 0}
        for session in self.rooms.all_sessions():
            counts[session.kind] = counts.get(session.kind, 0) + 1
        for kind, value in counts.items():
            sessions.add_metric([kind], value)
        yield sessions
        yield GaugeMetricFamily(
            "sfu_rooms", "Rooms with at least one session.", value=len(self.rooms)
        )
        yield GaugeMetricFamily(
            "sfu_admitted_sessions",
            "WHIP/WHEP sessions plus room participants, as counted against limits.max_sessions.",
            value=self.admission.sessions(),
        )
        yield GaugeMetricFamily(
            "sfu_admitted_sessions_limit",
            "limits.max_sessions: at this many sessions /readyz reports saturation.",
            value=self.admission.limits.max_sessions,
        )
        yield _counter(
            "sfu_handshake_timeouts",
            "Transports closed because the client did not complete ICE and DTLS within "
            "rtc.handshake_timeout.",
            None,
            {"": media.handshake_timeouts},
        )
        yield GaugeMetricFamily(
            "sfu_relay_transports",
            "Ends of relays between media workers that are open (each relay has one end on "
            "each of its two workers; not counted in sfu_transports).",
            value=media.relay_transports,
        )
        yield _counter(
            "sfu_relay_packets_sent",
            "RTP packets sent into relays to other media workers (one copy per track and "
            "receiving worker).",
            None,
            {"": media.relay_packets_sent},
        )
        yield _counter(
            "sfu_relay_bytes_sent",
            "RTP payload bytes sent into relays to other media workers.",
            None,
            {"": media.relay_bytes_sent},
        )
        yield _counter(
            "sfu_e2ee_relay_messages",
            "E2EE key-exchange messages forwarded by the blind relay (one per recipient); "
            "their content is never parsed, stored or logged.",
            None,
            {"": self.hub.relay_messages},
        )
        yield _counter(
            "sfu_e2ee_relay_bytes",
            "Bytes of opaque payload forwarded by the blind relay.",
            None,
            {"": self.hub.relay_bytes},
        )
        yield GaugeMetricFamily(
            "sfu_media_codecs_loaded",
            "Media codec modules imported and codec libraries mapped into this process, "
            "measured at scrape time. 0 is the only healthy value.",
            value=len(codecs_loaded()),
        )
        yield GaugeMetricFamily(
            "sfu_media_fastpath_enabled",
            "1 while media is forwarded by the native fan-out core, 0 on the pure-Python path "
            "(rtc.fastpath: off, or the extension is not built).",
            value=1 if media.fastpath_enabled else 0,
        )


@dataclass(frozen=True)
class WorkerStatus:
    """One media worker as /metrics shows it (the server process itself with one worker)."""

    index: int
    pid: int
    udp_port: int
    running: bool
    restarts: int
    # Client transports on it (what room placement balances).
    transports: int = 0


@dataclass(frozen=True)
class MeshStatus:
    """Rooms across workers: relays and the tracks they carry (all zero with one worker)."""

    relays: int = 0
    relayed_tracks: int = 0
    relays_opened: int = 0
    relays_failed: int = 0


class WorkerCollector(Collector):
    """How many media workers run, which process and port each is, and their restarts."""

    def __init__(
        self,
        status: Callable[[], list[WorkerStatus]],
        mesh: Callable[[], MeshStatus] = MeshStatus,
    ) -> None:
        self.status = status
        self.mesh = mesh

    def collect(self) -> Iterator[Metric]:
        workers = self.status()
        yield GaugeMetricFamily(
            "sfu_media_workers",
            "Media workers running (rtc.workers; 1: the media plane runs in the server process).",
            value=sum(1 for w in workers if w.running),
        )
        info = GaugeMetricFamily(
            "sfu_media_worker_info",
            "Always 1 per running media worker; the labels say its process and UDP port.",
            labels=["worker", "pid", "udp_port"],
        )
        for w in workers:
            if w.running:
                info.add_metric([str(w.index), str(w.pid), str(w.udp_port)], 1)
        yield info
        restarts = CounterMetricFamily(
            "sfu_media_worker_restarts",
            "Media workers restarted by the supervisor after they exited unexpectedly (their "
            "transports were closed; clients reconnect).",
            labels=["worker"],
        )
        for w in workers:
            restarts.add_metric([str(w.index)], w.restarts)
        yield restarts
        load = GaugeMetricFamily(
            "sfu_media_worker_transports",
            "Client transports on each running media worker (rooms are placed by this).",
            labels=["worker"],
        )
        for w in workers:
            if w.running:
                load.add_metric([str(w.index)], w.transports)
        yield load
        mesh = self.mesh()
        yield GaugeMetricFamily(
            "sfu_relays",
            "Relays open between pairs of media workers (a room spans workers).",
            value=mesh.relays,
        )
        yield GaugeMetricFamily(
            "sfu_relayed_tracks",
            "Tracks copied to another media worker through a relay (one per track and "
            "receiving worker, however many subscribers it has there).",
            value=mesh.relayed_tracks,
        )
        yield _counter(
            "sfu_relays_opened",
            "Relays opened between media workers.",
            None,
            {"": mesh.relays_opened},
        )
        yield _counter(
            "sfu_relays_failed",
            "Relays that closed before both ends had connected, or broke while both workers "
            "ran (their subscribers were closed and reconnect).",
            None,
            {"": mesh.relays_failed},
        )


class ClusterCollector(Collector):
    """This node's view of the cluster (cluster.enabled only)."""

    def __init__(self, cluster: Cluster, federation: Federation | None = None) -> None:
        self.cluster = cluster
        self.federation = federation

    def collect(self) -> Iterator[Metric]:
        cluster = self.cluster
        yield GaugeMetricFamily(
            "sfu_cluster_up",
            "1 while this node's last exchange with Redis worked (heartbeat or placement).",
            value=1 if cluster.up else 0,
        )
        nodes = GaugeMetricFamily(
            "sfu_cluster_node_load",
            "Live nodes as last read from Redis, with the load (sessions and participants) "
            "each reported; a node that stops heartbeating drops out within cluster.node_ttl.",
            labels=["node"],
        )
        for node in cluster.nodes:
            nodes.add_metric([node.id], node.load)
        yield nodes
        yield _counter(
            "sfu_cluster_placements",
            "Room placements decided here: served on this node (local), sent to the room's "
            "node (redirect), or served here because Redis did not answer (unavailable).",
            "result",
            dict(cluster.placements),
        )
        yield _counter(
            "sfu_cluster_redis_errors",
            "Heartbeats and placements that failed because Redis did not answer.",
            None,
            {"": cluster.redis_errors},
        )
        federation = self.federation
        if federation is not None:
            yield GaugeMetricFamily(
                "sfu_cluster_relays",
                "Relays open to other nodes (cluster.rooms: span; one per node this node shares "
                "a room with).",
                value=federation.links(),
            )
            yield GaugeMetricFamily(
                "sfu_cluster_remote_participants",
                "Participants on other nodes shown in this node's rooms.",
                value=federation.remote_participants(),
            )
            yield _counter(
                "sfu_cluster_feeds",
                "Tracks of this node that another node asked to receive over a relay.",
                None,
                {"": federation.feeds_served},
            )
            yield _counter(
                "sfu_cluster_state_errors",
                "Failed exchanges of room state, relay setup or key-exchange messages through "
                "Redis (retried).",
                None,
                {"": federation.errors},
            )
        yield _counter(
            "sfu_cluster_rooms_taken",
            "Heartbeats that found a room with sessions here placed on another node (after a "
            "Redis restart or a partition).",
            None,
            {"": cluster.rooms_taken},
        )


def _buckets(histogram: HistogramData) -> list[tuple[str, float]]:
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        cumulative += count
        out.append((repr(bound), cumulative))
    out.append(("+Inf", cumulative + histogram.counts[-1]))
    return out


def _histogram(name: str, documentation: str, histogram: HistogramData) -> Metric:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], _buckets(histogram), histogram.total)
    return family


def _counter(
    name: str, documentation: str, label: str | None, values: dict[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label] if label else None)
    for label_value, value in values.items():
        family.add_metric([label_value] if label else [], value)
    return family
