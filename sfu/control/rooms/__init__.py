"""The room protocol: one WebSocket per participant at /rtc, JSON messages, version 1.

A participant joins with a token, publishes over a peer connection it offers
(`publish_offer` → `publish_answer`), and receives everything else over a second peer
connection the SFU offers and renegotiates as tracks come and go (`subscribe_offer` →
`subscribe_answer`). The SFU relays E2EE key-exchange messages blind: it forwards an opaque
payload with the sender's participant id and never parses, stores or logs it.
docs/protocol.md lists every message and error code.

- `messages`: one typed definition per client → server message, and the table the socket
  dispatches by `type` (`HANDLERS`);
- `hub`: `RoomHub`, the participants of every room and what the protocol does with them;
- `socket`: the aiohttp WebSocket endpoint (join/resume, rate limits, the outbox writer).

The `Participant` itself is domain state, in `sfu.rooms` next to `Room`.
"""

from __future__ import annotations

from sfu.control.rooms.errors import ProtocolError
from sfu.control.rooms.hub import RoomHub
from sfu.control.rooms.socket import HUB_KEY, add_routes

__all__ = ["HUB_KEY", "ProtocolError", "RoomHub", "add_routes"]
