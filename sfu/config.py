"""Configuration: one YAML file, validated by pydantic, with SFU_* environment overrides.

Every failure is reported as a `ConfigIssue` naming the key path (``rtc.udp_port``), the bad
value, what was expected and where the value came from (file line or environment variable),
so an operator can fix a config without reading code. All issues are collected, not just the
first one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from sfu.units import DURATION_HINT, DURATION_PATTERN, format_duration, parse_duration

ENV_PREFIX = "SFU_"
ENV_SEPARATOR = "__"
# Not a config key: names the file itself, so it must not be read as an override.
ENV_CONFIG_FILE = "SFU_CONFIG"

DEV_API_KEY = "devkey"
# Public on purpose: dev mode is for a developer's own machine, where anyone who can reach the
# loopback listener could read this source anyway. Refused outside dev mode.
DEV_API_SECRET = "blindfold-dev-secret-public-do-not-use-in-production"  # noqa: S105
MIN_PRODUCTION_SECRET_LEN = 32
# Media workers one server runs at most (each takes one UDP port above rtc.udp_port).
MAX_WORKERS = 64

Loc = tuple[str | int, ...]


# ---------------------------------------------------------------------------------------------
# Reusable field types. Each validator raises ValueError with the exact sentence a user sees.


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is not a valid port (1-65535)")
    return value


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError(
                f"{value!r} is not an IP address or host name (e.g. 127.0.0.1, 0.0.0.0, ::)"
            ) from None
    return value


def _check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (e.g. 203.0.113.7)") from None


def _check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/8)"
        ) from None


def _check_origin(value: str) -> str:
    if value == "*" or re.fullmatch(r"https?://[^/\s?#]+", value):
        return value
    raise ValueError(
        f"{value!r} is not an origin (expected scheme://host[:port] such as "
        "https://app.example.com, or '*')"
    )


def _check_ice_url(value: str) -> str:
    if not re.fullmatch(r"(stun|stuns|turn|turns):[^\s]+", value):
        raise ValueError(
            f"{value!r} is not a STUN/TURN URL (expected e.g. stun:stun.example.com:3478 or "
            "turn:turn.example.com:3478?transport=udp)"
        )
    return value


def _check_key_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError(f"{value!r} is not a valid API key name (1-64 of A-Z a-z 0-9 _ . -)")
    return value


Port = Annotated[
    int,
    AfterValidator(_check_port),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535}),
]
Host = Annotated[str, AfterValidator(_check_host)]
IpAddress = Annotated[str, AfterValidator(_check_ip)]
IpNetwork = Annotated[str, AfterValidator(_check_network)]
Origin = Annotated[str, AfterValidator(_check_origin)]
IceUrl = Annotated[str, AfterValidator(_check_ice_url)]
KeyName = Annotated[str, AfterValidator(_check_key_name)]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": f"A duration: {DURATION_HINT}.",
        }
    ),
]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------
# Sections


class TlsConfig(_Section):
    cert_file: Path | None = Field(
        None, description="PEM certificate chain for HTTPS. Set together with key_file."
    )
    key_file: Path | None = Field(None, description="PEM private key for HTTPS.")


class HttpConfig(_Section):
    host: Host = Field("127.0.0.1", description="Address the HTTP/WebSocket server listens on.")
    port: Port = Field(7880, description="TCP port of the HTTP/WebSocket server.")
    tls: TlsConfig = Field(
        default_factory=TlsConfig,
        description="Serve HTTPS directly; leave unset behind a TLS-terminating proxy.",
    )
    cors_origins: list[Origin] = Field(
        default_factory=list,
        description="Browser origins allowed to call WHIP/WHEP and the API ('*' for any).",
    )
    trusted_proxies: list[IpNetwork] = Field(
        default_factory=list,
        description="Reverse proxies (addresses or networks) whose X-Forwarded-For names the "
        "client: per-IP limits then apply to that client, not to the proxy.",
    )


class IceServer(_Section):
    urls: list[IceUrl] = Field(description="stun:, stuns:, turn: or turns: URLs.", min_length=1)
    username: str | None = Field(None, description="TURN user name.")
    credential: SecretStr | None = Field(None, description="TURN password.")

    @model_validator(mode="after")
    def _turn_needs_credentials(self) -> IceServer:
        if any(u.startswith("turn") for u in self.urls) and (
            self.username is None or self.credential is None
        ):
            raise ValueError("turn: and turns: URLs need both username and credential")
        return self


class IceTcpConfig(_Section):
    enabled: bool = Field(
        False, description="Offer ICE-TCP candidates (RFC 6544). Not available yet: keep false."
    )
    port: Port = Field(7881, description="TCP port for ICE-TCP, when enabled.")

    @model_validator(mode="after")
    def _not_yet(self) -> IceTcpConfig:
        if self.enabled:
            raise ValueError(
                "ICE-TCP is not available in this version; set enabled: false and use a TURN "
                "server (rtc.ice_servers) for clients that cannot reach UDP"
            )
        return self


class DtlsConfig(_Section):
    cert_file: Path | None = Field(
        None,
        description="PEM certificate for DTLS. Unset: a fresh ECDSA P-256 one at each start.",
    )
    key_file: Path | None = Field(None, description="PEM private key of that certificate.")


class RtcConfig(_Section):
    bind_host: Host = Field("127.0.0.1", description="Address the media UDP socket binds to.")
    udp_port: Port = Field(7882, description="The one UDP port that carries all media.")
    announced_ips: list[IpAddress] = Field(
        default_factory=list,
        description=(
            "Addresses offered to clients as ICE candidates (e.g. a 1:1 NAT's public IP). "
            "Empty: the bound address."
        ),
    )
    ice_tcp: IceTcpConfig = Field(default_factory=IceTcpConfig, description="ICE over TCP.")
    ice_servers: list[IceServer] = Field(
        default_factory=list,
        description="STUN/TURN servers handed to clients (WHIP/WHEP Link headers, room join).",
    )
    dtls: DtlsConfig = Field(default_factory=DtlsConfig, description="DTLS identity.")
    handshake_timeout: Duration = Field(
        10.0,
        description="Close a new transport whose client has not completed ICE and DTLS within "
        "this long (abandoned offers, clients that cannot reach the media port).",
    )
    consent_timeout: Duration = Field(
        30.0,
        description="Close a client's transport after this long without a valid ICE check "
        "(RFC 7675 consent freshness).",
    )
    video_buffer_packets: PositiveInt = Field(
        500, description="Packets kept per video track to answer NACKs."
    )
    audio_buffer_packets: PositiveInt = Field(
        200, description="Packets kept per audio track to answer NACKs."
    )
    keyframe_request_interval: Duration = Field(
        0.5, description="At most one keyframe request (PLI) per track toward a publisher per this."
    )
    subscriber_keyframe_interval: Duration = Field(
        2.0,
        description="Per subscriber and track: after its first keyframe request, at most one "
        "per this (doubling, up to 4x, while it keeps asking right after keyframes reached it).",
    )
    keyframe_cache: bool = Field(
        True,
        description="Keep each video track's packets since its last keyframe (bounded: 600 "
        "packets, 1 MiB) so that a new subscriber starts at once instead of after a keyframe "
        "request's round trip.",
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Media worker processes, each forwarding on its own UDP port "
        "(rtc.udp_port + i, i = 0..N-1) on its own core. A room starts on the least-loaded "
        "worker (see rtc.room_transports_per_worker). 1: media runs inside the server process. "
        "'auto': one per CPU core.",
    )
    room_transports_per_worker: int = Field(
        0,
        ge=0,
        description="With several workers: how many of one room's transports (a room-protocol "
        "participant has two, a WHIP or WHEP session one) a worker takes before the room's "
        "next ones go to the least-loaded worker, joined to the others by relays that carry "
        "one copy of each track per worker. 0: a room never leaves its first worker.",
    )
    fastpath: Literal["auto", "off"] = Field(
        "auto",
        description="Forward media with the native fan-out core: 'auto' uses it when it was "
        "built (else pure Python, with one warning line); 'off' always uses pure Python.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_range(cls, value: object) -> object:
        # One clear message instead of one per member of the union.
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
            return value
        raise ValueError(f"{value!r} is not 'auto' or a whole number from 1 to {MAX_WORKERS}")

    def worker_count(self) -> int:
        """How many media workers to run ('auto': the CPU cores this process may use)."""
        if self.workers == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        return self.workers

    @field_validator("fastpath", mode="before")
    @classmethod
    def _fastpath_off(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted `off` as false: take it as what was meant.
        return "off" if value is False else value


class AuthConfig(_Section):
    keys: dict[KeyName, SecretStr] = Field(
        default_factory=lambda: {DEV_API_KEY: SecretStr(DEV_API_SECRET)},
        description=(
            "API key name -> secret. Tokens are HS256 JWTs signed with a secret and name its "
            "key in the 'kid' header. Outside dev mode each secret needs 32+ characters."
        ),
    )
    clock_skew: Duration = Field(
        10.0, description="Leeway when checking token expiry and not-before."
    )


class LimitsConfig(_Section):
    max_rooms: PositiveInt = Field(1000, description="Rooms open at once.")
    max_participants_per_room: PositiveInt = Field(100, description="Participants in one room.")
    max_tracks_per_participant: PositiveInt = Field(
        8, description="Tracks one participant may publish."
    )
    max_message_bytes: PositiveInt = Field(
        65536, description="Largest signaling (WebSocket) message accepted."
    )
    max_sdp_bytes: PositiveInt = Field(65536, description="Largest SDP offer accepted.")
    max_messages_per_second: PositiveInt = Field(
        50, description="Room protocol messages one client may send per second (burst: 2x)."
    )
    max_relay_payload_bytes: PositiveInt = Field(
        4096, description="Largest E2EE key-exchange payload the blind relay forwards."
    )
    max_sessions: PositiveInt = Field(
        1000,
        description="WHIP/WHEP sessions plus room participants on this server at once. At the "
        "cap new ones get 503 server_full and /readyz answers 503 saturated.",
    )
    max_sessions_per_identity: PositiveInt = Field(
        10, description="WHIP/WHEP sessions one identity (token sub) may hold at once."
    )
    max_sessions_per_room: PositiveInt = Field(
        500, description="WHIP/WHEP sessions (publishers and viewers) in one room."
    )
    max_streams_per_room: PositiveInt = Field(
        50,
        description="Streams published in one room (WHIP streams and room participants' "
        "publications); further WHIP publishers get 429 session_limit.",
    )
    session_rate_per_identity: PositiveFloat = Field(
        2.0,
        description="New sessions (WHIP, WHEP, room joins) per second one identity may start, "
        "after a burst of session_burst_per_identity.",
    )
    session_burst_per_identity: PositiveInt = Field(
        10, description="Sessions one identity may start at once before its rate applies."
    )
    session_rate_per_ip: PositiveFloat = Field(
        20.0,
        description="New sessions per second one client IP may start (see "
        "http.trusted_proxies), after a burst of session_burst_per_ip.",
    )
    max_pending_joins_per_ip: PositiveInt = Field(
        20,
        description="WebSockets from one client IP that may wait for their join message at "
        "once (each for up to rooms.join_timeout); more get 429 before the upgrade.",
    )
    session_burst_per_ip: PositiveInt = Field(
        100, description="Sessions one client IP may start at once before its rate applies."
    )


E2eePolicy = Literal["required", "optional"]


def _check_room_name(value: str) -> str:
    from sfu.names import room_name_problem

    problem = room_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


RoomName = Annotated[str, AfterValidator(_check_room_name)]


class E2eeConfig(_Section):
    policy: E2eePolicy = Field(
        "optional",
        description="Default for every room. 'required': a track that does not carry SFrame "
        "envelopes after grace_period is stopped and its publisher told why.",
    )
    rooms: dict[RoomName, E2eePolicy] = Field(
        default_factory=dict, description="Per-room policy overriding the default."
    )
    grace_period: Duration = Field(
        5.0, description="How long a new track may send before the policy judges it."
    )

    def policy_for(self, room: str) -> E2eePolicy:
        return self.rooms.get(room, self.policy)


class RoomsConfig(_Section):
    reconnect_window: Duration = Field(
        20.0,
        description="How long a participant whose WebSocket dropped may resume (same "
        "identity, resume token) before the others are told it left.",
    )
    join_timeout: Duration = Field(
        10.0, description="How long a new WebSocket may take to send its join message."
    )


class ClusterConfig(_Section):
    enabled: bool = Field(
        False,
        description="Run as one node of a cluster coordinated by Redis: rooms are placed on "
        "nodes, and a request for a room that lives on another node is redirected there. "
        "Off: one node, no Redis.",
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis to coordinate through (redis:// or rediss://, with a password if "
        "it needs one; kept out of logs).",
    )
    node_id: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="This node's name in the cluster (letters, digits, '.', '_', '-'). "
        "Empty: the host name.",
    )
    advertised_url: str = Field(
        "",
        pattern=r"^(https?://[^/\s]+)?$",
        description="Base URL (scheme://host:port) at which clients reach this node's HTTP "
        "port; other nodes redirect requests for this node's rooms there. Required when "
        "enabled.",
    )
    rooms: Literal["span", "redirect"] = Field(
        "span",
        description="'span': every node serves the participants that reach it, and a room's "
        "nodes share it (state through Redis, media through one DTLS-SRTP relay per pair of "
        "nodes). 'redirect': a room lives on one node and requests for it that reach another "
        "node are redirected there.",
    )
    heartbeat_interval: Duration = Field(
        1.0, description="How often the node renews its registry entry and its rooms' placement."
    )
    node_ttl: Duration = Field(
        3.0,
        description="How long a node's entries outlive its last heartbeat: a node that dies is "
        "forgotten, and its rooms placed afresh, within this (at most 5 s).",
    )
    key_prefix: str = Field(
        "blindfold:",
        pattern=r"^[A-Za-z0-9:._-]{1,64}$",
        description="Prefix of every Redis key the cluster uses (several clusters can share "
        "one Redis).",
    )

    @model_validator(mode="after")
    def _coherent(self) -> ClusterConfig:
        if self.enabled and not self.advertised_url:
            raise ValueError(
                "advertised_url is required when the cluster is enabled: the URL other nodes "
                "send clients to, e.g. http://10.0.0.5:8080"
            )
        if not 0 < self.node_ttl <= 5:
            raise ValueError(f"node_ttl must be above 0 s and at most 5 s, not {self.node_ttl:g}")
        if self.heartbeat_interval * 2 > self.node_ttl:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval:g} s) must be at most half of "
                f"node_ttl ({self.node_ttl:g} s), so one lost heartbeat does not expire the node"
            )
        return self


class MetricsConfig(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    loop_lag_interval: Duration = Field(0.5, description="How often the event-loop lag probe runs.")
    integrity_sample_every: int = Field(
        100,
        ge=0,
        description="Compare forwarded payload bytes with received ones for 1 packet in N per "
        "subscriber (sfu_payload_integrity_checks_total); 0 turns sampling off.",
    )


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    # `json` would shadow BaseModel.json(), hence the alias.
    json_lines: bool = Field(
        False, alias="json", description="One JSON object per line instead of text."
    )


class Config(_Section):
    """The whole configuration. Every default here is the embedded dev-mode config."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        title="Blindfold SFU configuration",
    )

    dev_mode: bool = Field(
        True,
        description=(
            "Local development: loopback only, and the public dev API key is allowed. "
            "Set false in production."
        ),
    )
    drain_timeout: Duration = Field(
        10.0,
        description="On SIGTERM/SIGINT, how long to let sessions finish before exiting.",
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="Control plane (HTTP).")
    rtc: RtcConfig = Field(default_factory=RtcConfig, description="Media plane (UDP).")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Access tokens.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Resource limits.")
    rooms: RoomsConfig = Field(default_factory=RoomsConfig, description="Room protocol.")
    e2ee: E2eeConfig = Field(
        default_factory=E2eeConfig, description="End-to-end encryption policy."
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Several nodes coordinated by Redis."
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")

    def secret_for(self, key: str) -> str | None:
        secret = self.auth.keys.get(key)
        return None if secret is None else secret.get_secret_value()


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str
    origin: str | None = None

    def __str__(self) -> str:
        where = f"  ({self.origin})" if self.origin else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(Exception):
    def __init__(self, issues: Sequence[ConfigIssue], source: str) -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.issues)
        head = f"{self.source}: {count} configuration error{'s' if count != 1 else ''}"
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Embedded defaults, then the YAML file (if any), then SFU_* variables from `env`."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else "embedded defaults"
    lines: dict[Loc, int] = {}
    data: dict[str, Any] = {}
    if path is not None:
        data, lines = _read_yaml(Path(path))
    env_origins, env_issues = _apply_env(data, env)
    if env_issues:
        raise ConfigError(env_issues, source)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        issues = [
            _issue_from_pydantic(err, data, lines, env_origins, source) for err in exc.errors()
        ]
        raise ConfigError(issues, source) from None
    problems = _semantic_issues(config)
    if problems:
        located = [
            ConfigIssue(
                p.path, p.message, _origin_for(_split_path(p.path), lines, env_origins, source)
            )
            for p in problems
        ]
        raise ConfigError(located, source)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that remembers each key's line; duplicate keys are errors, not silent."""


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("(file)", f"{source} does not exist")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("(file)", f"cannot read {source}: {exc}")], source) from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[Loc, int] = {}
        duplicates: list[ConfigIssue] = []
        _index_nodes(node, (), lines, duplicates, source)
        if duplicates:
            raise ConfigError(duplicates, source)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_issue(exc, source)], source) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        kind = _kind(data)
        raise ConfigError(
            [
                ConfigIssue(
                    "(root)",
                    f"expected a mapping of sections ({', '.join(Config.model_fields)}), "
                    f"got {kind}",
                )
            ],
            source,
        )
    return data, lines


def _index_nodes(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], issues: list[ConfigIssue], source: str
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in seen:
                issues.append(
                    ConfigIssue(
                        _format_loc((*loc, key)),
                        f"duplicate key (first set on line {seen[key]})",
                        f"{source} line {line}",
                    )
                )
            seen[key] = line
            lines[(*loc, key)] = line
            _index_nodes(value_node, (*loc, key), lines, issues, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*loc, index)] = item.start_mark.line + 1
            _index_nodes(item, (*loc, index), lines, issues, source)


def _yaml_issue(exc: yaml.YAMLError, source: str) -> ConfigIssue:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{context}, {problem}" if context else problem
    where = f"{source} line {mark.line + 1}, column {mark.column + 1}" if mark else source
    return ConfigIssue("(yaml)", f"not valid YAML: {detail}", where)


def env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """The SFU_* variables that are config overrides (SFU_CONFIG names the file instead)."""
    return {
        name: value
        for name, value in env.items()
        if name.startswith(ENV_PREFIX) and name != ENV_CONFIG_FILE
    }


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[Loc, str], list[ConfigIssue]]:
    origins: dict[Loc, str] = {}
    issues: list[ConfigIssue] = []
    for name, raw in sorted(env_overrides(env).items()):
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR)
        if not all(parts):
            issues.append(
                ConfigIssue(
                    "(env)",
                    f"{name} is not a valid override name (expected e.g. SFU_RTC__UDP_PORT: "
                    "section and key joined by a double underscore)",
                )
            )
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw  # not YAML: take the text as a plain string
        target = data
        loc: Loc = ()
        for part in parts[:-1]:
            loc = (*loc, part)
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                issues.append(
                    ConfigIssue(
                        _format_loc(loc),
                        f"{name} sets a key below {_format_loc(loc)}, which is not a mapping",
                    )
                )
                break
            target = child
        else:
            target[parts[-1]] = value
            origins[tuple(parts)] = f"set by {name}"
    return origins, issues


# ---------------------------------------------------------------------------------------------
# Turning pydantic's errors into sentences


def _issue_from_pydantic(
    err: Mapping[str, Any],
    data: Mapping[str, Any],
    lines: Mapping[Loc, int],
    env_origins: Mapping[Loc, str],
    source: str,
) -> ConfigIssue:
    loc: Loc = tuple(err["loc"])
    kind = str(err["type"])
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if loc and loc[-1] == "[key]":  # a dict key failed validation, not its value
        loc = loc[:-1]
        if kind == "value_error":
            return ConfigIssue(
                _format_loc(loc[:-1]),
                f"key {_strip_value_error(err['msg'])}",
                _origin_for(loc, lines, env_origins, source),
            )
    # A model validator's loc points at the model itself; say which model failed.
    message = _message_for(kind, value, ctx, str(err["msg"]), loc)
    return ConfigIssue(_format_loc(loc), message, _origin_for(loc, lines, env_origins, source))


def _strip_value_error(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _message_for(kind: str, value: Any, ctx: Mapping[str, Any], msg: str, loc: Loc) -> str:
    shown = _show(value)
    if kind == "extra_forbidden":
        return _unknown_key_message(loc)
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return _strip_value_error(msg)
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{shown} is not a whole number"
    if kind in ("float_type", "float_parsing"):
        return f"{shown} is not a number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{shown} is not a boolean (expected true or false)"
    if kind == "string_type":
        return f"{shown} is not a string"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {_kind(value)} {shown}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {_kind(value)} {shown}"
    if kind == "literal_error":
        return f"{shown} is not one of: {ctx.get('expected', '')}"
    if kind == "greater_than_equal":
        return f"{shown} is too small (minimum {ctx.get('ge')})"
    if kind == "less_than_equal":
        return f"{shown} is too large (maximum {ctx.get('le')})"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    return f"{shown}: {msg}"


def _unknown_key_message(loc: Loc) -> str:
    key = str(loc[-1])
    known = _known_keys(loc[:-1])
    if not known:
        return "unknown key"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (expected one of: {', '.join(known)})"


def _known_keys(loc: Loc) -> list[str]:
    """Key names valid at `loc`, found by walking the model types along the path."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = _field_by_key(annotation, str(part))
            if field is None:
                return []
            annotation = field
        else:
            args = typing.get_args(annotation)
            if not args:
                return []
            annotation = args[-1]  # list[X] -> X, dict[K, V] -> V
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [info.alias or name for name, info in annotation.model_fields.items()]
    return []


def _field_by_key(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.annotation
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] and Annotated[...] so the walk reaches the model or container."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = options[0]
        else:
            return annotation


def _origin_for(
    loc: Loc, lines: Mapping[Loc, int], env_origins: Mapping[Loc, str], source: str
) -> str | None:
    for end in range(len(loc), 0, -1):
        prefix = loc[:end]
        if prefix in env_origins:
            return env_origins[prefix]
        if prefix in lines:
            return f"{source} line {lines[prefix]}"
    return None


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _split_path(path: str) -> Loc:
    loc: list[str | int] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        loc.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(loc)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict | list):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Rules that span several keys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _semantic_issues(config: Config) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    if not config.auth.keys:
        issues.append(ConfigIssue("auth.keys", "at least one API key is needed to sign tokens"))
    if config.dev_mode:
        for name, host in (
            ("http.host", config.http.host),
            ("rtc.bind_host", config.rtc.bind_host),
        ):
            if not _is_loopback(host):
                issues.append(
                    ConfigIssue(
                        name,
                        f"{host!r} is not a loopback address, but dev_mode is true (dev mode "
                        "allows a public API secret, so it listens on loopback only); set "
                        "dev_mode: false and your own auth.keys to serve other hosts",
                    )
                )
    else:
        for key, secret in config.auth.keys.items():
            value = secret.get_secret_value()
            if value == DEV_API_SECRET:
                issues.append(
                    ConfigIssue(
                        f"auth.keys.{key}",
                        "uses the public development secret, which is only allowed with "
                        "dev_mode: true; set a secret of your own",
                    )
                )
            elif len(value) < MIN_PRODUCTION_SECRET_LEN:
                issues.append(
                    ConfigIssue(
                        f"auth.keys.{key}",
                        f"secret is {len(value)} characters; at least "
                        f"{MIN_PRODUCTION_SECRET_LEN} are needed when dev_mode is false "
                        "(e.g. `openssl rand -base64 33`)",
                    )
                )
    for prefix, pair in (("http.tls", config.http.tls), ("rtc.dtls", config.rtc.dtls)):
        issues += _file_pair_issues(prefix, pair.cert_file, pair.key_file)
    return issues


def _file_pair_issues(prefix: str, cert: Path | None, key: Path | None) -> list[ConfigIssue]:
    issues = []
    if (cert is None) != (key is None):
        missing = f"{prefix}.key_file" if key is None else f"{prefix}.cert_file"
        issues.append(ConfigIssue(missing, "cert_file and key_file must be set together"))
    for name, file in ((f"{prefix}.cert_file", cert), (f"{prefix}.key_file", key)):
        if file is not None and not file.is_file():
            issues.append(ConfigIssue(name, f"{str(file)!r} does not exist or is not a file"))
    return issues


# ---------------------------------------------------------------------------------------------
# Schema and docs generated from the model, so neither can drift from the code


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every leaf key, in declaration order."""
    rows: list[tuple[str, str, str, str]] = []
    _collect_rows(Config, Config(), (), rows)
    return rows


def _collect_rows(
    model: type[BaseModel], instance: BaseModel, loc: Loc, rows: list[tuple[str, str, str, str]]
) -> None:
    for name, info in model.model_fields.items():
        key = info.alias or name
        value = getattr(instance, name)
        annotation = _unwrap(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _collect_rows(annotation, value, (*loc, key), rows)
            continue
        label = _type_label(info.annotation, info.metadata)
        rows.append(
            (
                _format_loc((*loc, key)),
                label,
                _default_text(value, label),
                info.description or "",
            )
        )


_LABELS: dict[Any, str] = {
    _check_port: "port",
    _check_host: "host",
    _check_ip: "IP address",
    _check_origin: "origin",
    _check_ice_url: "STUN/TURN URL",
    _check_key_name: "key name",
    _check_room_name: "room name",
    parse_duration: "duration",
}


def _label_from_metadata(metadata: Sequence[Any]) -> str | None:
    for item in metadata:
        label = _LABELS.get(getattr(item, "func", None))
        if label:
            return label
        if getattr(item, "ge", None) is not None:
            return f"int >= {item.ge}"
    return None


def _type_label(annotation: Any, metadata: Sequence[Any]) -> str:
    label = _label_from_metadata(metadata)
    if label:
        return label
    if typing.get_origin(annotation) is Annotated:
        inner, *extra = typing.get_args(annotation)
        return _label_from_metadata(extra) or _type_label(inner, ())
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list:
        inner = args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return "list of {" + ", ".join(inner.model_fields) + "}"
        return f"list of {_type_label(inner, ())}"
    if origin is dict:
        value = "secret" if args[1] is SecretStr else _type_label(args[1], ())
        return f"map of {_type_label(args[0], ())} -> {value}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        labels = " or ".join(_type_label(option, ()) for option in options)
        return labels + (" or null" if len(options) < len(args) else "")
    if annotation is Path:
        return "file path"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any, label: str) -> str:
    if label == "duration":
        return format_duration(float(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: <dev secret>" for k in value) + "}"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[]" if not value else repr(value)
    return str(value)
