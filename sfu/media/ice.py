"""ICE-lite responder (RFC 8445 sections 2.5 and 7.3) with consent freshness (RFC 7675).

The server never sends connectivity checks: it answers the client's, learns which source
addresses proved knowledge of the session password, and follows the client's nomination. All of
it is synchronous so the UDP protocol can call `IceLiteAgent.handle_stun` straight from
`datagram_received` and `sendto` whatever comes back.

Anything unauthenticated is dropped without an answer and without touching session state: an
unsigned 401 would only help an off-path sender probe which ufrags exist, and every address we
remember is one that could otherwise be spoofed into receiving media.
"""

from __future__ import annotations

import enum
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sfu.media.stun import (
    BINDING_REQUEST,
    StunError,
    StunMessage,
    build_binding_error,
    build_binding_success,
    parse,
)

# RFC 8839 section 5.4 ice-char: ALPHA / DIGIT / "+" / "/".
ICE_CHARS = string.ascii_letters + string.digits + "+/"
# RFC 8839 asks for at least 24 bits of randomness in the ufrag and 128 in the password
# (4 and 22 ice-chars). The ufrag is also our lookup key across every session of the worker,
# so it gets more than the minimum to keep accidental collisions out of the picture.
UFRAG_LENGTH = 8
PWD_LENGTH = 24

DEFAULT_MAX_ADDRESSES = 8
DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675 section 5.1

# asyncio hands IPv6 peers over as 4-tuples; only [0] and [1] are read here, and the tuple is
# stored as given so that it matches what the mux sees for the peer's later packets.
Address = tuple[str, int]


def random_ice_string(length: int) -> str:
    return "".join(secrets.choice(ICE_CHARS) for _ in range(length))


def generate_credentials() -> tuple[str, str]:
    """A fresh (ufrag, pwd) pair for one transport."""
    return random_ice_string(UFRAG_LENGTH), random_ice_string(PWD_LENGTH)


class IceState(enum.Enum):
    NEW = "new"
    CHECKING = "checking"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class IceLiteSession:
    """ICE state of one transport (one client PeerConnection) on the shared socket."""

    local_ufrag: str
    # Credentials stay out of repr() so a logged session never leaks them.
    local_pwd: str = field(repr=False)
    created_at: float
    remote_ufrag: str | None = None
    remote_pwd: str | None = field(default=None, repr=False)
    max_addresses: int = DEFAULT_MAX_ADDRESSES
    consent_timeout: float = DEFAULT_CONSENT_TIMEOUT
    state: IceState = IceState.NEW
    addresses: set[Address] = field(default_factory=set)
    selected: Address | None = None
    last_check: float | None = None
    # Short-term credential key (RFC 8489 section 9.1.1). ICE passwords are ASCII, so the
    # OpaqueString profile leaves them unchanged and the UTF-8 bytes are the key.
    key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = self.local_pwd.encode("utf-8")

    def set_remote_credentials(self, ufrag: str, pwd: str) -> None:
        self.remote_ufrag = ufrag
        self.remote_pwd = pwd

    @property
    def consent_deadline(self) -> float:
        """Monotonic time at which consent lapses unless another valid check arrives."""
        since = self.created_at if self.last_check is None else self.last_check
        return since + self.consent_timeout

    def close(self) -> None:
        self.state = IceState.CLOSED


class IceLiteAgent:
    """All ICE-lite sessions of one media socket, keyed by the server ufrag."""

    def __init__(
        self,
        *,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_addresses = max_addresses
        self.consent_timeout = consent_timeout
        self._clock = clock
        self._sessions: dict[str, IceLiteSession] = {}
        # Plain ints: bumped per packet, exported by a custom collector.
        self.requests_ok = 0
        self.requests_unauthenticated = 0
        self.requests_unknown_ufrag = 0
        self.malformed = 0
        self.address_cap_rejections = 0
        self.consent_expiries = 0
        self.role_conflicts = 0
        self.bad_requests = 0
        self.ignored = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, ufrag: object) -> bool:
        return ufrag in self._sessions

    def create_session(
        self,
        remote_ufrag: str | None = None,
        remote_pwd: str | None = None,
        local: tuple[str, str] | None = None,
    ) -> IceLiteSession:
        """A session with fresh local credentials, or `local` (ufrag, pwd) when the control
        plane chose them (a media worker's transports); ValueError if that ufrag is taken."""
        if local is not None:
            ufrag, pwd = local
            if ufrag in self._sessions:
                raise ValueError(f"ICE ufrag {ufrag!r} is already in use")
        else:
            ufrag, pwd = generate_credentials()
            while ufrag in self._sessions:
                ufrag, pwd = generate_credentials()
        session = IceLiteSession(
            local_ufrag=ufrag,
            local_pwd=pwd,
            created_at=self._clock(),
            remote_ufrag=remote_ufrag,
            remote_pwd=remote_pwd,
            max_addresses=self.max_addresses,
            consent_timeout=self.consent_timeout,
        )
        self._sessions[ufrag] = session
        return session

    def get(self, ufrag: str) -> IceLiteSession | None:
        return self._sessions.get(ufrag)

    def remove(self, ufrag: str) -> IceLiteSession | None:
        session = self._sessions.pop(ufrag, None)
        if session is not None:
            session.close()
        return session

    def sessions(self) -> list[IceLiteSession]:
        return list(self._sessions.values())

    def expire(self, now: float | None = None) -> list[IceLiteSession]:
        """Close and return the sessions whose consent lapsed; the caller removes them.

        Removal stays explicit because the owner of a session has more to tear down (DTLS,
        SRTP, the mux's address table) and must still find it by ufrag to do so.
        """
        if now is None:
            now = self._clock()
        lapsed = []
        for session in self._sessions.values():
            if session.state is not IceState.CLOSED and now >= session.consent_deadline:
                session.close()
                lapsed.append(session)
        self.consent_expiries += len(lapsed)
        return lapsed

    def handle_stun(self, data: bytes, addr: Address) -> bytes | None:
        """Answer one STUN datagram from `addr`: the bytes to send back, or None to drop it."""
        try:
            msg = parse(data)
            if msg.msg_type != BINDING_REQUEST:
                # Binding indications are keepalives (RFC 8445 section 11) and need no answer;
                # a lite agent sends no requests, so any response is a stray.
                self.ignored += 1
                return None
            return self._handle_binding_request(msg, addr)
        except StunError:
            self.malformed += 1
            return None

    def _handle_binding_request(self, msg: StunMessage, addr: Address) -> bytes | None:
        # A bad FINGERPRINT means the datagram is not really STUN (RFC 5389 section 8).
        if msg.has_fingerprint and not msg.check_fingerprint():
            self.malformed += 1
            return None
        username = msg.username
        if username is None:
            self.requests_unauthenticated += 1
            return None
        local_ufrag, colon, remote_ufrag = username.partition(":")
        if not colon:
            self.requests_unauthenticated += 1
            return None
        session = self._sessions.get(local_ufrag)
        if session is None or session.state is IceState.CLOSED:
            self.requests_unknown_ufrag += 1
            return None
        if not msg.check_integrity(session.key):
            self.requests_unauthenticated += 1
            return None
        # Until the client's SDP arrives any peer ufrag is accepted: the password already proved
        # the request belongs to this session. Afterwards a different one is a stale generation
        # (or an ICE restart the signalling has not told us about yet).
        if session.remote_ufrag is not None and remote_ufrag != session.remote_ufrag:
            self.requests_unknown_ufrag += 1
            return None

        tid = msg.transaction_id
        controlling = msg.ice_controlling
        controlled = msg.ice_controlled
        if (controlling is None) == (controlled is None):
            # A check must state exactly one role (RFC 8445 section 7.2.2).
            self.bad_requests += 1
            return build_binding_error(tid, 400, integrity_key=session.key)
        if controlled is not None:
            # RFC 8445 section 7.3.1.1: a controlled agent seeing ICE-CONTROLLED either switches
            # to controlling (our tiebreaker >= theirs) or answers 487 (ours < theirs). A lite
            # agent must stay controlled against a full peer (section 6.1.1), so the first
            # branch is not open to us; answering as if our tiebreaker were below any value
            # keeps the rule's outcome: the full peer switches to controlling and retries.
            self.role_conflicts += 1
            return build_binding_error(tid, 487, integrity_key=session.key)

        if addr not in session.addresses:
            if len(session.addresses) >= session.max_addresses:
                self.address_cap_rejections += 1
                return None
            session.addresses.add(addr)
        session.last_check = self._clock()
        if msg.use_candidate:
            # Latest nomination wins (the controlling side decides; RFC 8445 section 7.3.1.5).
            session.selected = addr
            session.state = IceState.CONNECTED
        elif session.state is IceState.NEW:
            session.state = IceState.CHECKING
        self.requests_ok += 1
        return build_binding_success(tid, addr, session.key)
