"""The media socket's receive buffer: a burst that arrives while the event loop is busy must
wait in the kernel, not be dropped there (every session's media shares this one socket, junk
included; docs/reliability.md)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sfu.app import Server
from sfu.media.engine import RECEIVE_BUFFER_BYTES
from tests.media.harness import wait_for

BURST = 2000
SIZE = 600  # an RTP-sized datagram; 2000 of them are what the default buffer drops most of


def _rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


@pytest.mark.skipif(
    _rmem_max() < RECEIVE_BUFFER_BYTES,
    reason="net.core.rmem_max caps the media socket's receive buffer below what it asks for",
)
async def test_a_burst_during_a_busy_loop_waits_in_the_socket(sfu: Server) -> None:
    target = ("127.0.0.1", sfu.config.rtc.udp_port)
    before = sfu.engine.demux.datagrams
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        # Sent without yielding to the event loop: the SFU reads none of it until the burst
        # is over, as when the loop is busy or the process is descheduled.
        payload = bytes([0x80, 96]) + bytes(SIZE - 2)
        for _ in range(BURST):
            sender.sendto(payload, target)
    await wait_for(
        lambda: sfu.engine.demux.datagrams - before >= BURST,
        timeout=10,
        what=f"all {BURST} datagrams read (the kernel dropped the rest)",
    )
    assert sfu.engine.demux.datagrams - before == BURST
