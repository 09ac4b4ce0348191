"""In-process cost of the SFU's forwarding path per outgoing copy, with hot caches.

Run: python bench/bench_fanout.py [packets]. Builds a real MediaEngine with one VP8 producer
and N subscriber transports (SRTP keys injected instead of a DTLS handshake, with the same
building blocks as the engine tests in tests/engine/harness.py), feeds SRTP-protected packets
to the publisher transport's `on_srtp`, and times everything from there to the last `sendto`:
unprotect, parse, producer, N x (header rewrite, protect, send).

It is the floor that bench/loadgen.py's end-to-end figure sits above: no event-loop wake-ups,
no other process between packets, and (with --no-send) no kernel. Best of five rounds.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.engine.harness import VP8, inject_srtp, make_engine

ROUNDS = 5


class SocketSender:
    """Stands in for the engine's asyncio UDP transport: a plain blocking `sendto`."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.sock is not None:
            self.sock.sendto(data, addr)

    def close(self) -> None:
        pass


def run(subscribers: int, packets: int, *, send: bool) -> float:
    """Microseconds per forwarded copy, best of ROUNDS."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    engine = make_engine(SocketSender(out if send else None))
    publisher = engine.create_transport("whip", "pubufrag", "p" * 24, [])
    client = inject_srtp(publisher, ("127.0.0.1", 9))
    producer = engine.add_producer(
        publisher,
        kind="video",
        mid="0",
        codec=VP8,
        ext_ids={},
        ssrc=1234,
        rtx_ssrc=None,
    )
    for i in range(subscribers):
        transport = engine.create_transport("whep", f"sub{i:05d}", "s" * 24, [])
        inject_srtp(transport, sink.getsockname())
        engine.add_downtrack(
            transport, producer, payload_type=96, rtx_payload_type=None, ext_map={}
        )
    # Every packet a keyframe start, so down-tracks start at once; 1055 bytes like loadgen's.
    payload = b"\x10" + bytes([0x10, 0, 0, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01])
    payload += os.urandom(1042 - len(payload))
    wire: list[bytes] = []
    for seq in range(packets * ROUNDS):
        rtp = struct.pack("!BBHII", 0x80, 96, seq & 0xFFFF, seq * 3000, 1234) + payload
        protected = client.protect_rtp(rtp)
        assert protected is not None
        wire.append(protected)

    def drain() -> None:
        try:
            while True:
                sink.recv(2048)
        except BlockingIOError:
            pass

    best = float("inf")
    for r in range(ROUNDS):
        batch = wire[r * packets : (r + 1) * packets]
        elapsed = 0
        for i, data in enumerate(batch):
            start = time.perf_counter_ns()
            publisher.on_srtp(data)
            elapsed += time.perf_counter_ns() - start
            if i % 16 == 0:
                drain()  # outside the timing: it is the receiver's work
        drain()
        best = min(best, elapsed / (packets * subscribers))
    sink.close()
    out.close()
    return best / 1000


def main() -> None:
    packets = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"µs per forwarded copy (real engine path, {packets} packets, best of {ROUNDS})")
    for subscribers in (4, 30):
        with_send = run(subscribers, packets, send=True)
        without = run(subscribers, packets, send=False)
        print(
            f"fan-out {subscribers:>2}: {with_send:5.1f} with loopback sendto, "
            f"{without:5.1f} without (sendto ≈ {with_send - without:4.1f})"
        )


if __name__ == "__main__":
    main()
