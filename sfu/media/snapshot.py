"""`MediaSnapshot`: the media plane's counters and gauges at one moment, as plain data.

/metrics is built from snapshots rather than from live engine objects so that the media plane
can run in worker processes: each worker sends `snapshot.to_dict()` over its channel (JSON or
pickle both work), the control plane turns it back with `MediaSnapshot.from_dict` and exports
`merge(...)` of all workers' snapshots. Every field is an int, float, bool, str, tuple or
dict of those, so nothing in a snapshot refers back to the engine that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sfu.media.envelope import STATES

if TYPE_CHECKING:
    # Types only: the engine may build its own snapshots by importing this module.
    from sfu.media.engine import MediaEngine
    from sfu.media.stats import LatencyHistogram

# The e2ee policy of a published track's room, as sfu_e2ee_tracks{policy} names it.
POLICIES = ("required", "optional")
MEDIA_KINDS = ("audio", "video")


class HistogramData(NamedTuple):
    """A histogram as plain data: `counts` has one entry per bound plus the last for +Inf
    (not cumulative); `total` is the sum of the observed values."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @classmethod
    def of(cls, histogram: LatencyHistogram) -> HistogramData:
        return cls(tuple(histogram.bounds), tuple(histogram.counts), histogram.total)


@dataclass(frozen=True)
class MediaSnapshot:
    """One media plane's (or, after `merge`, several's) counters and gauges for /metrics."""

    # RTP (before SRTP) per media kind: (packets in, bytes in, packets out, bytes out).
    rtp_by_kind: Mapping[str, tuple[int, int, int, int]]
    # Compound RTCP datagrams received from and sent to clients.
    rtcp_in: int
    rtcp_out: int
    # SRTP/SRTCP packets that failed to unprotect or protect.
    srtp_failures: int
    # DTLS handshakes completed, and failed (fingerprint mismatches included).
    dtls_ok: int
    dtls_failed: int
    # ICE connectivity checks answered with success.
    ice_requests_ok: int
    # ICE checks refused: bad MESSAGE-INTEGRITY or USERNAME.
    ice_requests_unauthenticated: int
    # ICE checks naming a ufrag no session has.
    ice_requests_unknown_ufrag: int
    # STUN messages that could not be parsed.
    ice_malformed: int
    # ICE checks answered 487 Role Conflict.
    ice_role_conflicts: int
    # ICE checks answered 400 Bad Request.
    ice_bad_requests: int
    # ICE checks refused because the session already had its maximum of addresses.
    ice_address_cap_rejections: int
    # Transports closed because the client stopped sending ICE checks (RFC 7675).
    ice_consent_expiries: int
    # Datagrams from an address no ICE check authenticated.
    dropped_unknown_address: int
    # Datagrams of no known protocol (not STUN, DTLS, RTP or RTCP).
    dropped_unknown_type: int
    # Datagrams whose handling raised.
    demux_errors: int
    # Datagrams the socket refused to send (buffer full).
    send_errors: int
    # Copies to one subscriber skipped because building or sending them raised.
    forward_errors: int
    # Publisher RTP that matched no published track.
    rtp_unroutable: int
    # Sequence numbers NACKed by subscribers.
    nacks_received: int
    # NACKed packets resent from the cache.
    nacks_served: int
    # NACKed packets not in the cache.
    nacks_missed: int
    # NACKed packets not resent: sent to that subscriber less than a round trip ago.
    nacks_duplicate: int
    # NACKed packets not resent: received more than the cache's age limit ago.
    nacks_too_old: int
    # NACKed packets not resent: the subscriber's retransmission budget was spent.
    nacks_over_budget: int
    # Keyframe requests (PLI) sent to publishers.
    keyframe_requests_forwarded: int
    # Keyframe requests dropped by the per-track interval toward the publisher.
    keyframe_requests_throttled: int
    # Keyframe requests dropped by the asking subscriber's own budget.
    keyframe_requests_suppressed: int
    # PLI and FIR messages received from subscribers.
    pli_received: int
    fir_received: int
    # Transport-wide feedback packets sent to publishers.
    twcc_feedback_sent: int
    # Transport-wide feedback packets received from subscribers.
    twcc_feedback_received: int
    # Stamped packets toward subscribers as their feedback first reported them.
    twcc_reported_received: int
    twcc_reported_lost: int
    # Send-side bandwidth estimates toward subscribers (bit/s).
    bwe_estimates: HistogramData
    # Simulcast layer switches by (direction, reason).
    layer_switches: Mapping[tuple[str, str], int]
    # Gauge: simulcast subscriptions whose video is paused now.
    video_paused: int
    # Bandwidth probes that succeeded and failed, and the padding bytes they sent.
    probes_succeeded: int
    probes_failed: int
    probe_padding_bytes: int
    # Subscriber video copies started on a track's keyframe cache.
    keyframe_cache_hits: int
    # Retransmissions sent on subscribers' RTX streams.
    rtx_sent: int
    # Sampled receive-to-last-send time of RTP packets (seconds).
    forward_latency: HistogramData
    # Subscribe request to first packet forwarded (seconds).
    join_latency: HistogramData
    # Subscribe request to first frame forwarded, per media kind (seconds).
    first_frame_latency: Mapping[str, HistogramData]
    # Frames judged per media kind: (without an SFrame envelope, with one).
    e2ee_frames: Mapping[str, tuple[int, int]]
    # Sampled payload comparisons of forwarded with received bytes.
    integrity_match: int
    integrity_mismatch: int
    # Gauge: client transports by state value ("new", "connecting", "connected", ...).
    transports_by_state: Mapping[str, int]
    # Transports closed because ICE and DTLS did not complete within the handshake timeout.
    handshake_timeouts: int
    # Gauge: whether media is forwarded by the native core (all workers, after a merge).
    fastpath_enabled: bool
    # Gauge: published tracks (not closed) per media kind; a simulcast track counts once.
    published_tracks: Mapping[str, int]
    # Gauge: published tracks by (envelope verdict, "required" or "optional" e2ee policy).
    e2ee_tracks: Mapping[tuple[str, str], int]
    # Gauge: down-tracks not closed on all transports (WHEP and room-protocol subscribers).
    subscriptions: int
    # Gauge: ends of relays to other media planes (not counted as transports above; their
    # mirrored tracks and feeds are not counted as tracks or subscriptions either).
    relay_transports: int = 0
    # Counters: RTP packets and payload bytes this plane sent into relays.
    relay_packets_sent: int = 0
    relay_bytes_sent: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: string keys, lists for tuples; `from_dict` restores it exactly."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _HISTOGRAMS:
                out[f.name] = _histogram_to_json(value)
            elif f.name in _HISTOGRAM_MAPS:
                out[f.name] = {key: _histogram_to_json(h) for key, h in value.items()}
            elif f.name in _PAIR_KEYED:
                # JSON object keys are strings only: tuple keys travel as [[a, b], n] rows.
                out[f.name] = [[list(key), n] for key, n in value.items()]
            elif f.name in _TUPLE_VALUED:
                out[f.name] = {key: list(row) for key, row in value.items()}
            elif isinstance(value, Mapping):
                out[f.name] = dict(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MediaSnapshot:
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data[f.name]
            if f.name in _HISTOGRAMS:
                values[f.name] = _histogram_from_json(value)
            elif f.name in _HISTOGRAM_MAPS:
                values[f.name] = {key: _histogram_from_json(h) for key, h in value.items()}
            elif f.name in _PAIR_KEYED:
                values[f.name] = {(a, b): n for (a, b), n in value}
            elif f.name in _TUPLE_VALUED:
                values[f.name] = {key: tuple(row) for key, row in value.items()}
            elif isinstance(value, Mapping):
                values[f.name] = dict(value)
            else:
                values[f.name] = value
        return cls(**values)


# Fields whose values are not plain numbers or str-keyed dicts of numbers: they need their
# own JSON encoding and their own way of being merged.
_HISTOGRAMS = frozenset({"bwe_estimates", "forward_latency", "join_latency"})
_HISTOGRAM_MAPS = frozenset({"first_frame_latency"})
_PAIR_KEYED = frozenset({"layer_switches", "e2ee_tracks"})
_TUPLE_VALUED = frozenset({"rtp_by_kind", "e2ee_frames"})


def build_snapshot(engine: MediaEngine) -> MediaSnapshot:
    """Read one engine's counters and count its live transports, tracks and subscriptions."""
    # `engine.stats` folds the native core's counters into the stats and into `demux`, so it
    # is read before `demux`.
    stats = engine.stats
    demux, agent = engine.demux, engine.agent
    by_state: dict[str, int] = {}
    published = dict.fromkeys(MEDIA_KINDS, 0)
    verdicts = {(state, policy): 0 for state in STATES for policy in POLICIES}
    subscriptions = 0
    relays = 0
    relay_packets, relay_bytes = engine.relay_sent
    for transport in engine.transports.values():
        if transport.role == "relay":
            relays += transport.state.value != "closed"
            for d in {id(d): d for d in transport.downtracks_by_ssrc.values()}.values():
                relay_packets += d.packets_sent
                relay_bytes += d.octets_sent
            continue
        state = transport.state.value
        by_state[state] = by_state.get(state, 0) + 1
        for producer in transport.producers:
            if producer.closed:
                continue
            published[producer.kind] = published.get(producer.kind, 0) + 1
            policy = "required" if producer.e2ee_required else "optional"
            key = (producer.envelope.state, policy)
            verdicts[key] = verdicts.get(key, 0) + 1
        # A down-track with an RTX stream is listed under both of its SSRCs.
        downtracks = {id(d): d for d in transport.downtracks_by_ssrc.values()}
        subscriptions += sum(1 for d in downtracks.values() if not d.closed)
    nacks_duplicate, nacks_too_old, nacks_over_budget = stats.nacks_suppressed
    forwarded, throttled, suppressed = stats.keyframe_requests
    return MediaSnapshot(
        rtp_by_kind={kind: (row[0], row[1], row[2], row[3]) for kind, row in stats.by_kind.items()},
        rtcp_in=stats.rtcp_in,
        rtcp_out=stats.rtcp_out,
        srtp_failures=stats.srtp_failures,
        dtls_ok=stats.dtls_ok,
        dtls_failed=stats.dtls_failed,
        ice_requests_ok=agent.requests_ok,
        ice_requests_unauthenticated=agent.requests_unauthenticated,
        ice_requests_unknown_ufrag=agent.requests_unknown_ufrag,
        ice_malformed=agent.malformed,
        ice_role_conflicts=agent.role_conflicts,
        ice_bad_requests=agent.bad_requests,
        ice_address_cap_rejections=agent.address_cap_rejections,
        ice_consent_expiries=agent.consent_expiries,
        dropped_unknown_address=demux.dropped_unknown_address,
        dropped_unknown_type=demux.dropped_unknown_type,
        demux_errors=demux.errors,
        send_errors=demux.send_errors,
        forward_errors=stats.forward_errors,
        rtp_unroutable=stats.rtp_unroutable,
        nacks_received=stats.nacks_received,
        nacks_served=stats.nacks_served,
        nacks_missed=stats.nacks_missed,
        nacks_duplicate=nacks_duplicate,
        nacks_too_old=nacks_too_old,
        nacks_over_budget=nacks_over_budget,
        keyframe_requests_forwarded=forwarded,
        keyframe_requests_throttled=throttled,
        keyframe_requests_suppressed=suppressed,
        pli_received=stats.pli_received,
        fir_received=stats.fir_received,
        twcc_feedback_sent=stats.twcc_feedback_sent,
        twcc_feedback_received=stats.twcc_feedback_received,
        twcc_reported_received=stats.twcc_reported[0],
        twcc_reported_lost=stats.twcc_reported[1],
        bwe_estimates=HistogramData.of(stats.bwe_estimates),
        layer_switches=dict(stats.layer_switches),
        video_paused=stats.video_paused,
        probes_succeeded=stats.probes[1],
        probes_failed=stats.probes[2],
        probe_padding_bytes=stats.probes[3],
        keyframe_cache_hits=stats.keyframe_cache_hits,
        rtx_sent=stats.rtx_sent[0],
        forward_latency=HistogramData.of(stats.forward_latency),
        join_latency=HistogramData.of(stats.join_latency),
        first_frame_latency={
            kind: HistogramData.of(histogram)
            for kind, histogram in stats.first_frame_latency.items()
        },
        e2ee_frames={kind: (row[0], row[1]) for kind, row in stats.e2ee_frames.items()},
        integrity_match=stats.integrity[0],
        integrity_mismatch=stats.integrity[1],
        transports_by_state=by_state,
        handshake_timeouts=engine.handshake_timeouts,
        fastpath_enabled=engine.fastpath_enabled,
        published_tracks=published,
        e2ee_tracks=verdicts,
        subscriptions=subscriptions,
        relay_transports=relays,
        relay_packets_sent=relay_packets,
        relay_bytes_sent=relay_bytes,
    )


def merge(snapshots: Sequence[MediaSnapshot]) -> MediaSnapshot:
    """Several media planes' snapshots as one: counters, gauges and histogram counts summed
    (dict entries key by key), `fastpath_enabled` only if every one has it.

    Raises ValueError for an empty sequence (there is nothing to say which histogram bounds
    the result would have), and naming the histogram when two have different bounds.
    """
    if not snapshots:
        raise ValueError("merge needs at least one snapshot")
    values: dict[str, Any] = {}
    for f in fields(MediaSnapshot):
        parts = [getattr(s, f.name) for s in snapshots]
        if f.name == "fastpath_enabled":
            values[f.name] = all(parts)
        elif f.name in _HISTOGRAMS:
            values[f.name] = _merge_histograms(f.name, parts)
        elif f.name in _HISTOGRAM_MAPS:
            values[f.name] = _merge_maps(parts, _keyed_histograms(f.name))
        elif f.name in _TUPLE_VALUED:
            values[f.name] = _merge_maps(parts, lambda _key, rows: _sum_rows(rows))
        elif isinstance(parts[0], Mapping):
            values[f.name] = _merge_maps(parts, lambda _key, ns: sum(ns))
        else:
            values[f.name] = sum(parts)
    return MediaSnapshot(**values)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _merge_maps(
    maps: Sequence[Mapping[_K, _V]], combine: Callable[[_K, list[_V]], _V]
) -> dict[_K, _V]:
    # A key only some workers have (a media kind none of the others saw) is kept, combined
    # over the workers that have it.
    keys = dict.fromkeys(key for m in maps for key in m)
    return {key: combine(key, [m[key] for m in maps if key in m]) for key in keys}


def _sum_rows(rows: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sum(column) for column in zip(*rows, strict=True))


def _keyed_histograms(name: str) -> Callable[[str, list[HistogramData]], HistogramData]:
    def combine(key: str, histograms: list[HistogramData]) -> HistogramData:
        return _merge_histograms(f"{name}[{key}]", histograms)

    return combine


def _merge_histograms(name: str, histograms: list[HistogramData]) -> HistogramData:
    bounds = histograms[0].bounds
    for histogram in histograms[1:]:
        if histogram.bounds != bounds:
            raise ValueError(
                f"cannot merge histogram {name}: bounds {histogram.bounds} differ from {bounds}"
            )
    counts = tuple(sum(column) for column in zip(*(h.counts for h in histograms), strict=True))
    return HistogramData(bounds, counts, sum(h.total for h in histograms))


def _histogram_to_json(histogram: HistogramData) -> list[Any]:
    return [list(histogram.bounds), list(histogram.counts), histogram.total]


def _histogram_from_json(value: Sequence[Any]) -> HistogramData:
    bounds, counts, total = value
    return HistogramData(tuple(bounds), tuple(counts), total)
