"""WHIP (RFC 9725) publishing and WHEP (draft-ietf-wish-whep) playback over HTTP.

POST an SDP offer with `Authorization: Bearer <token>` to /whip/{room}/{stream} (publish
grant) or /whep/{room}/{stream} (subscribe grant); the answer comes back as 201 with the
session URL in Location. DELETE on that URL ends the session; PATCH takes trickled ICE
fragments. Every error is problem+json with a code listed in docs/protocol.md.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from sfu.config import Config, IceServer
from sfu.control.admission import Refused, request_ip
from sfu.control.auth import AuthError, Grants, verify_token
from sfu.control.keys import (
    ADMISSION_KEY,
    CLUSTER_KEY,
    CONFIG_KEY,
    FEDERATION_KEY,
    LIFECYCLE_KEY,
    MEDIA_EVENTS_KEY,
    MEDIA_KEY,
    ROOMS_KEY,
)
from sfu.control.media_events import MediaEvents
from sfu.control.negotiation import (
    SubscribedTrack,
    plan_publisher,
    plan_subscriber,
    render_answer,
    require_dtls_offer,
    subscriber_section_lines,
)
from sfu.control.problems import ApiError, problem_response
from sfu.control.publishing import open_producers
from sfu.control.sdp import LocalTransport, MediaSection, SdpError, SessionDescription, parse_sdp
from sfu.logs import log_context
from sfu.media.api import MediaApi, TransportClosed, TransportInfo
from sfu.media.dtls import Fingerprint
from sfu.media.layers import MAX_VIDEO_DIMENSION
from sfu.names import room_name_problem
from sfu.rooms import LimitExceeded, MediaSession, Rooms

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
TRICKLE_TYPE = "application/trickle-ice-sdpfrag"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(ApiError):
    """An HTTP-only refusal, possibly with response headers (e.g. Accept-Post)."""

    def __init__(self, status: int, code: str, detail: str, **headers: str) -> None:
        super().__init__(status, code, detail)
        self.headers = headers


def add_routes(app: web.Application) -> None:
    for kind in ("whip", "whep"):
        app.router.add_post(f"/{kind}/{{room}}/{{stream}}", _guard(create_session))
        app.router.add_route("OPTIONS", f"/{kind}/{{room}}/{{stream}}", endpoint_options)
        app.router.add_delete(f"/{kind}/{{room}}/{{stream}}/{{session}}", _guard(delete_session))
        app.router.add_patch(f"/{kind}/{{room}}/{{stream}}/{{session}}", _guard(patch_session))
        app.router.add_route("OPTIONS", f"/{kind}/{{room}}/{{stream}}/{{session}}", session_options)


def _guard(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            headers = dict(exc.headers) if isinstance(exc, Problem) else {}
            if isinstance(exc, Refused) and exc.retry_after is not None:
                headers["Retry-After"] = f"{exc.retry_after:.0f}"
            if exc.status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return problem_response(exc.status, exc.code, exc.detail, headers=headers or None)

    return wrapped


def _kind(request: web.Request) -> str:
    return request.path.split("/", 2)[1]


def _names(request: web.Request) -> tuple[str, str]:
    room, stream = request.match_info["room"], request.match_info["stream"]
    for what, name in (("room", room), ("stream", stream)):
        problem = room_name_problem(name)
        if problem:
            raise Problem(400, "invalid_name", f"{what}: {problem}")
    return room, stream


def _authorize(request: web.Request, room: str, *, publish: bool, subscribe: bool) -> Grants:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "missing_token", "send 'Authorization: Bearer <token>' (sfu token)")
    grants = verify_token(request.app[CONFIG_KEY], token.strip())
    grants.require(room, publish=publish, subscribe=subscribe)
    return grants


async def _read_sdp(request: web.Request) -> SessionDescription:
    if request.content_type != SDP_TYPE:
        raise Problem(
            415,
            "unsupported_media_type",
            f"expected Content-Type {SDP_TYPE}",
            **{"Accept-Post": SDP_TYPE},
        )
    limit = request.app[CONFIG_KEY].limits.max_sdp_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "sdp_too_large", f"the offer exceeds limits.max_sdp_bytes ({limit})")
    body = await request.read()
    if len(body) > limit:
        raise Problem(413, "sdp_too_large", f"the offer exceeds limits.max_sdp_bytes ({limit})")
    try:
        offer = parse_sdp(body.decode("utf-8"))
        require_dtls_offer(offer)
    except UnicodeDecodeError:
        raise Problem(400, "invalid_sdp", "the offer is not UTF-8 text") from None
    except SdpError as exc:
        raise Problem(400, "invalid_sdp", str(exc)) from None
    return offer


def _remote_transport(offer: SessionDescription) -> tuple[str, str, list[Fingerprint]]:
    """ICE credentials and DTLS fingerprints of the offer's first bundled section."""
    first = next((m for m in offer.media if not m.rejected), offer.media[0])
    try:
        ufrag, pwd = offer.ice_credentials(first)
        algorithm, digest = offer.fingerprint(first)
        fingerprints = [Fingerprint(algorithm, digest)]
    except (SdpError, ValueError) as exc:
        raise Problem(400, "invalid_sdp", str(exc)) from None
    return ufrag, pwd, fingerprints


def _local(transport: TransportInfo) -> LocalTransport:
    return LocalTransport(
        ice_ufrag=transport.ice_ufrag,
        ice_pwd=transport.ice_pwd,
        fingerprint=transport.fingerprint,
        candidates=transport.candidates,
    )


def ice_server_links(servers: list[IceServer]) -> list[str]:
    """RFC 9725 §4.6: one Link header per ICE server URL."""
    links = []
    for server in servers:
        for url in server.urls:
            link = f'<{url}>; rel="ice-server"'
            if server.username is not None and server.credential is not None:
                link += (
                    f'; username="{server.username}"; '
                    f'credential="{server.credential.get_secret_value()}"; '
                    'credential-type="password"'
                )
            links.append(link)
    return links


def _created(request: web.Request, session: MediaSession, answer: str) -> web.Response:
    config: Config = request.app[CONFIG_KEY]
    response = web.Response(status=201, text=answer, content_type=SDP_TYPE)
    response.headers["Location"] = session.location
    response.headers["ETag"] = session.etag
    response.headers["Accept-Patch"] = TRICKLE_TYPE
    for link in ice_server_links(config.rtc.ice_servers):
        response.headers.add("Link", link)
    return response


async def create_session(request: web.Request) -> web.StreamResponse:
    kind = _kind(request)
    if not request.app[LIFECYCLE_KEY].accepting:
        raise Problem(503, "draining", "the server is shutting down; try another instance")
    room, stream = _names(request)
    grants = _authorize(request, room, publish=kind == "whip", subscribe=kind == "whep")
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None and cluster.config.rooms == "redirect":
        node = await cluster.place(room)
        if node is not None:
            # WHIP (RFC 9725) clients follow a 307 and repeat the POST at the room's node.
            raise web.HTTPTemporaryRedirect(node.url + request.path_qs)
    federation = request.app.get(FEDERATION_KEY)
    if kind == "whep" and federation is not None and not _published_here(request, room, stream):
        # `span`: the stream is published on another node (and this one may not follow the
        # room at all): the viewer is sent there, as in `redirect` mode.
        url = await federation.node_publishing(room, stream)
        if url is not None:
            raise web.HTTPTemporaryRedirect(url + request.path_qs)
    config = request.app[CONFIG_KEY]
    request.app[ADMISSION_KEY].admit_session(
        kind,
        room,
        grants.identity,
        request_ip(request, config.http.trusted_proxies),
    )
    offer = await _read_sdp(request)
    with log_context(room=room, participant=grants.identity):
        try:
            if kind == "whip":
                return _publish(request, grants, room, stream, offer)
            return _subscribe(request, grants, room, stream, offer)
        except LimitExceeded as exc:
            raise Problem(503, "limit_reached", str(exc)) from None


def _published_here(request: web.Request, room: str, stream: str) -> bool:
    """Whether `stream` is published in `room` on this node, or shown here through a relay."""
    existing = request.app[ROOMS_KEY].get(room)
    return existing is not None and stream in existing.publications


def _open_session(
    request: web.Request,
    kind: str,
    grants: Grants,
    room: str,
    stream: str,
    offer: SessionDescription,
) -> MediaSession:
    media, rooms = request.app[MEDIA_KEY], request.app[ROOMS_KEY]
    ufrag, pwd, fingerprints = _remote_transport(offer)
    transport = media.create_transport(kind, ufrag, pwd, fingerprints, group=room)
    session = MediaSession(
        kind=kind,
        room=room,
        stream=stream,
        identity=grants.identity,
        transport=transport,
        release_drain=request.app[LIFECYCLE_KEY].hold(f"{kind}_session"),
    )
    # A transport that dies by itself (consent expiry, DTLS failure) ends its session.
    request.app[MEDIA_EVENTS_KEY].watch_transport(
        transport.id, closed=lambda event: _forget(rooms, session, event.reason)
    )
    return session


def _forget(rooms: Rooms, session: MediaSession, reason: str) -> None:
    if rooms.remove(session):
        session.release_drain()
        with log_context(room=session.room, participant=session.identity):
            log.info(
                "%s session %s for stream %r ended: %s",
                session.kind,
                session.id,
                session.stream,
                reason,
            )


def _stop_for_policy(media: MediaApi, rooms: Rooms, session: MediaSession, why: str) -> None:
    """End a WHIP session whose track is not end-to-end encrypted in a room requiring it.
    WHIP has no channel to the publisher but the session URL, so the reason is kept for
    its next request there (410 e2ee_required), besides the log."""
    with log_context(room=session.room, participant=session.identity):
        log.warning("stopping whip session %s: %s", session.id, why)
    rooms.record_ended(session, "e2ee_required", why)
    media.close_transport(session.transport.id, f"e2ee policy: {why}")


def _publish(
    request: web.Request, grants: Grants, room: str, stream: str, offer: SessionDescription
) -> web.Response:
    rooms, media = request.app[ROOMS_KEY], request.app[MEDIA_KEY]
    events: MediaEvents = request.app[MEDIA_EVENTS_KEY]
    existing = rooms.get(room)
    if existing is not None and stream in existing.publications:
        raise Problem(409, "stream_exists", f"stream {stream!r} is already published in {room!r}")
    plan = plan_publisher(offer)
    limit = request.app[CONFIG_KEY].limits.max_tracks_per_participant
    if len(plan.tracks) > limit:
        raise Problem(
            403,
            "too_many_tracks",
            f"{len(plan.tracks)} tracks exceed limits.max_tracks_per_participant ({limit})",
        )
    session = _open_session(request, "whip", grants, room, stream, offer)
    transport_id = session.transport.id
    session.producers = open_producers(
        media,
        transport_id,
        plan.tracks,
        e2ee_required=request.app[CONFIG_KEY].e2ee.policy_for(room) == "required",
        group=room,
        owner=session.id,
    )
    for producer in session.producers:
        events.watch_producer(
            transport_id,
            producer.id,
            lambda event: _stop_for_policy(media, rooms, session, event.reason),
        )
    # Added last, with its tracks in place: adding tells the room's participants about them.
    try:
        rooms.add(session)
    except LimitExceeded:
        events.unwatch_transport(transport_id)
        media.close_transport(transport_id, "refused")
        session.release_drain()
        raise
    answer = render_answer(
        offer, _local(session.transport), plan.answer_sections, secrets.randbits(62)
    )
    log.info(
        "whip session %s publishes %r: %s",
        session.id,
        stream,
        ", ".join(f"{t.kind} {t.codec.name}" for t in plan.tracks),
    )
    return _created(request, session, answer)


def _video_size_query(request: web.Request) -> tuple[int, int] | None:
    """`?video_width=W&video_height=H`: the size the player shows the video at, which caps
    the simulcast layer sent (docs/protocol.md); absent: the largest that fits."""
    width, height = request.query.get("video_width"), request.query.get("video_height")
    if width is None and height is None:
        return None
    try:
        size = (int(width or ""), int(height or ""))
    except ValueError:
        size = (-1, -1)
    if not all(0 <= v <= MAX_VIDEO_DIMENSION for v in size):
        raise Problem(
            400,
            "invalid_video_size",
            f"video_width and video_height must both be integers 0-{MAX_VIDEO_DIMENSION} "
            "(0 x 0: no video)",
        )
    return size


def _subscribe(
    request: web.Request, grants: Grants, room: str, stream: str, offer: SessionDescription
) -> web.Response:
    rooms, media = request.app[ROOMS_KEY], request.app[MEDIA_KEY]
    existing = rooms.get(room)
    publication = existing.publications.get(stream) if existing is not None else None
    if publication is None:
        raise Problem(
            404, "stream_not_found", f"no stream {stream!r} is being published in {room!r}"
        )
    plan = plan_subscriber(offer, publication.producers)
    size = _video_size_query(request)
    session = _open_session(request, "whep", grants, room, stream, offer)
    rooms.add(session)
    cname = secrets.token_hex(8)
    transport_id = session.transport.id
    sections: list[tuple[MediaSection, list[str] | None]] = []
    for item in plan:
        if isinstance(item, MediaSection):
            sections.append((item, None))
            continue
        if isinstance(item, tuple):
            sections.append(item)
            continue
        producer = publication.producers[item.track_index]
        subscription = media.add_subscription(
            transport_id,
            producer.id,
            payload_type=item.payload_type,
            rtx_payload_type=item.rtx_payload_type,
            ext_map=item.ext_map,
            max_size=size,
        )
        session.subscriptions.append(subscription)
        sections.append(
            (
                item.section,
                subscriber_section_lines(
                    item, stream, subscription.ssrc, subscription.rtx_ssrc, cname
                ),
            )
        )

    def on_connected() -> None:
        # A new subscriber needs a keyframe to start; ask once, throttled per track.
        for subscription in session.subscriptions:
            media.request_keyframe(subscription.producer_id)

    def on_closed(event: TransportClosed) -> None:
        _forget(rooms, session, event.reason)

    request.app[MEDIA_EVENTS_KEY].watch_transport(
        transport_id, connected=on_connected, closed=on_closed
    )
    # BUNDLE: one transport-cc id serves the transport; every section answers the same.
    transport_cc = next(
        (i.transport_cc for i in plan if isinstance(i, SubscribedTrack) and i.transport_cc), 0
    )
    if transport_cc:
        media.enable_bandwidth_estimation(transport_id, transport_cc)
    answer = render_answer(offer, _local(session.transport), sections, secrets.randbits(62))
    log.info(
        "whep session %s subscribes to %r (%d tracks)",
        session.id,
        stream,
        len(session.subscriptions),
    )
    return _created(request, session, answer)


def _session_for(request: web.Request) -> MediaSession:
    room, stream = _names(request)
    rooms = request.app[ROOMS_KEY]
    session_id = request.match_info["session"]
    session = rooms.sessions.get(session_id)
    ended = rooms.ended.get(session_id)
    if (
        session is None
        and ended is not None
        and (ended.kind, ended.room, ended.stream)
        == (
            _kind(request),
            room,
            stream,
        )
    ):
        raise Problem(410, ended.code, f"the server ended this session: {ended.detail}")
    if session is None or (session.kind, session.room, session.stream) != (
        _kind(request),
        room,
        stream,
    ):
        raise Problem(404, "session_not_found", "no such session (it may have ended)")
    return session


async def delete_session(request: web.Request) -> web.StreamResponse:
    session = _session_for(request)
    _authorize(
        request, session.room, publish=session.kind == "whip", subscribe=session.kind == "whep"
    )
    request.app[MEDIA_KEY].close_transport(
        session.transport.id, "client ended the session (DELETE)"
    )
    # on_closed normally does this; a transport that was already closed would not call it.
    _forget(request.app[ROOMS_KEY], session, "deleted")
    return web.Response(status=200)


async def patch_session(request: web.Request) -> web.StreamResponse:
    session = _session_for(request)
    _authorize(
        request, session.room, publish=session.kind == "whip", subscribe=session.kind == "whep"
    )
    if request.content_type != TRICKLE_TYPE:
        raise Problem(415, "unsupported_media_type", f"expected Content-Type {TRICKLE_TYPE}")
    if_match = request.headers.get("If-Match")
    if if_match is not None and if_match not in ("*", session.etag):
        raise Problem(412, "etag_mismatch", "If-Match does not match the session's ETag")
    fragment = (await request.read()).decode("utf-8", "replace")
    ufrag = next(
        (
            line.split(":", 1)[1].strip()
            for line in fragment.splitlines()
            if line.startswith("a=ice-ufrag:")
        ),
        None,
    )
    if ufrag is not None and ufrag != session.transport.remote_ufrag:
        raise Problem(
            422,
            "ice_restart_unsupported",
            "ICE restarts are not supported yet; end this session (DELETE) and start a new one",
        )
    # An ICE-lite server learns client addresses from the client's checks, so trickled
    # candidates need no action: acknowledging them is all RFC 9725 §4.3.1 asks.
    return web.Response(status=204)


async def endpoint_options(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers={"Accept-Post": SDP_TYPE})


async def session_options(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers={"Accept-Patch": TRICKLE_TYPE})
