"""SFU-to-SFU relays: what each end is given (`RelayEnd`), and the dialing end's ICE checks
(RFC 8445, controlling side).

A relay joins two media planes (two workers, or two nodes) with one transport on each, over
DTLS-SRTP like any client's: the payload inside is still the publisher's end-to-end
encrypted frame, so neither side needs a key. One end is an ordinary ICE-lite transport that
answers checks; the other (`RelayDialer`) behaves like a browser would: it sends signed
Binding requests with USE-CANDIDATE to the one address it was given, starts the DTLS
handshake as the client once the first check is answered, and keeps checking every
CHECK_INTERVAL as consent freshness (RFC 7675) for both sides: the answering end expires
the relay like any client that stops checking, and the dialing end gives up when answers
stop for `consent_timeout`.

The engine owns the dialer's socket and timers; this module only builds the requests and
judges the responses, so it can be tested without a network.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from sfu.media.dtls import Fingerprint
from sfu.media.ice import Address, generate_credentials
from sfu.media.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
    ATTR_USERNAME,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    StunError,
    encode,
    parse,
)

# Until the first answer: often, so a relay is up within a round trip or two of both ends
# existing; afterwards a keepalive well inside the peer's consent timeout.
RETRY_INTERVAL = 0.2
CHECK_INTERVAL = 2.0
# Transactions remembered for matching answers (a late answer to an older check still counts).
_PENDING = 8
# RFC 8445 section 5.1.2.1 priority of a host candidate (type preference 126, component 1).
_HOST_PRIORITY = (126 << 24) | (65535 << 8) | 255


@dataclass(frozen=True)
class RelayEnd:
    """What one end of a relay to another media plane needs: its own ICE credentials, the
    other end's, the DTLS fingerprints it accepts from the other end, and, for the end that
    dials, the other end's address (that end checks it and is the DTLS client). The media
    API's `create_relay` takes one."""

    local: tuple[str, str]
    remote_ufrag: str
    remote_pwd: str
    fingerprints: tuple[Fingerprint, ...]
    dial: tuple[str, int] | None = None

    @classmethod
    def pair(
        cls, fingerprints: Sequence[Fingerprint], answer_at: tuple[str, int]
    ) -> tuple[RelayEnd, RelayEnd]:
        """Both ends of a relay made in one place, with fresh credentials: the answering end
        (at `answer_at`) and the end that dials it."""
        answer, dial = generate_credentials(), generate_credentials()
        accepted = tuple(fingerprints)
        return (
            cls(answer, dial[0], dial[1], accepted),
            cls(dial, answer[0], answer[1], accepted, answer_at),
        )


@dataclass
class RelayDialer:
    """ICE state of a relay's dialing end."""

    target: Address
    local_ufrag: str
    remote_ufrag: str
    remote_pwd: str = field(repr=False)
    answered: bool = False
    last_answer: float | None = None
    next_check: float = 0.0
    checks_sent: int = 0
    _pending: list[bytes] = field(default_factory=list, repr=False)
    _tiebreaker: bytes = field(default_factory=lambda: secrets.token_bytes(8), repr=False)

    def due(self, now: float) -> bool:
        return now >= self.next_check

    def check(self, now: float) -> bytes:
        """The next Binding request (nominating: there is only one pair to choose)."""
        tid = secrets.token_bytes(12)
        self._pending.append(tid)
        del self._pending[:-_PENDING]
        self.checks_sent += 1
        self.next_check = now + (CHECK_INTERVAL if self.answered else RETRY_INTERVAL)
        username = f"{self.remote_ufrag}:{self.local_ufrag}".encode()
        return encode(
            BINDING_REQUEST,
            tid,
            (
                (ATTR_USERNAME, username),
                (ATTR_PRIORITY, _HOST_PRIORITY.to_bytes(4, "big")),
                (ATTR_ICE_CONTROLLING, self._tiebreaker),
                (ATTR_USE_CANDIDATE, b""),
            ),
            integrity_key=self.remote_pwd.encode("utf-8"),
        )

    def on_response(self, data: bytes, now: float) -> bool:
        """A STUN datagram from the target: True if it answers one of our checks (signed
        with the peer's password), which also renews consent."""
        try:
            msg = parse(data)
        except StunError:
            return False
        if msg.msg_type != BINDING_SUCCESS or msg.transaction_id not in self._pending:
            return False
        if not msg.check_integrity(self.remote_pwd.encode("utf-8")):
            return False
        self._pending.remove(msg.transaction_id)
        first = not self.answered
        self.answered = True
        self.last_answer = now
        if first:
            self.next_check = now + CHECK_INTERVAL
        return True
