"""In-process cost of the SFU's forwarding path per outgoing copy, native core and pure Python.

Run: python bench/bench_fanout.py [packets]. Builds a real MediaEngine on a real loopback UDP
socket with one VP8 producer and N subscriber transports (SRTP keys injected instead of a
DTLS handshake, with the same building blocks as the engine tests in tests/engine/harness.py).
A client socket sends SRTP-protected packets to the engine's socket in bursts; the timed part
is what the engine does when its socket is readable, up to the last send of the last copy:

- native (`rtc.fastpath: auto`): the reader callback: recvmmsg, unprotect, N x (header
  rewrite, protect), sendmmsg, and the producer's Python bookkeeping per packet;
- python (`rtc.fastpath: off`): recvfrom and `datagram_received` per datagram: unprotect,
  parse, producer, N x (rewrite, protect, sendto).

Bursts of 1 datagram are one wake-up per packet (a lightly loaded server); bursts of 16 let
the native core batch. It is the floor under bench/loadgen.py's end-to-end figure: no other
process between packets and no receiver work (the sink is drained outside the timing).
Best of five rounds.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sfu.media.engine import MediaEngine, MediaSettings
from tests.engine.harness import VP8, inject_srtp

ROUNDS = 5


def udp(rcvbuf: int = 8 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> int:
    n = 0
    try:
        while True:
            sock.recv(2048)
            n += 1
    except BlockingIOError:
        return n


def run(path: str, subscribers: int, packets: int, burst: int) -> float:
    """Microseconds per forwarded copy, best of ROUNDS."""
    sink, source = udp(), udp()
    engine = MediaEngine(MediaSettings("127.0.0.1", 0, (), fastpath=path))
    engine_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    engine_sock.bind(("127.0.0.1", 0))
    engine._adopt_socket(engine_sock)
    assert engine.fastpath_enabled is (path == "auto"), "native core not built?"
    publisher = engine.create_transport("whip", "pubufrag", "p" * 24, [])
    source_addr = source.getsockname()
    client = inject_srtp(publisher, source_addr)
    engine._by_addr[source_addr] = publisher
    engine._map_native(source_addr, publisher)
    producer = engine.add_producer(
        publisher, kind="video", mid="0", codec=VP8, ext_ids={}, ssrc=1234, rtx_ssrc=None
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
    target = engine_sock.getsockname()

    def handle() -> None:
        if path == "auto":
            engine._on_readable()
            return
        try:
            while True:
                data, addr = engine_sock.recvfrom(2048)
                engine.datagram_received(data, addr)
        except BlockingIOError:
            pass

    best = float("inf")
    for r in range(ROUNDS):
        batch = wire[r * packets : (r + 1) * packets]
        elapsed = 0
        received = 0
        for i in range(0, len(batch), burst):
            for data in batch[i : i + burst]:
                source.sendto(data, target)
            start = time.perf_counter_ns()
            handle()
            elapsed += time.perf_counter_ns() - start
            received += drain(sink)  # outside the timing: it is the receiver's work
        received += drain(sink)
        if received < 0.99 * packets * subscribers:
            print(f"  warning: {received} of {packets * subscribers} copies arrived")
        best = min(best, elapsed / (packets * subscribers))
    for sock in (sink, source, engine_sock):
        sock.close()
    return best / 1000


def main() -> None:
    packets = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"µs per forwarded copy (real engine, loopback sockets, {packets} packets, best of 5)")
    for subscribers in (4, 30):
        for burst in (1, 16):
            native = run("auto", subscribers, packets, burst)
            python = run("off", subscribers, packets, burst)
            print(
                f"fan-out {subscribers:>2}, bursts of {burst:>2}: native {native:5.2f}, "
                f"python {python:5.2f} ({python / native:4.1f}x)"
            )


if __name__ == "__main__":
    main()
