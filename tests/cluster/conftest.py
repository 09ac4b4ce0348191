"""Three Chromiums for the browser calls across nodes (the real Redis, `redis_url`, is in
tests/conftest.py: the container test uses it too)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.browser.support import BrowserPeer, require_browser, write_wav, write_y4m


@pytest_asyncio.fixture
async def browsers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[BrowserPeer]]:
    """Alice (tone), Bob and Carol (silence), all with the four-quadrant camera."""
    require_browser()
    from playwright.async_api import async_playwright

    folder = tmp_path_factory.mktemp("devices")
    video = write_y4m(folder / "quadrants.y4m")
    tone = write_wav(folder / "tone.wav", 440.0)
    silence = write_wav(folder / "silence.wav", None)
    async with contextlib.AsyncExitStack() as stack:
        playwright = await stack.enter_async_context(async_playwright())
        peers: list[BrowserPeer] = []
        for name, audio in (("Alice", tone), ("Bob", silence), ("Carol", silence)):
            peer = await BrowserPeer.launch(
                playwright, folder / f"profile-{name}", name, video=video, audio=audio
            )
            stack.push_async_callback(peer.close)
            peers.append(peer)
        yield peers
