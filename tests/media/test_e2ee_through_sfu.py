"""End-to-end encrypted media through a real SFU: subscribers with the key decode exactly
what the publisher produced; one without it decodes nothing; the SFU never sees plaintext."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sfu.app import Server
from sfu.client.e2ee import E2eeConfig, EncryptedFrame
from sfu.client.sframe import Sender, compose_kid
from sfu.client.whip import publish, subscribe
from sfu.media.rtp import parse_header
from tests.conftest import ROOT, clean_env, free_port
from tests.media.harness import ColourTrack, Counter, ToneTrack, token, wait_for

KID = compose_kid(3, 0)
KEY = bytes(range(16))
MARKER = b"BLINDFOLD-PLAINTEXT-MARKER-7f3a"


@pytest.fixture
def marked_plaintext(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every frame the publisher encrypts gets MARKER appended to its plaintext first (VP8
    decoders ignore bytes after the last partition), and is recorded."""
    plaintexts: list[bytes] = []
    original = Sender.protect

    def protect(self: Sender, frame: bytes, clear_prefix_len: int = 0) -> bytes:
        if clear_prefix_len:  # video: VP8 keeps a clear prefix, Opus has none
            frame = frame + MARKER
        plaintexts.append(frame)
        return original(self, frame, clear_prefix_len)

    monkeypatch.setattr(Sender, "protect", protect)
    return plaintexts


async def test_e2ee_media_through_the_sfu(sfu: Server, marked_plaintext: list[bytes]) -> None:
    sent: list[EncryptedFrame] = []
    received: list[list[EncryptedFrame]] = [[], []]
    tapped: list[bytes] = []
    base = f"{sfu.url}"
    publication = await publish(
        f"{base}/whip/room1/cam",
        token(sfu, identity="pub", publish=True),
        [ColourTrack((30, 160, 220)), ToneTrack()],
        E2eeConfig(send_kid=KID, send_key=KEY, on_frame=sent.append),
    )
    publisher_transport = sfu.engine.transports[
        next(s.transport.id for s in sfu.rooms.sessions.values() if s.kind == "whip")
    ]

    def tap(packet: bytes) -> None:
        hdr = parse_header(packet)
        assert hdr is not None
        tapped.append(packet[hdr.header_len : hdr.payload_end])

    publisher_transport.packet_tap = tap
    decoded = [Counter(), Counter(), Counter()]
    subs = []
    for i in range(2):
        subs.append(
            await subscribe(
                f"{base}/whep/room1/cam",
                token(sfu, identity=f"sub{i}", subscribe=True),
                E2eeConfig(receive_keys={KID: KEY}, on_frame=received[i].append),
                on_track=decoded[i].on_track,
            )
        )
    keyless = await subscribe(
        f"{base}/whep/room1/cam",
        token(sfu, identity="eve", subscribe=True),
        E2eeConfig(receive_keys={KID: os.urandom(16)}),
        on_track=decoded[2].on_track,
    )
    try:
        await wait_for(
            lambda: (
                all(d.frames["video"] >= 30 and d.frames["audio"] >= 50 for d in decoded[:2])
                and all(len(frames) >= 80 for frames in received)
                and len(tapped) > 100
            ),
            timeout=20,
            what="both keyed subscribers decoding audio and video",
        )
        assert keyless.e2ee is not None
        await wait_for(
            lambda: keyless.e2ee is not None and keyless.e2ee.counters.auth_failures >= 50,
            what="the keyless subscriber receiving (and rejecting) frames",
        )
    finally:
        publisher_transport.packet_tap = None
        await publication.close()
        for sub in [*subs, keyless]:
            await sub.close()
    await asyncio.sleep(0.05)

    # The keyless subscriber received frames but decoded none of them.
    assert decoded[2].frames == {"audio": 0, "video": 0}
    assert keyless.e2ee is not None
    assert keyless.e2ee.counters.frames_unprotected == 0

    # Frame by frame, each keyed subscriber got exactly the encrypted bytes the publisher made.
    by_ctr = {f.ctr: f.data for f in sent}
    for frames in received:
        assert len(frames) >= 80
        for frame in frames:
            assert frame.ctr in by_ctr
            assert frame.data == by_ctr[frame.ctr], "a forwarded frame differs from the original"

    # The SFU saw ciphertext only: neither the marker nor any 16 bytes of any frame's
    # plaintext past the VP8 clear prefix appear in what it decrypted from SRTP.
    assert len(tapped) > 100
    assert not any(MARKER in payload for payload in tapped)
    windows = {p[i : i + 16] for p in tapped for i in range(0, max(0, len(p) - 15))}
    leaked = [
        frame
        for frame in marked_plaintext
        if any(frame[i : i + 16] in windows for i in range(10, max(10, len(frame) - 15)))
    ]
    assert marked_plaintext
    assert leaked == []


async def test_server_process_loads_no_codec_while_forwarding(tmp_path: Path) -> None:
    """A real `sfu serve` process forwards E2EE media and never maps a codec library."""
    http, udp = free_port(), free_port(__import__("socket").SOCK_DGRAM)
    config = tmp_path / "sfu.yaml"
    config.write_text(f"http:\n  port: {http}\nrtc:\n  udp_port: {udp}\n")
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfu", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                await asyncio.sleep(0.1)
        from sfu.config import load_config
        from sfu.control.auth import mint_token

        cfg = load_config(config, env={})
        pub_token = mint_token(cfg, room="r", identity="p", publish=True, subscribe=False, ttl=60)
        sub_token = mint_token(cfg, room="r", identity="s", publish=False, subscribe=True, ttl=60)
        received: list[EncryptedFrame] = []
        decoded = Counter()
        publication = await publish(
            f"{base}/whip/r/cam", pub_token, [ColourTrack()], E2eeConfig(send_kid=KID, send_key=KEY)
        )
        subscription = await subscribe(
            f"{base}/whep/r/cam",
            sub_token,
            E2eeConfig(receive_keys={KID: KEY}, on_frame=received.append),
            on_track=decoded.on_track,
        )
        try:
            await wait_for(lambda: decoded.frames["video"] >= 20, what="video through the process")
        finally:
            await publication.close()
            await subscription.close()
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
            metrics = await r.text()
        # Measured inside the server (sys.modules and its own memory map) at scrape time.
        assert "sfu_media_codecs_loaded 0.0" in metrics.splitlines()
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        codec_libraries = [
            line.split()[-1]
            for line in maps.splitlines()
            if any(
                name in line
                for name in (
                    "libavcodec",
                    "libavformat",
                    "libvpx",
                    "libopus",
                    "libx264",
                    "/av/",
                    "aiortc",
                )
            )
        ]
        assert codec_libraries == [], codec_libraries
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        log.close()
