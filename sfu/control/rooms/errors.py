"""The one exception of the room protocol."""

from __future__ import annotations


class ProtocolError(Exception):
    """A client mistake answered with an `error` message; fatal ones close the socket."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
