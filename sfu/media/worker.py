"""A media worker process: one engine on its own UDP port, driven over the local channel.

`python -m sfu.media.worker SOCKET` connects to the control plane's UNIX socket, receives its
start message (settings, DTLS certificate, log settings), binds its UDP port and answers
`hello` with its pid, fingerprint and ICE candidates. From then on it runs the commands it
is sent on its `LocalMedia` (sfu/media/local.py), sends back every media event, and a stats
snapshot every SNAPSHOT_INTERVAL. It exits when the channel closes (and ignores SIGINT and
SIGTERM, which a terminal or a service manager sends the whole process group): a worker
never outlives the control plane that supervises it, nor stops before it.

Messages (all tuples, sfu/media/channel.py):
- control -> worker: ("start", WorkerStart), ("call", method, kwargs);
- worker -> control: ("hello", pid, fingerprint, candidates), ("event", MediaEvent),
  ("snapshot", dict), ("failed", method, message): a command that raised (the control
  plane chose its ids, so nothing waits for a reply; a failure is logged on both sides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from sfu.media import channel
from sfu.media.api import MediaApi, MediaEvent
from sfu.media.dtls import DtlsCertificate
from sfu.media.engine import MediaEngine, MediaSettings
from sfu.media.local import LocalMedia

log = logging.getLogger(__name__)

# How often a worker sends its stats snapshot (what /metrics shows lags by up to this).
SNAPSHOT_INTERVAL = 1.0
# The commands a worker runs: the media API's (sfu/media/api.py) and the pool's relay setup,
# nothing else (a typo fails loudly); snapshots go out by themselves every SNAPSHOT_INTERVAL.
COMMANDS = frozenset(
    name for name in vars(MediaApi) if not name.startswith("_") and name != "snapshot"
) | {"create_relay"}


LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class WorkerStart:
    index: int
    settings: MediaSettings
    certificate_pem: bytes
    key_pem: bytes
    log_level: LogLevel
    log_json: bool
    secrets: tuple[str, ...]


class Worker:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.media: LocalMedia | None = None

    def send(self, message: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(channel.encode(message))

    def _event(self, event: MediaEvent) -> None:
        self.send(("event", event))

    async def start(self, start: WorkerStart) -> MediaEngine:
        certificate = DtlsCertificate.from_pem(start.certificate_pem, start.key_pem)
        engine = MediaEngine(start.settings, certificate)
        await engine.start()
        self.media = LocalMedia(engine)
        self.media.sink = self._event
        self.send(("hello", os.getpid(), engine.fingerprint, list(engine.candidates)))
        self.send(("snapshot", self.media.snapshot().to_dict()))
        return engine

    def call(self, method: str, kwargs: dict[str, Any]) -> None:
        assert self.media is not None
        if method not in COMMANDS:
            self.send(("failed", method, "not a media command"))
            return
        try:
            getattr(self.media, method)(**kwargs)
        except Exception as exc:
            # An id that closed meanwhile, mostly: the control plane hears of the close too.
            log.info("media worker: %s failed: %s", method, exc)
            self.send(("failed", method, str(exc)))

    async def snapshots(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            if self.media is not None:
                self.send(("snapshot", self.media.snapshot().to_dict()))
                await self.writer.drain()


async def main(path: str) -> int:
    reader, writer = await asyncio.open_unix_connection(path)
    kind, start = await channel.read(reader)
    if kind != "start" or not isinstance(start, WorkerStart):
        print(f"media worker: expected a start message, got {kind!r}", file=sys.stderr)
        return 2
    from sfu.logs import setup_logging

    setup_logging(start.log_level, start.log_json, start.secrets)
    worker = Worker(writer)
    try:
        engine = await worker.start(start)
    except OSError as exc:
        log.error(
            "media worker %d cannot bind UDP %s:%d: %s",
            start.index,
            start.settings.bind_host,
            start.settings.udp_port,
            exc.strerror,
        )
        return 1
    ticker = asyncio.create_task(worker.snapshots())
    try:
        while True:
            try:
                message = await channel.read(reader)
            except channel.ChannelClosed:
                return 0  # the control plane is gone: so are we
            if message[0] == "call":
                worker.call(message[1], message[2])
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await engine.close()


def run() -> int:
    # The server decides when a worker stops (it closes the channel after its drain): a
    # Ctrl-C or a SIGTERM sent to the whole process group must not cut calls short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main(sys.argv[1]))


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy: the start message unpickles as
    # sfu.media.worker.WorkerStart, which `__main__.WorkerStart` would not be.
    from sfu.media import worker

    sys.exit(worker.run())
