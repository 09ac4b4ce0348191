"""Log lines carry room/participant ids and never carry secrets."""

from __future__ import annotations

import io
import json
import logging

import pytest

from sfu.logs import ContextFilter, JsonFormatter, RedactFilter, TextFormatter, log_context

TOKEN = (
    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImRldmtleSJ9."
    "eyJzdWIiOiJhbGljZSIsInJvb20iOiJyIn0.c2lnbmF0dXJlLWJ5dGVz"
)


def capture(
    formatter: logging.Formatter, secrets: tuple[str, ...] = ()
) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secrets))
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_text_lines_carry_context_ids() -> None:
    logger, stream = capture(TextFormatter())
    with log_context(room="standup", participant="p-7"):
        logger.info("joined")
    logger.info("outside")
    first, second = stream.getvalue().splitlines()
    assert first.endswith(f"test.{id(stream)}: joined  [room=standup participant=p-7]")
    assert second.endswith(f"test.{id(stream)}: outside")


def test_json_lines_carry_context_ids() -> None:
    logger, stream = capture(JsonFormatter())
    with log_context(room="standup"), log_context(participant="p-1"):
        logger.warning("slow %s", "consumer")
    entry = json.loads(stream.getvalue())
    assert entry["msg"] == "slow consumer"
    assert (entry["room"], entry["participant"], entry["level"]) == ("standup", "p-1", "warning")


def test_explicit_extra_wins_over_context() -> None:
    logger, stream = capture(JsonFormatter())
    with log_context(room="a"):
        logger.info("x", extra={"room": "b"})
    assert json.loads(stream.getvalue())["room"] == "b"


@pytest.mark.parametrize(
    "message",
    [
        f"token {TOKEN}",
        f"Authorization: Bearer {TOKEN}",
        f"GET /rtc?access_token={TOKEN}&x=1",
        "Authorization: bearer opaque-non-jwt-credential",
    ],
)
def test_tokens_are_redacted(message: str) -> None:
    logger, stream = capture(TextFormatter())
    logger.info(message)
    out = stream.getvalue()
    assert "[REDACTED]" in out
    assert TOKEN not in out
    assert "opaque-non-jwt-credential" not in out


def test_configured_secrets_are_redacted_even_in_args() -> None:
    logger, stream = capture(JsonFormatter(), secrets=("s3cret-value-123",))
    logger.error("failed with %s", "s3cret-value-123")
    assert "s3cret-value-123" not in stream.getvalue()
    assert json.loads(stream.getvalue())["msg"] == "failed with [REDACTED]"
