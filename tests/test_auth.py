"""Tokens: what `sfu token` mints verifies with PyJWT and with the server's own check."""

from __future__ import annotations

import time

import jwt
import pytest

from sfu.config import DEV_API_SECRET, Config, load_config
from sfu.control.auth import AuthError, mint_token, verify_token
from tests.conftest import clean_env, run_cli

SECRET_A = "a" * 40
SECRET_B = "b" * 40


def prod_config() -> Config:
    return load_config(
        None,
        env={
            "SFU_DEV_MODE": "false",
            "SFU_AUTH__KEYS": f"{{alpha: {SECRET_A}, beta: {SECRET_B}}}",
        },
    )


def test_cli_token_verifies_with_pyjwt_and_carries_grants() -> None:
    result = run_cli(
        "token",
        "--room",
        "standup",
        "--identity",
        "alice",
        "--name",
        "Alice",
        "--publish",
        "--ttl",
        "90m",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": "devkey", "typ": "JWT"}
    claims = jwt.decode(token, DEV_API_SECRET, algorithms=["HS256"])
    assert claims["room"] == "standup"
    assert claims["sub"] == "alice"
    assert claims["name"] == "Alice"
    assert claims["grants"] == {"publish": True, "subscribe": False}
    assert claims["exp"] - claims["iat"] == 90 * 60
    assert abs(claims["iat"] - time.time()) < 60


def test_cli_token_is_accepted_by_the_server_check() -> None:
    token = run_cli("token", "--room", "r1", "--identity", "bob", "--subscribe").stdout.strip()
    grants = verify_token(Config(), token)
    assert (grants.room, grants.identity) == ("r1", "bob")
    assert (grants.can_publish, grants.can_subscribe) == (False, True)
    grants.require("r1", subscribe=True)
    with pytest.raises(AuthError) as caught:
        grants.require("r1", publish=True)
    assert (caught.value.status, caught.value.code) == (403, "no_publish_grant")
    with pytest.raises(AuthError) as caught:
        grants.require("other", subscribe=True)
    assert (caught.value.status, caught.value.code) == (403, "wrong_room")


def test_cli_token_uses_a_config_file_and_named_key(tmp_path) -> None:
    path = tmp_path / "prod.yaml"
    path.write_text(
        f"dev_mode: false\nauth:\n  keys:\n    alpha: {SECRET_A}\n    beta: {SECRET_B}\n"
    )
    result = run_cli(
        "token",
        "--room",
        "r",
        "--identity",
        "i",
        "--publish",
        "--api-key",
        "beta",
        "--config",
        str(path),
    )
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET_B, algorithms=["HS256"])["room"] == "r"
    # SFU_CONFIG is the documented alternative to --config.
    result = run_cli(
        "token", "--room", "r", "--identity", "i", "--publish", env=clean_env(SFU_CONFIG=str(path))
    )
    assert jwt.get_unverified_header(result.stdout.strip())["kid"] == "alpha"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--room", "r", "--identity", "i"], "at least one grant"),
        (["--room", "bad room", "--identity", "i", "--publish"], "is not a valid name"),
        (["--room", "r", "--identity", "i", "--publish", "--ttl", "forever"], "is not a duration"),
        (["--room", "r", "--identity", "i", "--publish", "--api-key", "nope"], "not in auth.keys"),
    ],
)
def test_cli_token_refuses_bad_input_clearly(args: list[str], message: str) -> None:
    result = run_cli("token", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_token_signed_by_either_configured_key_verifies() -> None:
    config = prod_config()
    for key in ("alpha", "beta"):
        token = mint_token(
            config, room="r", identity="i", publish=True, subscribe=True, ttl=60, api_key=key
        )
        assert verify_token(config, token).api_key == key


def test_expired_and_not_yet_valid_tokens_are_refused() -> None:
    config = prod_config()
    token = mint_token(
        config, room="r", identity="i", publish=True, subscribe=False, ttl=60, now=1_000_000
    )
    assert verify_token(config, token, now=1_000_030).room == "r"
    # Within clock_skew (10 s) of expiry is still fine; past it is not.
    verify_token(config, token, now=1_000_065)
    with pytest.raises(AuthError) as caught:
        verify_token(config, token, now=1_000_071)
    assert (caught.value.status, caught.value.code) == (401, "token_expired")
    with pytest.raises(AuthError) as caught:
        verify_token(config, token, now=999_980)
    assert caught.value.code == "token_not_yet_valid"


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: "not-a-jwt", "invalid_token"),
        (
            lambda: jwt.encode(
                {"sub": "i", "room": "r", "exp": 2**40, "iat": 0},
                SECRET_A,
                algorithm="HS256",
                headers={"kid": "gamma"},
            ),
            "unknown_key",
        ),
        (
            lambda: jwt.encode(
                {"sub": "i", "room": "r", "exp": 2**40, "iat": 0},
                "wrong" * 10,
                algorithm="HS256",
                headers={"kid": "alpha"},
            ),
            "invalid_token",
        ),
        # alg=none must never pass, whatever the header claims.
        (
            lambda: jwt.encode(
                {"sub": "i", "room": "r", "exp": 2**40, "iat": 0},
                None,
                algorithm="none",
                headers={"kid": "alpha"},
            ),
            "invalid_token",
        ),
        (
            lambda: jwt.encode(
                {"sub": "i", "exp": 2**40, "iat": 0},
                SECRET_A,
                algorithm="HS256",
                headers={"kid": "alpha"},
            ),
            "invalid_token",
        ),
        (
            lambda: jwt.encode(
                {"sub": "i", "room": "../etc", "exp": 2**40, "iat": 0},
                SECRET_A,
                algorithm="HS256",
                headers={"kid": "alpha"},
            ),
            "invalid_token",
        ),
    ],
)
def test_forged_or_malformed_tokens_are_refused(make, code: str) -> None:
    with pytest.raises(AuthError) as caught:
        verify_token(prod_config(), make())
    assert (caught.value.status, caught.value.code) == (401, code)


def test_tampered_claims_fail_the_signature() -> None:
    config = prod_config()
    token = mint_token(config, room="r", identity="i", publish=False, subscribe=True, ttl=60)
    header, payload, signature = token.split(".")
    forged_payload = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b'"publish":false', b'"publish":true')
    ).decode()
    with pytest.raises(AuthError):
        verify_token(config, f"{header}.{forged_payload}.{signature}")
