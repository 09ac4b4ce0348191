"""Typed keys for what the aiohttp application carries (shared by all route modules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from sfu.cluster import Cluster
from sfu.config import Config
from sfu.control.admission import Admission
from sfu.control.media_events import MediaEvents
from sfu.lifecycle import Lifecycle
from sfu.media.api import MediaApi
from sfu.metrics import Metrics
from sfu.rooms import Rooms

if TYPE_CHECKING:
    # The federation imports the room hub, which the key table must not pull in.
    from sfu.control.federation import Federation

CONFIG_KEY = web.AppKey("config", Config)
LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)
METRICS_KEY = web.AppKey("metrics", Metrics)
# The media plane's commands (sfu/media/api.py) and where its events are routed.
MEDIA_KEY = web.AppKey("media", MediaApi)
MEDIA_EVENTS_KEY = web.AppKey("media_events", MediaEvents)
ROOMS_KEY = web.AppKey("rooms", Rooms)
ADMISSION_KEY = web.AppKey("admission", Admission)
# Present only with cluster.enabled: where rooms live (sfu/cluster.py).
CLUSTER_KEY = web.AppKey("cluster", Cluster)
# Present only with cluster.rooms: span (sfu/control/federation.py).
FEDERATION_KEY: web.AppKey[Federation] = web.AppKey("federation")
