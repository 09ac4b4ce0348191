"""Logging set-up: text or JSON lines, room/participant ids on every line, secrets redacted.

Ids travel in context variables so a line logged deep inside a handler still says which room
and participant it is about, without passing them through every call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

LOG_FIELDS = ("room", "participant", "session")
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("sfu_log_context")

# A JWT is three base64url parts, the first two starting with '{"' encoded ("eyJ").
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_TOKEN_PARAM = re.compile(r"(?i)((?:access_)?token=)[^&\s\"]+")
REDACTED = "[REDACTED]"


@contextlib.contextmanager
def log_context(**ids: str) -> Iterator[None]:
    """Attach ids (room=..., participant=...) to every log line inside the block."""
    merged = {**_context.get({}), **{k: v for k, v in ids.items() if v}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get({}).items():
            if not getattr(record, key, None):
                setattr(record, key, value)
        return True


class RedactFilter(logging.Filter):
    """Removes tokens and configured secrets from the message before any handler sees it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        text = _JWT.sub(REDACTED, text)
        text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
        text = _TOKEN_PARAM.sub(rf"\g<1>{REDACTED}", text)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{k}={v}" for k in LOG_FIELDS if (v := getattr(record, k, None)))
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if ids:
            line += f"  [{ids}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in LOG_FIELDS:
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(
    level: Literal["debug", "info", "warning", "error"],
    json_lines: bool,
    secrets: Iterable[str] = (),
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    # Filters on the handler (not the logger) so records from every library pass through them.
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # One line per request (probes and scrapes included) drowns what matters; the request
    # counter in /metrics has the totals, and debug level brings the lines back.
    logging.getLogger("sfu.access").setLevel(logging.INFO if level == "debug" else logging.WARNING)
