"""Shared helpers: free ports, and a real `sfu serve` process with its log captured."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without SFU_* overrides, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFU_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sfu", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=60,
        check=False,
    )


class ServerProcess:
    """`python -m sfu serve` on free ports; the log goes to a file the test can read."""

    def __init__(self, overrides: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.http_port = free_port()
        self.udp_port = free_port(socket.SOCK_DGRAM)
        config: dict[str, Any] = {
            "http": {"port": self.http_port},
            "rtc": {"udp_port": self.udp_port},
            "drain_timeout": "5s",
        }
        _deep_merge(config, overrides)
        self.dir = Path(tempfile.mkdtemp(prefix="sfu-test-"))
        self.config_path = self.dir / "sfu.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "server.log"
        self._log = self.log_path.open("wb")
        scheme = "https" if config.get("http", {}).get("tls", {}).get("cert_file") else "http"
        self.base = f"{scheme}://127.0.0.1:{self.http_port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfu", "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else clean_env(),
        )

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"server did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def http_get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    """GET without raising on 4xx/5xx: (status, headers, body)."""
    request = urllib.request.Request(url, headers=kwargs.pop("headers", {}), **kwargs)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def server_factory() -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(
        overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = ServerProcess(overrides or {}, env)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.stop()


# --- tools the suite needs ------------------------------------------------------------------


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine, fail under CI: CI promises every tool is installed
    (scripts/test.sh installs them), so a missing one there is a broken set-up, not a pass."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: scripts/test.sh should have provided it)")
    pytest.skip(reason)


def tool(name: str, package: str) -> str:
    """The path of command `name` (from Debian package `package`), or skip/fail."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (Debian package {package}; scripts/test.sh installs it)")
    return path


# --- a real Redis ---------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: Debian's redis-server (scripts/test.sh installs it) on a free loopback
    port, no persistence, stopped after the test."""
    binary = tool("redis-server", "redis-server")
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
