"""Prometheus metrics for the control plane and the process.

Everything lives on one private registry (not prometheus_client's global one) so several
servers can run in one test process, and so /metrics shows exactly what Blindfold exports.
Hot-path counters, when the media plane lands, stay plain ints exported by a custom collector:
`labels().inc()` costs about 4 µs, too much per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from sfu import __version__

log = logging.getLogger(__name__)

LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, event_loop: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        build = Gauge(
            "sfu_build_info",
            "Always 1; the labels say which build is running.",
            ["version", "python", "event_loop"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version(), event_loop).set(1)
        self.ready = Gauge(
            "sfu_ready", "1 while the server accepts new sessions.", registry=self.registry
        )
        self.draining = Gauge(
            "sfu_draining",
            "1 after SIGTERM/SIGINT while sessions are given time to finish.",
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "sfu_event_loop_lag_seconds",
            "How late a periodic timer fires: time the event loop was blocked.",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "sfu_http_requests",
            "HTTP requests answered, by route pattern (not raw path) and status code.",
            ["route", "method", "code"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def measure_loop_lag(histogram: Histogram, interval: float) -> None:
    """Sleep `interval` forever; how much later than asked each wake-up comes is the lag."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - start - interval))


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
