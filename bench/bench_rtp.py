"""Microbenchmark of the RTP/RTCP helpers on the forwarding path.

Run: python bench/bench_rtp.py [iterations]. Prints microseconds per operation, the best of
five rounds (the machine is shared and noisy; the minimum is the least disturbed figure).
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sfu.media import codecs, rtcp, rtp

ROUNDS = 5


def packet_1200() -> bytes:
    """A 1200-byte VP8 packet shaped like Chrome's: MID, abs-send-time, transport-cc and
    a 7-byte dependency descriptor in a one-byte extension block."""
    block = bytes([0x10, ord("1")])  # id 1 MID
    block += bytes([0x22]) + (0x123456).to_bytes(3, "big")  # id 2 abs-send-time
    block += bytes([0x31]) + (4242).to_bytes(2, "big")  # id 3 transport-cc
    block += bytes([0x86]) + bytes([0xC1, 0x00, 0x2A, 0, 0, 0, 0])  # id 8 dependency descr.
    block += bytes(-len(block) % 4)
    header = struct.pack("!BBHII", 0x90, 96, 1000, 90000, 0x11223344)
    header += struct.pack("!HH", 0xBEDE, len(block) // 4) + block
    descriptor = bytes([0x90, 0x80, 0x80 | 0x12, 0x34])  # X, S; 15-bit PictureID
    frame = bytes([0x50, 0x2A, 0x00, 0x9D, 0x01, 0x2A])
    body = descriptor + frame
    return header + body + bytes(1200 - len(header) - len(body))


def measure(fn: Callable[[], object], iterations: int) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / iterations)
    return best / 1000.0


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    data = packet_1200()
    hdr = rtp.parse_header(data)
    assert hdr is not None
    assert len(data) == 1200
    mapping = rtp.id_map_list({1: 4, 2: 2, 3: 5})  # the subscriber did not negotiate DD
    nack = rtcp.build_nack(1, 2, [100, 101, 105, 130, 131, 200])
    compound = rtcp.build_rr(1) + nack + rtcp.build_pli(1, 2)
    lost = [100, 101, 105, 130, 131, 200]

    def rewrite() -> None:
        buf = bytearray(data)
        rtp.rewrite_header(buf, 0xCAFEBABE, 5000, 123456, 100)

    def rewrite_remap() -> None:
        buf = bytearray(data)
        rtp.rewrite_header(buf, 0xCAFEBABE, 5000, 123456, 100)
        rtp.remap_extension_ids(buf, hdr, mapping)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("parse_header", lambda: rtp.parse_header(data)),
        ("bytearray copy (1200 B)", lambda: bytearray(data)),
        ("copy + rewrite_header", rewrite),
        ("copy + rewrite + remap_extension_ids", rewrite_remap),
        ("find_extension (3rd element)", lambda: rtp.find_extension(data, hdr, 3)),
        ("find_extension (absent)", lambda: rtp.find_extension(data, hdr, 9)),
        ("read_dependency_descriptor", lambda: rtp.read_dependency_descriptor(data, hdr, 8)),
        ("parse_vp8", lambda: codecs.parse_vp8(data, hdr.header_len, hdr.payload_end)),
        ("build_rtx", lambda: rtp.build_rtx(data, hdr, 0x55, 7, 97)),
        ("parse_rtcp (NACK, 3 pairs)", lambda: rtcp.parse_rtcp(nack)),
        ("parse_rtcp (RR + NACK + PLI)", lambda: rtcp.parse_rtcp(compound)),
        ("build_nack (6 seqs)", lambda: rtcp.build_nack(1, 2, lost)),
    ]
    width = max(len(name) for name, _ in cases)
    print(f"{'operation':<{width}}  µs/op   ({iterations} iterations, best of {ROUNDS})")
    print("-" * (width + 10))
    for name, fn in cases:
        print(f"{name:<{width}}  {measure(fn, iterations):6.3f}")


if __name__ == "__main__":
    main()
