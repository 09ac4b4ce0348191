"""Fixtures for the real-browser tests: one SFU subprocess and two Chromiums in a call, shared
by the module's tests (a browser costs about 2 s and 0.5 GiB to start)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.browser.support import BrowserPeer, require_browser, write_wav, write_y4m
from tests.conftest import ServerProcess


@dataclass
class Media:
    """Fake-device files: a four-quadrant clip, a tone and silence."""

    quadrants: Path
    tone: Path
    silence: Path


@dataclass
class Call:
    """A running call: the SFU, Alice (tone, RTCRtpScriptTransform) and Bob (silence,
    createEncodedStreams), joined to `room` with `passphrase`."""

    server: ServerProcess
    playwright: Any
    media: Media
    profiles: Path
    room: str
    passphrase: str
    alice: BrowserPeer
    bob: BrowserPeer
    alice_id: str
    bob_id: str
    extra: list[BrowserPeer] = field(default_factory=list)
    # Every raw media key a browser used or received, gathered before pages close (test f).
    keys: dict[str, bytes] = field(default_factory=dict)

    async def launch(self, name: str, **devices: Path) -> BrowserPeer:
        peer = await BrowserPeer.launch(self.playwright, self.profiles / name, name, **devices)
        self.extra.append(peer)
        return peer

    async def collect_keys(self, *peers: BrowserPeer) -> None:
        for peer in peers or (self.alice, self.bob):
            for entry in await peer.keys():
                self.keys[f"{peer.name} {entry['direction']} {entry['kid']}"] = bytes.fromhex(
                    entry["key"]
                )


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    folder = tmp_path_factory.mktemp("fake-devices")
    return Media(
        quadrants=write_y4m(folder / "quadrants.y4m"),
        tone=write_wav(folder / "tone.wav", 440.0),
        silence=write_wav(folder / "silence.wav", None),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def call(media: Media, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Call]:
    require_browser()
    from playwright.async_api import async_playwright

    # Announce loopback only (docs/testing.md: the machine has another interface too).
    server = ServerProcess({"rtc": {"announced_ips": ["127.0.0.1"]}})
    playwright = None
    peers: list[BrowserPeer] = []
    try:
        server.wait_listening()
        playwright = await async_playwright().start()
        profiles = tmp_path_factory.mktemp("profiles")
        alice = await BrowserPeer.launch(
            playwright, profiles / "alice", "Alice", video=media.quadrants, audio=media.tone
        )
        peers.append(alice)
        bob = await BrowserPeer.launch(
            playwright, profiles / "bob", "Bob", video=media.quadrants, audio=media.silence
        )
        peers.append(bob)
        # A room name nobody else uses: test f also looks for it in the server's memory.
        room = f"browser-{secrets.token_hex(6)}"
        passphrase = secrets.token_urlsafe(16)
        alice_self = await alice.join(server.base, room, passphrase)
        bob_self = await bob.join(server.base, room, passphrase, extra="&e2ee_api=streams")
        session = Call(
            server=server,
            playwright=playwright,
            media=media,
            profiles=profiles,
            room=room,
            passphrase=passphrase,
            alice=alice,
            bob=bob,
            alice_id=alice_self["id"],
            bob_id=bob_self["id"],
        )
        yield session
        peers += session.extra
    finally:
        for peer in peers:
            with contextlib.suppress(Exception):  # a browser that already died
                await peer.close()
        if playwright is not None:
            await playwright.stop()
        server.stop()
