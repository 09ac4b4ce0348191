"""HTTP errors as RFC 9457 problem details (application/problem+json).

Each error a client can hit has a stable `code` (also in `type` as a URN) that docs/protocol.md
lists; `title` and `detail` are for people.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ApiError(Exception):
    """A request refused with a documented code: HTTP status, code, and a sentence for people.

    The room protocol turns the same errors into `error` messages, so auth and negotiation
    raise this rather than anything HTTP-specific.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body: dict[str, Any] = {
        "type": f"urn:blindfold:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


# Codes for errors aiohttp raises itself (routing, methods, sizes).
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "unavailable",
}


def code_for_status(status: int) -> str:
    return STATUS_CODES.get(status, f"http_{status}")
