"""Media-plane counters: plain ints and lists bumped on the packet path, read at scrape time.

Shared lists (rather than per-track fields) keep exported counters monotonic when the tracks
that bumped them are gone.
"""

from __future__ import annotations

import bisect

FORWARD_BUCKETS = (
    0.000005,
    0.00001,
    0.00002,
    0.00005,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
)
JOIN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Subscriber bandwidth estimates (bit/s): sfu/media/bwe.py keeps them in 30k-20M.
BWE_BUCKETS = (
    50_000.0,
    100_000.0,
    250_000.0,
    500_000.0,
    1_000_000.0,
    1_500_000.0,
    2_500_000.0,
    5_000_000.0,
    10_000_000.0,
    20_000_000.0,
)
FORWARD_SAMPLE_EVERY = 64


class LatencyHistogram:
    """Bucket counts as plain ints; exported as a Prometheus histogram at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class MediaStats:
    """Plain-int counters shared by all transports of one engine (exported per scrape)."""

    __slots__ = (
        "bwe_estimates",
        "by_kind",
        "dtls_failed",
        "dtls_ok",
        "e2ee_frames",
        "fir_received",
        "first_frame_latency",
        "forward_errors",
        "forward_latency",
        "integrity",
        "join_latency",
        "keyframe_cache_hits",
        "keyframe_requests",
        "layer_switches",
        "nacks_missed",
        "nacks_received",
        "nacks_served",
        "nacks_suppressed",
        "pli_received",
        "probes",
        "rtcp_in",
        "rtcp_malformed",
        "rtcp_out",
        "rtp_bytes_in",
        "rtp_bytes_out",
        "rtp_in",
        "rtp_out",
        "rtp_unroutable",
        "rtx_sent",
        "srtp_failures",
        "twcc_feedback_received",
        "twcc_feedback_sent",
        "twcc_reported",
        "video_paused",
    )

    def __init__(self) -> None:
        # [packets in, bytes in, packets out, bytes out] of RTP (before SRTP) per media kind.
        self.by_kind: dict[str, list[int]] = {"audio": [0, 0, 0, 0], "video": [0, 0, 0, 0]}
        # Keyframe requests (PLI), summed over all tracks: [sent to publishers, throttled by
        # the per-track interval, suppressed by a subscriber's own budget].
        self.keyframe_requests = [0, 0, 0]
        # Copies started on a producer's keyframe cache instead of waiting for a keyframe.
        self.keyframe_cache_hits = 0
        # Simulcast: layer switches by (direction, reason), and subscriptions whose video is
        # paused now because no layer fits (or the subscriber asked for none).
        self.layer_switches: dict[tuple[str, str], int] = {}
        self.video_paused = 0
        # Bandwidth probes toward subscribers: [started, succeeded, failed, padding bytes].
        self.probes = [0, 0, 0, 0]
        self.rtx_sent = [0]
        # Sampled: receive to last send of one packet, in seconds.
        self.forward_latency = LatencyHistogram(FORWARD_BUCKETS)
        # Subscribe request to the first forwarded packet of the session / first frame.
        self.join_latency = LatencyHistogram(JOIN_BUCKETS)
        self.first_frame_latency = {
            "audio": LatencyHistogram(JOIN_BUCKETS),
            "video": LatencyHistogram(JOIN_BUCKETS),
        }
        # [frames without envelope, frames with] per kind, for sfu_e2ee_frames_total.
        self.e2ee_frames: dict[str, list[int]] = {"audio": [0, 0], "video": [0, 0]}
        # [match, mismatch] of sampled payload comparisons, for sfu_payload_integrity_*.
        self.integrity = [0, 0]
        self.dtls_failed = 0
        self.dtls_ok = 0
        self.fir_received = 0
        self.nacks_missed = 0
        self.nacks_received = 0
        self.nacks_served = 0
        # NACKed packets not resent: [already resent within an RTT, too old, over budget].
        self.nacks_suppressed = [0, 0, 0]
        # Copies to one subscriber that raised while being built or sent, skipped so that the
        # other subscribers still get theirs (sfu_forward_errors_total).
        self.forward_errors = 0
        self.twcc_feedback_sent = 0
        # Transport-wide feedback from subscribers: packets received, and the stamped
        # packets they reported [received, lost]; one estimate per subscriber per second.
        self.twcc_feedback_received = 0
        self.twcc_reported = [0, 0]
        self.bwe_estimates = LatencyHistogram(BWE_BUCKETS)
        self.pli_received = 0
        self.rtcp_in = 0
        self.rtcp_malformed = 0
        self.rtcp_out = 0
        self.rtp_bytes_in = 0
        self.rtp_bytes_out = 0
        self.rtp_in = 0
        self.rtp_out = 0
        self.rtp_unroutable = 0
        self.srtp_failures = 0

    def count_switch(self, direction: str, reason: str) -> None:
        key = (direction, reason)
        self.layer_switches[key] = self.layer_switches.get(key, 0) + 1
