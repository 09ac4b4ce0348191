"""Typed keys for what the aiohttp application carries (shared by all route modules)."""

from __future__ import annotations

from aiohttp import web

from sfu.config import Config
from sfu.control.admission import Admission
from sfu.lifecycle import Lifecycle
from sfu.media.engine import MediaEngine
from sfu.metrics import Metrics
from sfu.rooms import Rooms

CONFIG_KEY = web.AppKey("config", Config)
LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)
METRICS_KEY = web.AppKey("metrics", Metrics)
ENGINE_KEY = web.AppKey("engine", MediaEngine)
ROOMS_KEY = web.AppKey("rooms", Rooms)
ADMISSION_KEY = web.AppKey("admission", Admission)
