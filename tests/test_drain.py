"""Graceful drain, in process: readiness flips at once, work gets until the deadline."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from sfu.app import Server
from sfu.config import load_config
from tests.conftest import free_port


def make_server(drain: str) -> Server:
    config = load_config(
        None,
        env={
            "SFU_HTTP__PORT": str(free_port()),
            "SFU_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM)),
            "SFU_DRAIN_TIMEOUT": drain,
        },
    )
    return Server(config)


async def status_of(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with session.get(url) as response:
        return response.status, json.loads(await response.text())


async def test_drain_waits_for_active_work_then_exits_0() -> None:
    server = make_server("30s")
    await server.start()
    runner = asyncio.create_task(server.run_until_stopped())
    async with aiohttp.ClientSession() as session:
        with server.lifecycle.activity("session"):
            server.request_stop("SIGTERM")
            await asyncio.sleep(0.1)
            status, body = await status_of(session, f"{server.url}/readyz")
            assert (status, body["code"]) == (503, "draining")
            # Liveness stays green: the process is healthy, just leaving.
            assert (await status_of(session, f"{server.url}/healthz"))[0] == 200
            assert not runner.done(), "must keep waiting while a session is active"
        # Releasing the last piece of work ends the drain well before its 30 s deadline.
        assert await asyncio.wait_for(runner, timeout=10) == 0


async def test_drain_deadline_cuts_work_that_never_ends() -> None:
    server = make_server("300ms")
    await server.start()
    with server.lifecycle.activity("session"):
        server.request_stop("SIGTERM")
        assert await asyncio.wait_for(server.run_until_stopped(), timeout=10) == 0
        assert server.lifecycle.active() == {"session": 1}


async def test_second_signal_skips_the_rest_of_the_drain() -> None:
    server = make_server("60s")
    await server.start()
    with server.lifecycle.activity("session"):
        runner = asyncio.create_task(server.run_until_stopped())
        server.request_stop("SIGINT")
        await asyncio.sleep(0.1)
        assert not runner.done()
        server.request_stop("SIGINT")
        assert await asyncio.wait_for(runner, timeout=10) == 0


async def test_not_ready_before_start() -> None:
    server = make_server("1s")
    assert not server.lifecycle.accepting
    await server.start()
    try:
        assert server.lifecycle.accepting
    finally:
        await server.close()
