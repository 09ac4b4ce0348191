"""The local channel between the control plane and a media worker process: messages of the
media API (sfu/media/api.py) as length-prefixed frames over a UNIX stream socket.

Only commands, events and stats snapshots cross it, never a packet. Both ends are this
program on this host, under one user, over a socket in a directory only that user can open,
so frames are pickled: every type in the API is a plain dataclass or a builtin.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

# A frame's length, big-endian. A command or event is a few hundred bytes, a snapshot a few
# KiB; anything near this bound is a bug, not traffic.
_HEADER = struct.Struct("!I")
MAX_FRAME = 16 * 1024 * 1024


class ChannelClosed(Exception):
    """The other end closed the channel (or sent a frame that cannot be read)."""


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a {len(body)}-byte channel message exceeds {MAX_FRAME} bytes")
    return _HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> Any:
    try:
        header = await reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise ChannelClosed(f"frame of {length} bytes exceeds {MAX_FRAME}")
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc) or "closed") from None
    try:
        return pickle.loads(body)  # noqa: S301 - our own process at the other end (see above)
    except Exception as exc:
        raise ChannelClosed(f"unreadable frame: {exc}") from None
