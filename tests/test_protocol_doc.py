"""docs/protocol.md must list every message type and error code the server can send."""

from __future__ import annotations

import re

from sfu.control.rooms.messages import HANDLERS
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "protocol.md").read_text()


def documented(name: str) -> bool:
    return f"`{name}`" in DOC


def source(*parts: str) -> str:
    return (ROOT.joinpath("sfu", *parts)).read_text()


def room_protocol_sources() -> str:
    """The room protocol's modules (sfu/control/rooms/), and the participant in sfu/rooms.py."""
    paths = sorted((ROOT / "sfu" / "control" / "rooms").glob("*.py"))
    assert {p.name for p in paths} >= {"messages.py", "hub.py", "socket.py"}
    return "\n".join(p.read_text() for p in paths) + source("rooms.py")


def test_every_client_message_type_is_documented() -> None:
    types = set(HANDLERS) | {"join"}  # join is read by the socket before the table is used
    assert {"publish_offer", "subscribe_answer", "relay", "leave"} <= types
    missing = sorted(t for t in types if not documented(t))
    assert missing == [], f"undocumented client message types: {missing}"


def test_every_room_message_type_is_documented() -> None:
    types = set(re.findall(r'"type":\s*"([a-z_]+)"', room_protocol_sources()))
    assert {"joined", "relay", "subscribe_offer", "error", "pong", "publish_answer"} <= types
    missing = sorted(t for t in types if not documented(t))
    assert missing == [], f"undocumented message types: {missing}"


def test_every_room_error_code_is_documented() -> None:
    text = room_protocol_sources()
    codes = set(re.findall(r'(?:ProtocolError|_error|refuse)\(\s*"([a-z_]+)"', text))
    codes |= set(re.findall(r'"code":\s*"([a-z_]+)"', text))
    auth = text + source("control", "auth.py")
    codes |= set(re.findall(r'AuthError\(\s*\d+,\s*"([a-z_]+)"', auth))
    assert {"room_full", "relay_too_large", "rate_limited", "unknown_type", "invalid_sdp"} <= codes
    missing = sorted(c for c in codes if not documented(c))
    assert missing == [], f"undocumented room error codes: {missing}"


def test_every_http_problem_code_is_documented() -> None:
    codes: set[str] = set()
    for module in ("whip.py", "http.py", "negotiation.py"):
        text = source("control", module)
        codes |= set(
            re.findall(
                r'(?:Problem|problem_response|NegotiationError)\(\s*\d+,\s*"([a-z_]+)"', text
            )
        )
        codes |= set(re.findall(r"problem_response\(\s*\d+,\s*([a-z_]+),", text)) - {"reason"}
    codes |= {"draining", "starting"}  # /readyz states, passed through a variable
    assert {"stream_exists", "codec_not_offered", "sdp_too_large"} <= codes
    missing = sorted(c for c in codes if not documented(c))
    assert missing == [], f"undocumented problem codes: {missing}"
