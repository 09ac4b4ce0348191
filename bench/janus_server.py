"""Janus 1.x as a bench opponent: find or install it, write a minimal config, run it.

Janus (https://janus.conf.meetecho.com) is a C WebRTC server; its VideoRoom plugin is an SFU.
The bench runs it with only what the comparison needs: the HTTP transport on one loopback port,
the VideoRoom plugin, no event handlers or loggers, its own self-signed DTLS certificate. Every
other plugin and transport is disabled so that it starts in well under a second.

Janus never offers loopback addresses as ICE candidates, so it cannot be reached on `lo`. The
caller runs it inside a network namespace where 127.0.0.1/8 sits on one end of a veth pair (see
bench/compare.py) and passes that interface as `ice_enforce_list`.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.janus_api import create_room_blocking

PLUGIN = "libjanus_videoroom.so"
TRANSPORT = "libjanus_http.so"
# Where distributions and `make install` put the plugin folders.
_LIB_GLOBS = (
    "/usr/lib/*/janus",
    "/usr/lib/janus",
    "/usr/lib64/janus",
    "/usr/local/lib/janus",
    "/opt/janus/lib/janus",
)
PR_SET_PDEATHSIG = 1


class JanusUnavailable(RuntimeError):
    """Janus is not installed and could not be installed."""


def find_lib_dir() -> Path | None:
    """The folder holding Janus's plugins/ and transports/ (with the VideoRoom and HTTP .so)."""
    for pattern in _LIB_GLOBS:
        for candidate in sorted(glob.glob(pattern)):
            path = Path(candidate)
            if (path / "plugins" / PLUGIN).exists() and (path / "transports" / TRANSPORT).exists():
                return path
    return None


def ensure_installed(*, install: bool = True) -> tuple[str, Path]:
    """(janus binary, lib dir); runs `apt-get install -y janus` when missing and allowed."""
    binary = shutil.which("janus")
    lib = find_lib_dir()
    if binary is not None and lib is not None:
        return binary, lib
    if not install:
        raise JanusUnavailable("janus is not installed (apt-get install janus)")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise JanusUnavailable(
            "janus is not installed and cannot be installed here (needs root and apt-get): "
            "install the Debian/Ubuntu package 'janus' (1.1.x) and re-run"
        )
    print("janus not found: running apt-get install -y janus ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "janus"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    binary = shutil.which("janus")
    lib = find_lib_dir()
    if result.returncode != 0 or binary is None or lib is None:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise JanusUnavailable(
            f"apt-get install janus failed (exit {result.returncode}); "
            f"try 'apt-get update' first or install it by hand:\n{tail}"
        )
    return binary, lib


def janus_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Janus version:"):
            return line.partition(":")[2].strip()
    return "unknown"


def _disable_others(folder: Path, keep: str) -> str:
    names = sorted({p.name.split(".so")[0] + ".so" for p in folder.glob("libjanus_*.so*")})
    return ",".join(name for name in names if name != keep)


def write_config(
    folder: Path,
    lib: Path,
    *,
    http_port: int,
    interface: str,
    rtp_ports: tuple[int, int],
    debug_level: int = 4,
) -> Path:
    """janus.jcfg plus the HTTP transport's and the VideoRoom's configs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    main = folder / "janus.jcfg"
    main.write_text(
        f"""general: {{
\tconfigs_folder = "{folder}"
\tplugins_folder = "{lib / "plugins"}"
\ttransports_folder = "{lib / "transports"}"
\tevents_folder = "{lib / "events"}"
\tloggers_folder = "{lib / "loggers"}"
\tdebug_level = {debug_level}
\tdebug_timestamps = true
\tdebug_colors = false
\tserver_name = "blindfold-bench"
\tsession_timeout = 60
}}
certificates: {{
}}
media: {{
\trtp_port_range = "{rtp_ports[0]}-{rtp_ports[1]}"
}}
nat: {{
\tnice_debug = false
\tignore_mdns = true
\tice_enforce_list = "{interface}"
}}
plugins: {{
\tdisable = "{_disable_others(lib / "plugins", PLUGIN)}"
}}
transports: {{
\tdisable = "{_disable_others(lib / "transports", TRANSPORT)}"
}}
loggers: {{
\tdisable = "{_disable_others(lib / "loggers", "")}"
}}
events: {{
\tbroadcast = false
}}
"""
    )
    (folder / "janus.transport.http.jcfg").write_text(
        f"""general: {{
\tjson = "compact"
\tbase_path = "/janus"
\thttp = true
\tport = {http_port}
\tip = "127.0.0.1"
\thttps = false
}}
admin: {{
\tadmin_http = false
\tadmin_https = false
}}
"""
    )
    # No static rooms: the bench creates its own (require_e2ee) through the API.
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
    return main


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies without cleaning up (run in a child: before
    exec for Janus, first thing in a generator worker), so nothing outlives the bench, e.g.
    keeping compare.py's network namespace alive."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class JanusProcess:
    """`janus -F DIR -C DIR/janus.jcfg` on a free loopback HTTP port; output in DIR/janus.log.

    Also what bench/loadgen.py's orchestration needs of a server under test (its `Server`):
    `start` creates the bench's VideoRoom room (require_e2ee), Janus needs no tokens, and it
    has no packet counter to scrape.
    """

    name = "janus"
    backend = "janus"

    def __init__(
        self,
        workdir: Path,
        *,
        http_port: int,
        interface: str,
        rtp_ports: tuple[int, int] = (40000, 49999),
        install: bool = True,
    ) -> None:
        self.binary, self.lib = ensure_installed(install=install)
        self.version = janus_version(self.binary)
        self.folder = workdir / "janus"
        self.config = write_config(
            self.folder, self.lib, http_port=http_port, interface=interface, rtp_ports=rtp_ports
        )
        self.log_path = workdir / "janus.log"
        self.url = f"http://127.0.0.1:{http_port}/janus"
        self.room = str(1000 + secrets.randbelow(10**6))
        self.max_publishers = 64
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> None:
        command = [self.binary, "-F", str(self.folder), "-C", str(self.config), "-o"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"janus exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/info", timeout=1) as response:
                    info = json.loads(response.read())
                if "janus.plugin.videoroom" in info.get("plugins", {}):
                    create_room_blocking(self.url, int(self.room), self.max_publishers)
                    return
                raise RuntimeError(f"janus runs without the VideoRoom plugin:\n{self.log_tail()}")
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"janus was not ready after {timeout:g} s:\n{self.log_tail()}")

    def token(self, identity: str, *, publish: bool, ttl: float) -> str:
        return ""  # the bench's Janus runs without token authentication

    def metrics(self) -> dict[str, float]:
        return {}  # no forwarded-packet counter: the bench counts what subscribers receive

    def stop(self) -> int | None:
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGINT)  # Janus's own clean shutdown
        try:
            return process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
