"""The aiohttp application: probes, metrics, CORS and problem+json for every error."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from sfu.config import Config
from sfu.control import whip
from sfu.control.admission import Admission
from sfu.control.keys import (
    ADMISSION_KEY,
    CONFIG_KEY,
    LIFECYCLE_KEY,
    MEDIA_EVENTS_KEY,
    MEDIA_KEY,
    METRICS_KEY,
    ROOMS_KEY,
)
from sfu.control.media_events import MediaEvents
from sfu.control.problems import code_for_status, problem_response
from sfu.control.rooms.socket import add_routes as add_room_routes
from sfu.lifecycle import Lifecycle
from sfu.media.api import MediaApi
from sfu.metrics import Metrics
from sfu.rooms import Rooms

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Probes and scrapes must not keep a drain waiting, or hold it open forever under polling.
_NOT_DRAIN_WORK = frozenset({"/healthz", "/readyz", "/metrics"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, If-Match"
CORS_EXPOSE_HEADERS = "Location, ETag, Link, Accept-Patch, Accept-Post"
CORS_ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"


def create_app(
    config: Config,
    lifecycle: Lifecycle,
    metrics: Metrics,
    media: MediaApi,
    events: MediaEvents,
    rooms: Rooms,
    admission: Admission,
) -> web.Application:
    app = web.Application(
        middlewares=[_count_requests, _cors, _problems, _drain_tracking],
        client_max_size=max(config.limits.max_sdp_bytes, 1024),
    )
    app[CONFIG_KEY] = config
    app[LIFECYCLE_KEY] = lifecycle
    app[METRICS_KEY] = metrics
    app[MEDIA_KEY] = media
    app[MEDIA_EVENTS_KEY] = events
    app[ROOMS_KEY] = rooms
    app[ADMISSION_KEY] = admission
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.metrics.enabled:
        app.router.add_get("/metrics", metrics_endpoint)
    whip.add_routes(app)
    add_room_routes(app)
    add_web_routes(app)
    if config.dev_mode:
        app.router.add_post("/dev/token", dev_token)
    return app


DEV_TOKEN_TTL = 6 * 3600.0


async def dev_token(request: web.Request) -> web.Response:
    """Dev mode only (loopback, public dev key): mint a publish+subscribe token for the demo
    page, so trying a call needs no command line. Never routed outside dev mode."""
    from sfu.control.auth import mint_token

    try:
        body = await request.json()
    except ValueError:
        return problem_response(400, "invalid_json", 'send {"room": ..., "identity": ...}')
    if not isinstance(body, dict):
        return problem_response(400, "invalid_json", 'send {"room": ..., "identity": ...}')
    room, identity, name = body.get("room"), body.get("identity"), body.get("name")
    if not isinstance(room, str) or not isinstance(identity, str):
        return problem_response(400, "invalid_json", "room and identity must be strings")
    try:
        token = mint_token(
            request.app[CONFIG_KEY],
            room=room,
            identity=identity,
            publish=True,
            subscribe=True,
            ttl=DEV_TOKEN_TTL,
            name=name if isinstance(name, str) else None,
        )
    except ValueError as exc:
        return problem_response(400, "invalid_name", str(exc))
    return web.json_response({"token": token, "expires_in": int(DEV_TOKEN_TTL)})


WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# The demo page loads only its own scripts and talks only to this server; media arrives over
# WebRTC, which CSP does not govern. Workers (the E2EE transform) come from the same origin.
DEMO_CSP = (
    "default-src 'self'; script-src 'self'; worker-src 'self' blob:; "
    "connect-src 'self' ws: wss:; img-src 'self' data:; media-src 'self' blob: mediastream:; "
    "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def add_web_routes(app: web.Application) -> None:
    """The browser client under /client/ and the demo page at /, straight from sfu/web/
    (no build step)."""
    if not WEB_DIR.is_dir():
        log.warning("no browser client found at %s; / and /client/ are not served", WEB_DIR)
        return
    app.router.add_get("/", demo_page)
    app.router.add_static("/client/", WEB_DIR, show_index=False, follow_symlinks=False)


async def demo_page(request: web.Request) -> web.StreamResponse:
    index = WEB_DIR / "index.html"
    if not index.is_file():
        raise web.HTTPNotFound(text="the demo page is not installed")
    response = web.FileResponse(index)
    response.headers["Content-Security-Policy"] = DEMO_CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer. Stays 200 while draining."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE_KEY]
    admission = request.app[ADMISSION_KEY]
    if lifecycle.accepting and admission.saturated:
        # Alive and serving its sessions, but a load balancer should send new ones elsewhere.
        limit = request.app[CONFIG_KEY].limits.max_sessions
        return problem_response(
            503, "saturated", f"not accepting new sessions: at limits.max_sessions ({limit})"
        )
    if lifecycle.accepting:
        return web.json_response({"status": "ready"})
    reason = "draining" if lifecycle.draining else "starting"
    return problem_response(503, reason, f"not accepting new sessions: {reason}")


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].render()
    # Passed as a raw header: aiohttp's content_type= would drop the `version` parameter
    # Prometheus uses to pick the exposition format.
    return web.Response(body=body, headers={"Content-Type": content_type})


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects and the like, which _problems lets through
        status = exc.status
        raise
    finally:
        # The route pattern, never the raw path: paths carry room names, an unbounded set.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in _KNOWN_METHODS else "other"
        request.app[METRICS_KEY].http_requests.labels(route, method, str(status)).inc()


# The parser accepts a few dozen methods (WebDAV's among them); as label values they would
# only multiply time series, so the ones no route serves share one label.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """What aiohttp's HTTP server logs protocol errors to (AppRunner's `logger`). aiohttp
    reports every request it cannot parse (a 20 KB header line, garbage bytes) as an ERROR with
    a traceback, before any authentication, so anyone could fill the log. The client gets its
    400 regardless; here such a request becomes one DEBUG line and a count."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.getLogger("sfu.http.server"), {})
        self.metrics = metrics

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.metrics.http_malformed.inc()
            self.logger.debug(
                "refused a malformed HTTP request from %s: %s",
                args[0] if args else "?",
                type(exc).__name__,
            )
            return
        super().log(level, msg, *args, **kwargs)


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return problem_response(exc.status, code_for_status(exc.status), detail, headers=headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(500, "internal_error", "internal error; see the server log")


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    origins = request.app[CONFIG_KEY].http.cors_origins
    origin = request.headers.get("Origin")
    allowed = origin is not None and ("*" in origins or origin in origins)
    preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
    if preflight:
        if not allowed:
            return problem_response(
                403, "origin_not_allowed", f"origin {origin!r} is not in http.cors_origins"
            )
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        response = await handler(request)
    if allowed and origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        response.headers["Vary"] = "Origin"
    return response


@web.middleware
async def _drain_tracking(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _NOT_DRAIN_WORK:
        return await handler(request)
    with request.app[LIFECYCLE_KEY].activity("http_request"):
        return await handler(request)
