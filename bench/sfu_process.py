"""A real SFU process for the benches: `python -m sfu serve` on free loopback ports.

Announces 127.0.0.1 only (the test machines have another interface, and every candidate must
be loopback) and ignores SFU_* variables from the caller's environment, so a run is defined
by its own config alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready_blocking(
    process: subprocess.Popen[bytes],
    base_url: str,
    timeout: float,
    log_tail: Callable[[], str],
    error: type[Exception] = RuntimeError,
) -> None:
    """For benches that drive the SFU without an event loop: poll /readyz until 200, raising
    `error` with the log's tail if the process exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"the SFU exited at start:\n{log_tail()}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise error(f"the SFU was not ready after {timeout:g} s:\n{log_tail()}")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into `base` (nested dicts key by key), in place."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


class SfuProcess:
    """Writes `workdir/sfu.yaml` (dev mode, loopback, warnings only, `extra` merged in) and
    runs the server on it, its output in `workdir/sfu.log`."""

    def __init__(
        self, workdir: Path, extra: dict[str, Any] | None = None, ready_timeout: float = 30.0
    ) -> None:
        self.http_port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "sfu.yaml"
        self.log_path = workdir / "sfu.log"
        self.ready_timeout = ready_timeout
        self.settings: dict[str, Any] = merge(
            {
                "dev_mode": True,
                "drain_timeout": "2s",
                "http": {"host": "127.0.0.1", "port": self.http_port},
                "rtc": {
                    "bind_host": "127.0.0.1",
                    "udp_port": self.udp_port,
                    "announced_ips": ["127.0.0.1"],
                },
                "logging": {"level": "warning"},
            },
            extra or {},
        )
        self.config_path.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Start it and wait until /readyz answers 200."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFU_")}
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sfu",
                "serve",
                "--config",
                str(self.config_path),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"the SFU exited at start:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{self.base}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"the SFU was not ready after {self.ready_timeout:g} s:\n{self.log_tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (the drain), SIGKILL after `grace` s; the exit status, None if never run."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()
                await process.wait()
        return process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
