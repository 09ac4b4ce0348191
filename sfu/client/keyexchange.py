"""Passphrase-authenticated exchange of SFrame media keys over the SFU's blind relay.

Every participant protects its frames with its own random 16-byte base key (one per key
generation, ``docs/e2ee.md`` "KID allocation") and hands that key to each other participant
encrypted for that participant alone. The SFU carries the messages as opaque relay payloads and
can neither read a key nor, without the room passphrase, take part in the exchange. The
protocol is specified in ``docs/e2ee.md`` ("Key exchange"); the browser client implements the
same protocol in ``sfu/web/e2ee/keyexchange.js`` and the two are tested against each other.

In short:

* ``room_secret = PBKDF2-SHA256(passphrase, room)``; two keys are derived from it: a MAC key
  that authenticates announcements and a salt that every pairwise key depends on.
* ``hello``: an ephemeral ECDH P-256 public key, MACed together with room, sender id,
  timestamp and reply flag. A hello that fails the MAC is reported and otherwise ignored.
* pairwise key = HKDF(ECDH shared secret, salt from the passphrase, info binding the room and
  both (participant id, public key) pairs).
* ``key``: ``(KID, generation, base key)`` sealed with AES-256-GCM under the pairwise key;
  the AAD binds room, sender id, recipient id, KID and generation. Receivers accept only a
  higher generation than they hold, so replayed messages cannot roll a key back.

This module needs only ``cryptography``; it never imports aiortc, so bots and tests can use it
without a media stack. The class is a synchronous state machine: feed it relay messages and
membership changes, and it calls back with payloads to send and keys to install.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac as std_hmac
import json
import re
import secrets
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sfu.client.sframe import KID_GENERATION_BITS, compose_kid

__all__ = [
    "MAX_PAYLOAD_CHARS",
    "MEDIA_KEY_LEN",
    "PBKDF2_ITERATIONS",
    "PROTOCOL_VERSION",
    "REJECT_BAD_KID",
    "REJECT_KEY_UNAUTHENTICATED",
    "REJECT_KID_CONFLICT",
    "REJECT_MALFORMED",
    "REJECT_UNSUPPORTED_VERSION",
    "REJECT_UNVERIFIED",
    "KeyExchange",
    "RoomKeys",
    "SendKey",
    "decode_payload",
    "derive_room_keys",
    "derive_room_secret",
    "encode_payload",
    "hello_mac",
    "hello_mac_input",
    "key_message_aad",
    "length_prefixed",
    "pairwise_info",
    "pairwise_key",
    "public_key_bytes",
]

PROTOCOL_VERSION: Final = 1

# PBKDF2-HMAC-SHA256 cost. Measured on a 2-core EPYC (docs/e2ee.md): about 105-170 ms in
# headless Chromium, 140 ms in Node 20 WebCrypto and 50 ms in Python for 300 000 iterations;
# 600 000 took up to 280 ms in Node, too close to the 300 ms budget for slower phones.
# It is part of the protocol: every participant must use the same number.
PBKDF2_ITERATIONS: Final = 300_000

# The relay refuses payloads above 4 KiB; ours are about 250 characters. Refusing large input
# before decoding it bounds the work a hostile relay can make us do.
MAX_PAYLOAD_CHARS: Final = 4096

MEDIA_KEY_LEN: Final = 16
_PUBLIC_KEY_LEN: Final = 65  # uncompressed P-256 point: 0x04 || X || Y
_MAC_LEN: Final = 32
_IV_LEN: Final = 12
_TAG_LEN: Final = 16
# JSON numbers are doubles in JavaScript: keep integers exactly representable there.
_MAX_JSON_INT: Final = 2**53 - 1

_LABEL: Final = "blindfold-kx-v1/"
_PBKDF2_LABEL: Final = (_LABEL + "pbkdf2").encode()
_MAC_KEY_LABEL: Final = (_LABEL + "mac-key").encode()
_PAIR_SALT_LABEL: Final = (_LABEL + "pair-salt").encode()
_HELLO_LABEL: Final = (_LABEL + "hello").encode()
_PAIRWISE_LABEL: Final = (_LABEL + "pairwise").encode()
_KEY_LABEL: Final = (_LABEL + "key").encode()

_KID_RE: Final = re.compile(r"0x[0-9a-f]{1,16}")

# Reasons given to on_peer_rejected. Each one means "this peer gets no key from us because of
# this message"; the page shows them as "cannot be verified".
REJECT_UNVERIFIED: Final = "unverified"
"""A hello's MAC failed: the peer has another passphrase, or the message or its sender id was
altered on the way."""
REJECT_KEY_UNAUTHENTICATED: Final = "key-unauthenticated"
"""A key message did not decrypt under the pairwise key: altered, misattributed or stale."""
REJECT_MALFORMED: Final = "malformed"
"""The payload is not a well-formed message of this protocol."""
REJECT_UNSUPPORTED_VERSION: Final = "unsupported-version"
"""The message is from another protocol version."""
REJECT_KID_CONFLICT: Final = "kid-conflict"
"""The peer sent a KID that another peer already uses (docs/e2ee.md: refuse it)."""
REJECT_BAD_KID: Final = "bad-kid"
"""The KID's generation bits or slot do not match the generation or the peer's earlier KIDs."""

# Bounds on state a hostile relay could otherwise grow without limit.
_MAX_EARLY_MESSAGES: Final = 256
_MAX_PENDING_PER_PEER: Final = 8
_MAX_PENDING_PEERS: Final = 64
_MAX_TOMBSTONES: Final = 1024

SendCallback = Callable[[str | None, str], None]
KeyCallback = Callable[[str, int, bytes], None]
RejectCallback = Callable[[str, str], None]
SendKeyCallback = Callable[[int, bytes], None]
KeyRemovedCallback = Callable[[str, int], None]
PeerCallback = Callable[[str], None]
Scheduler = Callable[[float, Callable[[], None]], object]


class _Malformed(ValueError):
    """A payload that is not a message of this protocol."""


# --- Primitives (pinned by tests/client/keyexchange_vectors.json in both languages) -----------


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _nfc(text: str) -> bytes:
    # People type passphrases (and room names) on different keyboards and input methods; NFC
    # makes "é" typed as one code point or as e + combining accent derive the same key.
    return unicodedata.normalize("NFC", text).encode("utf-8")


def length_prefixed(*fields: bytes) -> bytes:
    """Each field as a 4-byte big-endian length and its bytes: an unambiguous concatenation."""
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def derive_room_secret(room: str, passphrase: str, iterations: int = PBKDF2_ITERATIONS) -> bytes:
    """``PBKDF2-HMAC-SHA256(NFC(passphrase), salt = LP(label, NFC(room)), iterations, 32)``."""
    if not passphrase:
        raise ValueError("the room passphrase must not be empty")
    if iterations < 1:
        raise ValueError("iterations must be positive")
    salt = length_prefixed(_PBKDF2_LABEL, _nfc(room))
    kdf = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations)
    return kdf.derive(_nfc(passphrase))


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """The two keys every participant with the passphrase derives; never sent anywhere."""

    mac_key: bytes = field(repr=False)
    pair_salt: bytes = field(repr=False)


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def derive_room_keys(room_secret: bytes, room: str) -> RoomKeys:
    """Split the room secret into the hello MAC key and the pairwise-key salt (HKDF-SHA256)."""
    room_bytes = _nfc(room)
    return RoomKeys(
        mac_key=_hkdf(room_secret, None, length_prefixed(_MAC_KEY_LABEL, room_bytes)),
        pair_salt=_hkdf(room_secret, None, length_prefixed(_PAIR_SALT_LABEL, room_bytes)),
    )


def hello_mac_input(room: str, sender_id: str, public_key: bytes, ts: int, reply: bool) -> bytes:
    """What a hello's MAC covers: room, the sender's id, its public key, timestamp, reply flag."""
    return length_prefixed(
        _HELLO_LABEL, _nfc(room), _utf8(sender_id), public_key, _u64(ts), bytes((int(reply),))
    )


def hello_mac(
    mac_key: bytes, room: str, sender_id: str, public_key: bytes, ts: int, reply: bool
) -> bytes:
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(hello_mac_input(room, sender_id, public_key, ts, reply))
    return mac.finalize()


def pairwise_info(room: str, id_a: str, pub_a: bytes, id_b: str, pub_b: bytes) -> bytes:
    """HKDF info for a pairwise key; the two parties are sorted by id so both compute it alike."""
    first, second = sorted([(_utf8(id_a), pub_a), (_utf8(id_b), pub_b)])
    return length_prefixed(_PAIRWISE_LABEL, _nfc(room), first[0], first[1], second[0], second[1])


def pairwise_key(
    shared_secret: bytes,
    pair_salt: bytes,
    room: str,
    id_a: str,
    pub_a: bytes,
    id_b: str,
    pub_b: bytes,
) -> bytes:
    """The 32-byte AES-256-GCM key one pair of participants seals key messages with.

    The salt comes from the passphrase, so the ECDH secret alone (which an SFU that swapped
    public keys would hold) does not give the key; the info binds ids and public keys, so a
    key cannot be attributed to another participant or another hello.
    """
    return _hkdf(shared_secret, pair_salt, pairwise_info(room, id_a, pub_a, id_b, pub_b))


def key_message_aad(
    room: str, sender_id: str, recipient_id: str, kid: int, generation: int
) -> bytes:
    return length_prefixed(
        _KEY_LABEL, _nfc(room), _utf8(sender_id), _utf8(recipient_id), _u64(kid), _u64(generation)
    )


def public_key_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The uncompressed point (65 bytes), the form WebCrypto's ``exportKey('raw')`` gives."""
    return private_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def encode_payload(message: dict[str, Any]) -> str:
    """A message as a relay payload: compact JSON, UTF-8, standard base64 with padding."""
    return base64.b64encode(json.dumps(message, separators=(",", ":")).encode()).decode("ascii")


def decode_payload(payload: str) -> dict[str, Any]:
    """The inverse of :func:`encode_payload`; raises ``ValueError`` on anything else."""
    if len(payload) > MAX_PAYLOAD_CHARS:
        raise _Malformed(f"payload is longer than {MAX_PAYLOAD_CHARS} characters")
    try:
        message = json.loads(base64.b64decode(payload, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _Malformed(f"payload is not base64 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise _Malformed("payload is not a JSON object")
    return message


def _b64_field(message: dict[str, Any], name: str, length: int) -> bytes:
    value = message.get(name)
    if not isinstance(value, str):
        raise _Malformed(f"{name} is missing")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _Malformed(f"{name} is not base64") from None
    if len(raw) != length:
        raise _Malformed(f"{name} must be {length} bytes")
    return raw


def _int_field(message: dict[str, Any], name: str) -> int:
    value = message.get(name)
    # bool is an int in Python, but true/false is not a number in JSON (nor in the JS client).
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_JSON_INT:
        raise _Malformed(f"{name} must be an integer in [0, 2^53)")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- State machine ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendKey:
    """One generation of this participant's own media key."""

    kid: int
    key: bytes = field(repr=False)
    generation: int


@dataclass(frozen=True, slots=True)
class _Identity:
    """What start() creates: the room keys and this session's ephemeral ECDH key."""

    room_keys: RoomKeys
    private_key: ec.EllipticCurvePrivateKey
    public_key: bytes
    ts: int


@dataclass(slots=True)
class _Peer:
    """A peer whose hello verified: we share a pairwise key and have sent it our media key."""

    public_key: bytes
    ts: int
    aead: AESGCM
    recv_generation: int = -1
    slot: int | None = None
    current_kid: int | None = None


def _default_schedule(delay: float, callback: Callable[[], None]) -> None:
    # Inside asyncio (the usual case: relay messages arrive on a WebSocket task) use the loop's
    # timer; elsewhere there is nothing to wait on, so act at once.
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        callback()
        return
    loop.call_later(delay, callback)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class KeyExchange:
    """One participant's side of the key exchange (``docs/e2ee.md``, "Key exchange").

    ``send(to, payload)`` must put ``{"type": "relay", "to": to, "payload": payload}`` on the
    room WebSocket (``to`` ``None`` = everyone). Feed every incoming relay message to
    :meth:`on_relay` and the room's membership changes to :meth:`peer_joined` and
    :meth:`peer_left`; call :meth:`resync` after the room socket resumed (messages sent while
    it was down are lost). Keys come out through the callbacks:

    * ``on_key(sender_id, kid, key)``: install a receive key (``E2eeContext.add_receive_key``);
    * ``on_send_key(kid, key)``: protect own frames with this key from now on;
    * ``on_key_removed(sender_id, kid)``: a superseded receive key's grace period is over;
    * ``on_peer_rejected(peer_id, reason)``: the peer cannot be verified (one of ``REJECT_*``);
      it gets no key from us;
    * ``on_peer_verified(peer_id)``: the peer proved it knows the passphrase.

    ``slot`` is the sender slot the control plane assigned (``compose_kid``). Times are in
    seconds: ``switch_delay`` is how long a rotated key is distributed before it is used (so
    receivers hold it before the first frame arrives) and ``retain`` how long a superseded
    receive key stays usable for frames in flight. ``schedule(delay, callback)`` runs timers
    (default: the running asyncio loop, or at once without one). ``iterations`` must be the same
    for every participant; change it only in tests.

    Not thread-safe: call it from one thread (the event loop). ``start()`` runs PBKDF2, which
    takes tens of milliseconds.
    """

    def __init__(
        self,
        room_name: str,
        participant_id: str,
        passphrase: str,
        send: SendCallback,
        on_key: KeyCallback,
        on_peer_rejected: RejectCallback,
        *,
        slot: int,
        on_send_key: SendKeyCallback | None = None,
        on_key_removed: KeyRemovedCallback | None = None,
        on_peer_verified: PeerCallback | None = None,
        iterations: int = PBKDF2_ITERATIONS,
        switch_delay: float = 1.0,
        retain: float = 5.0,
        schedule: Scheduler | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        if not participant_id:
            raise ValueError("participant_id must not be empty")
        if not passphrase:
            raise ValueError("the room passphrase must not be empty")
        compose_kid(slot, 0)  # validates the slot now rather than at the first rotation
        self.room = room_name
        self.participant_id = participant_id
        self._passphrase = passphrase
        self._iterations = iterations
        self._slot = slot
        self._send = send
        self._on_key = on_key
        self._on_peer_rejected = on_peer_rejected
        self._on_send_key = on_send_key
        self._on_key_removed = on_key_removed
        self._on_peer_verified = on_peer_verified
        self._switch_delay = switch_delay
        self._retain = retain
        self._schedule: Scheduler = schedule or _default_schedule
        self._clock_ms = clock_ms or _now_ms

        self._identity: _Identity | None = None
        self._generation = 0
        self._current: SendKey | None = None
        self._pending_send: SendKey | None = None
        self._peers: dict[str, _Peer] = {}
        self._members: set[str] = set()
        self._answered: set[str] = set()
        # KID -> (sender, base key) of every receive key handed out and not yet removed; it is
        # also how a KID claimed by two peers is noticed.
        self._receive_keys: dict[int, tuple[str, bytes]] = {}
        # Last accepted hello timestamp of peers that left, so a replay of their old hello
        # does not bring them back; a real rejoin announces with a newer timestamp.
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        self._early: list[tuple[str, str]] = []
        self._pending: dict[str, list[dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return (
            f"KeyExchange(room={self.room!r}, participant_id={self.participant_id!r}, "
            f"verified={sorted(self._peers)})"
        )

    # --- public API ------------------------------------------------------------------------

    def start(self) -> None:
        """Derive the room keys, create generation 0 of our media key and announce ourselves."""
        if self._identity is not None:
            return
        secret = derive_room_secret(self.room, self._passphrase, self._iterations)
        private_key = ec.generate_private_key(ec.SECP256R1())
        self._identity = _Identity(
            derive_room_keys(secret, self.room),
            private_key,
            public_key_bytes(private_key),
            self._clock_ms(),
        )
        self._switch_to(self._new_send_key(0))
        self._send(None, self._hello(reply=False))
        early, self._early = self._early, []
        for from_id, payload in early:
            self.on_relay(from_id, payload)

    def on_relay(self, from_id: str, payload: str) -> None:
        """Handle one relay message; ``from_id`` is the relay's ``from`` field."""
        if self._identity is None:
            # The page may connect before the passphrase is entered; keep what arrives.
            if len(self._early) < _MAX_EARLY_MESSAGES:
                self._early.append((from_id, payload))
            return
        if from_id == self.participant_id or not from_id:
            return
        try:
            message = decode_payload(payload)
            if message.get("v") != PROTOCOL_VERSION:
                self._reject(from_id, REJECT_UNSUPPORTED_VERSION)
                return
            kind = message.get("t")
            if kind == "hello":
                self._handle_hello(from_id, message)
            elif kind == "key":
                self._handle_key(from_id, message)
            else:
                raise _Malformed(f"unknown message type {kind!r}")
        except _Malformed:
            self._reject(from_id, REJECT_MALFORMED)

    def peer_joined(self, peer_id: str) -> None:
        """The room says ``peer_id`` joined.

        Nothing is sent: the joiner's own broadcast hello reaches us (the relay delivers in
        order), and we answer that. The id is remembered so that :meth:`unverified_peers` can
        list members that never proved the passphrase (a wrong passphrase, no E2EE support).
        """
        if peer_id != self.participant_id:
            self._members.add(peer_id)

    def peer_left(self, peer_id: str) -> None:
        """The room says ``peer_id`` left: forget it, and rotate our key if it held it."""
        self._members.discard(peer_id)
        self._answered.discard(peer_id)
        self._pending.pop(peer_id, None)
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._remember_departure(peer_id, peer.ts)
        for kid, (sender, _) in list(self._receive_keys.items()):
            if sender == peer_id:
                self._retire(peer_id, kid)
        self._rotate()

    def current_send_key(self) -> SendKey | None:
        """The key our frames are protected with now (``None`` before :meth:`start`)."""
        return self._current

    def verified_peers(self) -> frozenset[str]:
        """Peers that proved the passphrase and were sent our key."""
        return frozenset(self._peers)

    def unverified_peers(self) -> frozenset[str]:
        """Members the room announced that have not proved the passphrase (yet)."""
        return frozenset(self._members - self._peers.keys())

    def resync(self) -> None:
        """Announce again, e.g. after the room socket resumed: messages sent to us while it
        was down are lost, so every verified peer answers with its current key."""
        own = self._identity
        if own is None:
            return
        # A newer timestamp is what tells peers this is not a replay of our earlier hello.
        self._identity = replace(own, ts=max(self._clock_ms(), own.ts + 1))
        self._send(None, self._hello(reply=False))

    def rotate(self) -> None:
        """Start a new key generation now (e.g. before the counter runs out)."""
        if self._identity is not None:
            self._rotate()

    # --- messages --------------------------------------------------------------------------

    def _own(self) -> _Identity:
        if self._identity is None:
            raise RuntimeError("KeyExchange.start() has not run")
        return self._identity

    def _hello(self, *, reply: bool) -> str:
        own = self._own()
        mac = hello_mac(
            own.room_keys.mac_key, self.room, self.participant_id, own.public_key, own.ts, reply
        )
        return encode_payload(
            {
                "v": PROTOCOL_VERSION,
                "t": "hello",
                "pub": _b64(own.public_key),
                "ts": own.ts,
                "reply": reply,
                "mac": _b64(mac),
            }
        )

    def _handle_hello(self, from_id: str, message: dict[str, Any]) -> None:
        own = self._own()
        public_key = _b64_field(message, "pub", _PUBLIC_KEY_LEN)
        ts = _int_field(message, "ts")
        reply = message.get("reply")
        if not isinstance(reply, bool):
            raise _Malformed("reply must be a boolean")
        mac = _b64_field(message, "mac", _MAC_LEN)
        expected = hello_mac(own.room_keys.mac_key, self.room, from_id, public_key, ts, reply)
        if not std_hmac.compare_digest(mac, expected):
            self._reject(from_id, REJECT_UNVERIFIED)
            self._answer_unverified(from_id, reply)
            return
        existing = self._peers.get(from_id)
        if existing is not None:
            if ts <= existing.ts:
                return  # a duplicate (its reply to our hello carries the same ts) or a replay
            if existing.public_key == public_key:
                # The same session announcing again (resync): it may have missed our keys.
                existing.ts = ts
                self._send_current_keys(from_id)
                return
        elif ts <= self._tombstones.get(from_id, -1):
            return  # a replay of a departed peer's hello
        try:
            peer_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
        except ValueError:
            raise _Malformed("pub is not a P-256 point") from None
        shared = own.private_key.exchange(ec.ECDH(), peer_public)
        key = pairwise_key(
            shared,
            own.room_keys.pair_salt,
            self.room,
            self.participant_id,
            own.public_key,
            from_id,
            public_key,
        )
        if existing is not None:
            # The peer restarted under the same id: its old keys and generations are void.
            for kid, (sender, _) in list(self._receive_keys.items()):
                if sender == from_id:
                    self._retire(from_id, kid)
        self._tombstones.pop(from_id, None)
        self._peers[from_id] = _Peer(public_key, ts, AESGCM(key))
        self._members.add(from_id)
        if self._on_peer_verified is not None:
            self._on_peer_verified(from_id)
        if not reply:
            self._send(from_id, self._hello(reply=True))
        self._send_current_keys(from_id)
        for pending in self._pending.pop(from_id, []):
            try:
                self._handle_key(from_id, pending)
            except _Malformed:
                self._reject(from_id, REJECT_MALFORMED)

    def _answer_unverified(self, peer_id: str, reply: bool) -> None:
        # Answer a failed hello with ours (no key, of course): its sender then sees our MAC fail
        # too and can tell its user the passphrase is probably wrong. Once per peer, so that a
        # member spamming hellos cannot make us spend our own relay rate limit on answers.
        if reply or peer_id in self._peers or peer_id in self._answered:
            return
        if len(self._answered) >= _MAX_TOMBSTONES:
            self._answered.clear()
        self._answered.add(peer_id)
        self._send(peer_id, self._hello(reply=True))

    def _send_current_keys(self, peer_id: str) -> None:
        # The key in use and, during a rotation, the next one, so the peer can open frames
        # both before and after the switch.
        for send_key in (self._current, self._pending_send):
            if send_key is not None:
                self._send_key_to(peer_id, send_key)

    def _send_key_to(self, peer_id: str, send_key: SendKey) -> None:
        peer = self._peers[peer_id]
        iv = secrets.token_bytes(_IV_LEN)
        aad = key_message_aad(
            self.room, self.participant_id, peer_id, send_key.kid, send_key.generation
        )
        sealed = peer.aead.encrypt(iv, send_key.key, aad)
        self._send(
            peer_id,
            encode_payload(
                {
                    "v": PROTOCOL_VERSION,
                    "t": "key",
                    "kid": f"0x{send_key.kid:x}",
                    "gen": send_key.generation,
                    "iv": _b64(iv),
                    "ct": _b64(sealed),
                }
            ),
        )

    def _handle_key(self, from_id: str, message: dict[str, Any]) -> None:
        peer = self._peers.get(from_id)
        if peer is None:
            # A key can overtake its sender's hello only if the relay reorders; keep a few.
            if from_id in self._pending or len(self._pending) < _MAX_PENDING_PEERS:
                queue = self._pending.setdefault(from_id, [])
                if len(queue) < _MAX_PENDING_PER_PEER:
                    queue.append(message)
            return
        kid_text = message.get("kid")
        if not isinstance(kid_text, str) or not _KID_RE.fullmatch(kid_text):
            raise _Malformed("kid must be a lower-case hex string 0x...")
        kid = int(kid_text, 16)
        generation = _int_field(message, "gen")
        iv = _b64_field(message, "iv", _IV_LEN)
        sealed = _b64_field(message, "ct", MEDIA_KEY_LEN + _TAG_LEN)
        aad = key_message_aad(self.room, from_id, self.participant_id, kid, generation)
        try:
            key = peer.aead.decrypt(iv, sealed, aad)
        except InvalidTag:
            self._reject(from_id, REJECT_KEY_UNAUTHENTICATED)
            return
        if generation <= peer.recv_generation:
            return  # a replay or a duplicate: never roll back to an older key
        generation_mask = (1 << KID_GENERATION_BITS) - 1
        slot = kid >> KID_GENERATION_BITS
        if (kid & generation_mask) != generation % (1 << KID_GENERATION_BITS) or (
            peer.slot is not None and slot != peer.slot
        ):
            self._reject(from_id, REJECT_BAD_KID)
            return
        owner = self._receive_keys.get(kid)
        if owner is not None and owner[0] != from_id:
            self._reject(from_id, REJECT_KID_CONFLICT)
            return
        previous = peer.current_kid
        peer.recv_generation = generation
        peer.slot = slot
        peer.current_kid = kid
        self._receive_keys[kid] = (from_id, key)
        self._on_key(from_id, kid, key)
        if previous is not None and previous != kid:
            self._retire(from_id, previous)

    # --- keys ------------------------------------------------------------------------------

    def _new_send_key(self, generation: int) -> SendKey:
        if generation > _MAX_JSON_INT:
            raise OverflowError("key generation exhausted")
        return SendKey(
            compose_kid(self._slot, generation), secrets.token_bytes(MEDIA_KEY_LEN), generation
        )

    def _rotate(self) -> None:
        self._generation += 1
        new = self._new_send_key(self._generation)
        self._pending_send = new
        # Distribute first and switch later, so receivers hold the key before frames use it.
        for peer_id in self._peers:
            self._send_key_to(peer_id, new)
        self._later(self._switch_delay, lambda: self._switch_to(new))

    def _switch_to(self, new: SendKey) -> None:
        if self._pending_send is new:
            self._pending_send = None
        if self._current is not None and new.generation <= self._current.generation:
            return
        self._current = new
        if self._on_send_key is not None:
            self._on_send_key(new.kid, new.key)

    def _retire(self, sender: str, kid: int) -> None:
        entry = self._receive_keys.get(kid)
        if entry is None or entry[0] != sender:
            return

        def remove() -> None:
            # A newer key may have taken this KID meanwhile (16 generations on); keep that one.
            if self._receive_keys.get(kid) is entry:
                del self._receive_keys[kid]
                if self._on_key_removed is not None:
                    self._on_key_removed(sender, kid)

        self._later(self._retain, remove)

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        if delay <= 0:
            callback()
        else:
            self._schedule(delay, callback)

    def _remember_departure(self, peer_id: str, ts: int) -> None:
        self._tombstones[peer_id] = ts
        self._tombstones.move_to_end(peer_id)
        while len(self._tombstones) > _MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _reject(self, peer_id: str, reason: str) -> None:
        self._on_peer_rejected(peer_id, reason)
