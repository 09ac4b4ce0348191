"""A real Redis for the cluster tests: Debian's redis-server (scripts/test.sh installs it) on a
free loopback port, no persistence, stopped after each test; and three Chromiums for the
browser calls across nodes."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis

from tests.browser.support import BrowserPeer, require_browser, write_wav, write_y4m
from tests.conftest import IN_CI, free_port


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is missing (scripts/test.sh installs Debian's redis-server)")
        pytest.skip("redis-server is not installed here")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)


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
