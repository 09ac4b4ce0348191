"""Microbenchmark of transport-wide congestion control feedback (sfu/media/twcc.py).

Run: python bench/bench_twcc.py [iterations]. Prints microseconds per operation, the best of
five rounds (the machine is shared and noisy; the minimum is the least disturbed figure):
the per-packet cost (reading the sequence number from a Chrome-shaped packet, one clock read,
`record`) and the timer's cost of one feedback round.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_rtp import measure, packet_1200
from sfu.media import rtp
from sfu.media.twcc import TwccRecorder


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    data = packet_1200()
    hdr = rtp.parse_header(data)
    assert hdr is not None
    assert rtp.read_transport_seq(data, hdr, 3) == 4242
    recorder = TwccRecorder()
    seq = [0]

    def record() -> None:
        recorder.record(seq[0] & 0xFFFF, time.monotonic())
        seq[0] += 1

    def per_packet() -> None:
        found = rtp.read_transport_seq(data, hdr, 3)
        if found >= 0:
            recorder.record(seq[0] & 0xFFFF, time.monotonic())
            seq[0] += 1

    rounds = [0.0]

    def feedback_round(packets: int) -> None:
        # `packets` arrivals (about 1 ms apart), then the timer's build; the build is timed
        # together with the recording, so subtract `packets` x record for the build alone.
        now = rounds[0] = rounds[0] + 1.0
        for k in range(packets):
            recorder.record(seq[0] & 0xFFFF, now + k * 0.001)
            seq[0] += 1
        recorder.build_feedback(1, 2, now + 0.5)

    rows = [
        (
            "read_transport_seq (one-byte form, 3rd element)",
            lambda: rtp.read_transport_seq(data, hdr, 3),
        ),
        ("time.monotonic()", time.monotonic),
        ("record(seq, monotonic())", record),
        ("read + monotonic + record (the hot path's share)", per_packet),
    ]
    for name, fn in rows:
        print(f"{name:55s} {measure(fn, iterations):7.3f} us")
    for packets in (50, 400):
        cost = measure(lambda p=packets: feedback_round(p), max(iterations // 100, 100))
        print(f"{f'{packets} records + build_feedback':55s} {cost:7.3f} us")


if __name__ == "__main__":
    main()
