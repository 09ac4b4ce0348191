"""Access tokens: HS256 JWTs naming a room, an identity and what it may do there.

A token's header names the API key (`kid`) whose secret signed it, so secrets can be rotated by
adding a new key before removing the old one. Only HS256 is accepted: accepting whatever `alg`
a token claims is the classic JWT forgery.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from sfu.config import Config
from sfu.control.problems import ApiError
from sfu.names import display_name_problem, identity_problem, room_name_problem

ALGORITHM = "HS256"
MAX_TTL_SECONDS = 30 * 86400


class AuthError(ApiError):
    """A token was refused. `status` is 401 (not authenticated) or 403 (not allowed)."""


@dataclass(frozen=True)
class Grants:
    room: str
    identity: str
    can_publish: bool
    can_subscribe: bool
    expires_at: float
    name: str | None = None
    api_key: str = ""

    def require(self, room: str, *, publish: bool = False, subscribe: bool = False) -> None:
        """Raise 403 unless this token may act in `room` as asked."""
        if room != self.room:
            raise AuthError(403, "wrong_room", f"token is for room {self.room!r}, not {room!r}")
        if publish and not self.can_publish:
            raise AuthError(403, "no_publish_grant", "token does not grant publish")
        if subscribe and not self.can_subscribe:
            raise AuthError(403, "no_subscribe_grant", "token does not grant subscribe")


def mint_token(
    config: Config,
    *,
    room: str,
    identity: str,
    publish: bool,
    subscribe: bool,
    ttl: float,
    api_key: str | None = None,
    name: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a token with `api_key` (default: the first configured key). ValueError on bad input."""
    problem = room_name_problem(room) or identity_problem(identity)
    if problem:
        raise ValueError(problem)
    if not publish and not subscribe:
        raise ValueError("a token needs at least one grant: publish, subscribe or both")
    if not 0 < ttl <= MAX_TTL_SECONDS:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL_SECONDS // 86400} days")
    key = api_key if api_key is not None else next(iter(config.auth.keys), None)
    secret = config.secret_for(key) if key is not None else None
    if key is None or secret is None:
        known = ", ".join(config.auth.keys) or "none"
        raise ValueError(f"API key {key!r} is not in auth.keys (configured: {known})")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": key,
        "sub": identity,
        "room": room,
        "grants": {"publish": publish, "subscribe": subscribe},
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
        "jti": secrets.token_urlsafe(12),
    }
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": key})


def verify_token(config: Config, token: str, now: float | None = None) -> Grants:
    """Check signature, expiry and claims; raise AuthError(401) on anything wrong."""
    # A JWT is base64url and dots. Anything else can still arrive: aiohttp turns a header's
    # non-UTF-8 bytes into lone surrogates, a JSON string can hold them, and PyJWT encoding
    # such text raises UnicodeEncodeError rather than one of its own errors.
    if not token.isascii():
        raise AuthError(401, "invalid_token", "token is not a well-formed JWT")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError(401, "invalid_token", "token is not a well-formed JWT") from None
    key = header.get("kid")
    secret = config.secret_for(key) if isinstance(key, str) else None
    if secret is None:
        raise AuthError(401, "unknown_key", "token is signed with an unknown API key")
    try:
        claims = _decode_at(
            token, secret, config.auth.clock_skew, time.time() if now is None else now
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(401, "token_expired", "token has expired") from None
    except jwt.ImmatureSignatureError:
        raise AuthError(401, "token_not_yet_valid", "token is not valid yet (nbf)") from None
    except jwt.PyJWTError as exc:
        raise AuthError(401, "invalid_token", f"token rejected: {exc}") from None
    return _grants_from_claims(claims, key if isinstance(key, str) else "")


def _decode_at(token: str, secret: str, leeway: float, now: float) -> dict[str, Any]:
    """Verify the signature, then expiry against `now`: an explicit clock keeps tests honest
    without sleeping, and one code path serves both."""
    claims: dict[str, Any] = jwt.decode(
        token,
        secret,
        algorithms=[ALGORITHM],
        options={
            "require": ["exp", "iat", "sub", "room"],
            "verify_exp": False,
            "verify_nbf": False,
        },
    )
    expires = _numeric_date(claims, "exp")
    not_before = _numeric_date(claims, "nbf" if "nbf" in claims else "iat")
    if expires + leeway <= now:
        raise jwt.ExpiredSignatureError("expired")
    if not_before - leeway > now:
        raise jwt.ImmatureSignatureError("not yet valid")
    claims["exp"] = expires
    return claims


def _numeric_date(claims: dict[str, Any], name: str) -> float:
    """RFC 7519 NumericDate: a JSON number. A signed token can still carry a string, list,
    boolean or NaN there (any key holder can sign anything), which is a 401, not a crash."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise jwt.InvalidTokenError(f"claim {name!r} must be a number of seconds since 1970")
    try:
        number = float(value)  # an int past 1e308 overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise jwt.InvalidTokenError(f"claim {name!r} must be a finite number")
    return number


def _grants_from_claims(claims: dict[str, Any], key: str) -> Grants:
    room, identity, grants = claims.get("room"), claims.get("sub"), claims.get("grants", {})
    if not isinstance(room, str) or room_name_problem(room):
        raise AuthError(401, "invalid_token", "token's room claim is not a valid room name")
    if not isinstance(identity, str) or identity_problem(identity):
        raise AuthError(401, "invalid_token", "token's sub claim is not a valid identity")
    if not isinstance(grants, dict):
        raise AuthError(401, "invalid_token", "token's grants claim is not an object")
    name = claims.get("name")
    if name is not None and (not isinstance(name, str) or display_name_problem(name)):
        raise AuthError(
            401, "invalid_token", "token's name claim is not a valid display name (see join.name)"
        )
    return Grants(
        room=room,
        identity=identity,
        can_publish=grants.get("publish") is True,
        can_subscribe=grants.get("subscribe") is True,
        expires_at=float(claims["exp"]),
        name=name if isinstance(name, str) else None,
        api_key=key,
    )
