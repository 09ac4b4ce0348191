"""The passphrase-authenticated key exchange (``sfu/client/keyexchange.py``).

Three layers: pinned vectors that the browser implementation checks too
(``keyexchange_vectors.json``); whole-room scenarios through an in-memory relay that behaves
like the SFU's blind relay (and, in some tests, like a hostile one); and interop with the
browser implementation, run in Node through ``tests/js/kx_driver.mjs``.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sfu.client import keyexchange as kx
from sfu.client import sframe as sf
from tests.chromium import CHROMIUM_FLAGS as SHARED_FLAGS

ROOT = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads(
    Path(__file__).with_name("keyexchange_vectors.json").read_text(encoding="utf-8")
)
ROOM = "standup"
PASSPHRASE = "correct horse battery staple"
# Scenario tests use a cheap PBKDF2; the vector test runs the real iteration count.
FAST = 1000
NODE = shutil.which("node")


# --- Vectors ---------------------------------------------------------------------------------


def test_vector_room_secret_and_room_keys() -> None:
    assert VECTORS["pbkdf2_iterations"] == kx.PBKDF2_ITERATIONS
    secret = kx.derive_room_secret(VECTORS["room"], VECTORS["passphrase"])
    assert secret.hex() == VECTORS["room_secret"]
    # The same passphrase typed in decomposed form (e + combining accent) gives the same key.
    assert VECTORS["passphrase"] != VECTORS["passphrase_nfd"]
    assert kx.derive_room_secret(VECTORS["room"], VECTORS["passphrase_nfd"]) == secret
    keys = kx.derive_room_keys(secret, VECTORS["room"])
    assert keys.mac_key.hex() == VECTORS["mac_key"]
    assert keys.pair_salt.hex() == VECTORS["pair_salt"]


def _private(party: dict[str, Any]) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(party["private_scalar"], 16), ec.SECP256R1())


def test_vector_hello_and_pairwise_key() -> None:
    alice, bob, hello = VECTORS["alice"], VECTORS["bob"], VECTORS["hello"]
    a_pub, b_pub = bytes.fromhex(alice["public"]), bytes.fromhex(bob["public"])
    assert kx.public_key_bytes(_private(alice)) == a_pub
    mac_key = bytes.fromhex(VECTORS["mac_key"])
    mac_input = kx.hello_mac_input(ROOM, hello["sender"], a_pub, hello["ts"], hello["reply"])
    assert mac_input.hex() == hello["mac_input"]
    mac = kx.hello_mac(mac_key, ROOM, hello["sender"], a_pub, hello["ts"], hello["reply"])
    assert mac.hex() == hello["mac"]
    assert kx.decode_payload(hello["payload"]) == {
        "v": 1,
        "t": "hello",
        "pub": base64.b64encode(a_pub).decode(),
        "ts": hello["ts"],
        "reply": False,
        "mac": base64.b64encode(mac).decode(),
    }
    shared = _private(alice).exchange(ec.ECDH(), _private(bob).public_key())
    assert shared.hex() == VECTORS["ecdh_shared_secret"]
    info = kx.pairwise_info(ROOM, alice["id"], a_pub, bob["id"], b_pub)
    assert info.hex() == VECTORS["pairwise_info"]
    assert kx.pairwise_info(ROOM, bob["id"], b_pub, alice["id"], a_pub) == info
    key = kx.pairwise_key(
        shared, bytes.fromhex(VECTORS["pair_salt"]), ROOM, bob["id"], b_pub, alice["id"], a_pub
    )
    assert key.hex() == VECTORS["pairwise_key"]
    for m in VECTORS["key_messages"]:
        aad = kx.key_message_aad(
            ROOM, m["sender"], m["recipient"], int(m["kid"], 16), m["generation"]
        )
        assert aad.hex() == m["aad"]
        sealed = AESGCM(key).encrypt(bytes.fromhex(m["iv"]), bytes.fromhex(m["media_key"]), aad)
        assert sealed.hex() == m["ciphertext"]
        assert kx.decode_payload(m["payload"])["kid"] == m["kid"]


# --- An in-memory relay ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    sender: str
    to: str | None
    payload: str


@dataclass(frozen=True)
class Delivery:
    sender: str
    recipient: str
    payload: str


class Member(Protocol):
    id: str

    def start(self) -> None: ...
    def deliver(self, sender: str, payload: str) -> None: ...
    def joined(self, peer_id: str) -> None: ...
    def left(self, peer_id: str) -> None: ...
    def run_timers(self) -> None: ...
    def latest_key_from(self, sender: str) -> tuple[int, bytes] | None: ...
    def send_key(self) -> tuple[int, bytes]: ...


@dataclass
class PyMember:
    """A Python participant; its timers run when the test says so."""

    relay: Relay
    id: str
    slot: int
    passphrase: str = PASSPHRASE
    keys: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, int]] = field(default_factory=list)
    send_keys: list[tuple[int, bytes]] = field(default_factory=list)
    timers: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kx = kx.KeyExchange(
            ROOM,
            self.id,
            self.passphrase,
            lambda to, payload: self.relay.post(Sent(self.id, to, payload)),
            lambda sender, kid, key: self.keys.setdefault(sender, []).append((kid, key)),
            lambda peer, reason: self.rejected.append((peer, reason)),
            slot=self.slot,
            iterations=FAST,
            on_send_key=lambda kid, key: self.send_keys.append((kid, key)),
            on_key_removed=lambda sender, kid: self.removed.append((sender, kid)),
            schedule=lambda _delay, fn: self.timers.append(fn),
            clock_ms=lambda: self.relay.now_ms,
        )

    def start(self) -> None:
        self.kx.start()

    def deliver(self, sender: str, payload: str) -> None:
        self.kx.on_relay(sender, payload)

    def joined(self, peer_id: str) -> None:
        self.kx.peer_joined(peer_id)

    def left(self, peer_id: str) -> None:
        self.kx.peer_left(peer_id)

    def run_timers(self) -> None:
        due, self.timers = self.timers, []
        for fn in due:
            fn()

    def latest_key_from(self, sender: str) -> tuple[int, bytes] | None:
        got = self.keys.get(sender)
        return got[-1] if got else None

    def send_key(self) -> tuple[int, bytes]:
        current = self.kx.current_send_key()
        assert current is not None
        return current.kid, current.key


class Relay:
    """Delivers like the SFU's relay: in order, `from` set by the relay, nothing to leavers."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.queue: list[Sent] = []
        self.log: list[Delivery] = []
        self.now_ms = 1_700_000_000_000
        self.tamper: Callable[[Delivery], Delivery] = lambda d: d
        self.offline: set[str] = set()  # members whose socket is down: messages to them are lost

    def post(self, message: Sent) -> None:
        assert len(message.payload) <= kx.MAX_PAYLOAD_CHARS
        self.queue.append(message)

    def add(self, member: Member) -> Member:
        for other in self.members.values():
            other.joined(member.id)
            member.joined(other.id)  # the `joined` snapshot lists who is already there
        self.members[member.id] = member
        member.start()
        self.flush()
        return member

    def join(self, member_id: str, slot: int, passphrase: str = PASSPHRASE) -> PyMember:
        member = PyMember(self, member_id, slot, passphrase)
        self.add(member)
        return member

    def leave(self, member_id: str) -> None:
        del self.members[member_id]
        for other in self.members.values():
            other.left(member_id)
        self.flush()

    def flush(self) -> None:
        while self.queue:
            message = self.queue.pop(0)
            if message.sender not in self.members:
                continue
            recipients = (
                [m for m in self.members if m != message.sender]
                if message.to is None
                else [message.to]
            )
            for recipient in recipients:
                target = self.members.get(recipient)
                if target is None or recipient in self.offline:
                    continue
                delivery = self.tamper(Delivery(message.sender, recipient, message.payload))
                self.log.append(delivery)
                target.deliver(delivery.sender, delivery.payload)

    def run_timers(self) -> None:
        for member in list(self.members.values()):
            member.run_timers()
        self.flush()


def _type(payload: str) -> str:
    return str(kx.decode_payload(payload)["t"])


def _assert_all_agree(members: list[Member]) -> None:
    for sender in members:
        kid, key = sender.send_key()
        for receiver in members:
            if receiver is not sender:
                assert receiver.latest_key_from(sender.id) == (kid, key), (receiver.id, sender.id)


# --- Scenarios -------------------------------------------------------------------------------


def test_three_participants_get_each_others_keys() -> None:
    relay = Relay()
    a, b, c = relay.join("a", 1), relay.join("b", 2), relay.join("c", 3)
    _assert_all_agree([a, b, c])
    for member, slot in ((a, 1), (b, 2), (c, 3)):
        assert member.rejected == []
        assert member.kx.verified_peers() == {"a", "b", "c"} - {member.id}
        assert member.send_keys == [member.send_key()]
        assert member.send_key()[0] == sf.compose_kid(slot, 0)
    assert sum(_type(d.payload) == "key" for d in relay.log) == 6
    # Nothing the relay carried contains a media key, in any encoding.
    carried = b"".join(base64.b64decode(d.payload) for d in relay.log)
    for member in (a, b, c):
        key = member.send_key()[1]
        assert key not in carried
        assert base64.b64encode(key) not in carried


def test_wrong_passphrase_gets_nothing_and_is_rejected() -> None:
    relay = Relay()
    a, b = relay.join("a", 1), relay.join("b", 2)
    m = relay.join("m", 3, "wrong passphrase")
    assert m.keys == {}
    assert a.rejected == [("m", kx.REJECT_UNVERIFIED)]
    assert b.rejected == [("m", kx.REJECT_UNVERIFIED)]
    assert {peer for peer, _ in m.rejected} == {"a", "b"}
    assert "m" not in a.kx.verified_peers()
    assert not any(d.recipient == "m" and _type(d.payload) == "key" for d in relay.log)
    _assert_all_agree([a, b])
    relay.leave("m")
    relay.run_timers()
    assert len(a.send_keys) == 1  # m never held a's key: no rotation


def test_rotation_on_leave() -> None:
    relay = Relay()
    a, b, c = relay.join("a", 1), relay.join("b", 2), relay.join("c", 3)
    c_knew = c.latest_key_from("a")
    assert c_knew is not None
    relay.leave("c")
    current = a.kx.current_send_key()
    assert current is not None
    assert current.generation == 0  # distributed first, used after the switch delay
    distributed = b.latest_key_from("a")
    assert distributed is not None
    assert distributed[0] == sf.compose_kid(1, 1)
    relay.run_timers()
    new = a.kx.current_send_key()
    assert new is not None
    assert (new.generation, new.kid) == (1, sf.compose_kid(1, 1))
    assert new.key != c_knew[1]
    assert len(c.keys["a"]) == 1  # the leaver got nothing after leaving
    _assert_all_agree([a, b])
    assert set(b.removed) == {("c", 0x30), ("a", 0x10)}
    assert set(a.removed) == {("c", 0x30), ("b", 0x20)}


def test_late_joiner_gets_current_and_pending_keys() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    relay.join("b", 2)
    relay.leave("b")
    d = relay.join("d", 4)
    assert [kid for kid, _ in d.keys["a"]] == [sf.compose_kid(1, 0), sf.compose_kid(1, 1)]
    relay.run_timers()
    _assert_all_agree([a, d])


def test_replayed_messages_are_ignored() -> None:
    relay = Relay()
    relay.join("a", 1)
    b = relay.join("b", 2)
    relay.join("c", 3)
    old_key = next(
        d for d in relay.log if (d.sender, d.recipient) == ("a", "b") and _type(d.payload) == "key"
    )
    old_hello = next(
        d
        for d in relay.log
        if (d.sender, d.recipient) == ("c", "b") and _type(d.payload) == "hello"
    )
    relay.leave("c")
    relay.run_timers()
    current = b.latest_key_from("a")
    assert current is not None
    assert current[0] == sf.compose_kid(1, 1)
    count = len(b.keys["a"])
    b.deliver(old_key.sender, old_key.payload)
    b.deliver(old_key.sender, old_key.payload)
    assert len(b.keys["a"]) == count
    assert b.latest_key_from("a") == current
    assert b.rejected == []
    # c's old hello replayed after c left does not bring c back or earn it a key.
    b.deliver(old_hello.sender, old_hello.payload)
    assert "c" not in b.kx.verified_peers()
    assert relay.queue == []


def test_relay_rewriting_from_is_detected() -> None:
    relay = Relay()
    a, b = relay.join("a", 1), relay.join("b", 2)
    # c's hello reaches a claiming to be from b: its MAC names c, so it fails.
    relay.tamper = lambda d: (
        Delivery("b", d.recipient, d.payload) if (d.sender, d.recipient) == ("c", "a") else d
    )
    c = relay.join("c", 3)
    assert a.rejected == [("b", kx.REJECT_UNVERIFIED)]
    assert "c" not in a.kx.verified_peers()
    assert "c" not in a.keys
    # Now honestly introduced, then c's next key reaches a as if from b: a opens it with its
    # pairwise key for b, and it does not authenticate.
    relay.tamper = lambda d: d
    c.kx.resync()
    relay.flush()
    assert a.latest_key_from("c") == c.send_key()
    relay.tamper = lambda d: (
        Delivery("b", d.recipient, d.payload) if (d.sender, d.recipient) == ("c", "a") else d
    )
    c.kx.rotate()
    relay.flush()
    assert a.rejected[-1] == ("b", kx.REJECT_KEY_UNAUTHENTICATED)
    assert a.latest_key_from("b") == b.send_key()
    assert len(a.keys["c"]) == 1


def _rewrite(payload: str, edit: Callable[[dict[str, Any]], None]) -> str:
    message = kx.decode_payload(payload)
    edit(message)
    return kx.encode_payload(message)


def _flip_last_bit(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _tamper_type(
    sender: str, kind: str, edit: Callable[[dict[str, Any]], None]
) -> Callable[[Delivery], Delivery]:
    def tamper(d: Delivery) -> Delivery:
        if d.sender == sender and d.recipient == "a" and _type(d.payload) == kind:
            return Delivery(d.sender, d.recipient, _rewrite(d.payload, edit))
        return d

    return tamper


def test_relay_altering_payloads_is_detected() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    relay.tamper = _tamper_type("b", "key", lambda m: m.update(ct=_flip_last_bit(m["ct"])))
    relay.join("b", 2)
    assert a.rejected == [("b", kx.REJECT_KEY_UNAUTHENTICATED)]
    assert "b" not in a.keys
    # Relabelling an old key as a newer generation breaks authentication too.
    relay.tamper = _tamper_type("c", "key", lambda m: m.update(gen=16))
    relay.join("c", 3)
    assert a.rejected[-1] == ("c", kx.REJECT_KEY_UNAUTHENTICATED)
    relay.tamper = _tamper_type("e", "hello", lambda m: m.update(ts=m["ts"] + 1))
    relay.join("e", 5)
    assert a.rejected[-1] == ("e", kx.REJECT_UNVERIFIED)
    assert "e" not in a.keys


def test_malformed_payloads_are_reported() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    for payload in (
        "not base64!",
        base64.b64encode(b"[1,2]").decode(),
        kx.encode_payload({"v": 2, "t": "hello"}),
        kx.encode_payload({"v": 1, "t": "bye"}),
        kx.encode_payload({"v": 1, "t": "hello", "pub": "AAAA", "ts": 1, "reply": False}),
        kx.encode_payload({"v": 1, "t": "hello", "pub": "AAAA", "ts": True, "reply": False}),
        "A" * (kx.MAX_PAYLOAD_CHARS + 4),
    ):
        a.deliver("x", payload)
    assert [reason for _, reason in a.rejected] == [
        "malformed",
        "malformed",
        "unsupported-version",
        "malformed",
        "malformed",
        "malformed",
        "malformed",
    ]
    a.deliver("a", "ignored: from ourselves")
    assert len(a.rejected) == 7


def test_hello_with_an_invalid_point_is_malformed() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    room_keys = kx.derive_room_keys(kx.derive_room_secret(ROOM, PASSPHRASE, FAST), ROOM)
    bad_point = b"\x04" + b"\x01" * 64
    mac = kx.hello_mac(room_keys.mac_key, ROOM, "x", bad_point, 5, False)
    a.deliver(
        "x",
        kx.encode_payload(
            {
                "v": 1,
                "t": "hello",
                "pub": base64.b64encode(bad_point).decode(),
                "ts": 5,
                "reply": False,
                "mac": base64.b64encode(mac).decode(),
            }
        ),
    )
    assert a.rejected == [("x", kx.REJECT_MALFORMED)]


def test_messages_before_start_are_kept() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    late = PyMember(relay, "b", 2)
    relay.members["b"] = late
    a.kx.resync()
    relay.flush()  # a's hello reaches b before b has started
    assert late.keys == {}
    late.start()
    assert late.kx.verified_peers() == {"a"}  # handled inside start(), before any flush
    relay.flush()
    _assert_all_agree([a, late])


def test_resync_recovers_keys_missed_while_offline() -> None:
    relay = Relay()
    a, b = relay.join("a", 1), relay.join("b", 2)
    relay.join("c", 3)
    relay.offline.add("a")
    relay.leave("c")  # b rotates; its new key to a is lost
    relay.run_timers()
    assert b.send_key()[0] == sf.compose_kid(2, 1)
    assert a.latest_key_from("b") != b.send_key()
    relay.offline.clear()
    a.kx.resync()
    relay.flush()
    _assert_all_agree([a, b])
    assert a.rejected == b.rejected == []
    # The resync hello replayed later changes nothing (same ts: a duplicate).
    hello = next(d for d in reversed(relay.log) if d.sender == "a" and _type(d.payload) == "hello")
    sent = len(relay.log)
    b.deliver(hello.sender, hello.payload)
    relay.flush()
    assert len(relay.log) == sent


def test_unverified_peers_and_answers_to_bad_hellos() -> None:
    relay = Relay()
    a, b = relay.join("a", 1), relay.join("b", 2)
    m = relay.join("m", 3, "wrong passphrase")
    assert a.kx.unverified_peers() == {"m"}
    assert m.kx.unverified_peers() == {"a", "b"}
    assert b.kx.unverified_peers() == {"m"}
    # m's hello, replayed (or m spamming): a answers once only.
    m_hello = next(d for d in relay.log if d.sender == "m" and d.recipient == "a")
    for _ in range(5):
        a.deliver(m_hello.sender, m_hello.payload)
    relay.flush()
    answers = [d for d in relay.log if (d.sender, d.recipient) == ("a", "m")]
    assert len(answers) == 1
    assert all(_type(d.payload) == "hello" for d in answers)
    relay.leave("m")
    assert a.kx.unverified_peers() == frozenset()


def test_peer_restarting_under_the_same_id_is_rekeyed() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    relay.join("b", 2)
    relay.now_ms += 5000
    del relay.members["b"]
    b2 = relay.join("b", 2)
    _assert_all_agree([a, b2])
    assert a.rejected == []


def test_kid_conflict_is_refused() -> None:
    relay = Relay()
    a = relay.join("a", 1)
    relay.join("b", 2)
    relay.join("z", 2)  # the control plane (or a lying SFU) gave z b's slot
    assert a.rejected == [("z", kx.REJECT_KID_CONFLICT)]
    assert a.latest_key_from("z") is None


def test_default_scheduler_outside_asyncio_acts_at_once() -> None:
    removed: list[tuple[str, int]] = []
    sent: list[tuple[str | None, str]] = []
    alone = kx.KeyExchange(
        ROOM,
        "a",
        PASSPHRASE,
        lambda to, payload: sent.append((to, payload)),
        lambda *_: None,
        lambda *_: None,
        slot=1,
        iterations=FAST,
        on_key_removed=lambda s, k: removed.append((s, k)),
    )
    alone.start()
    alone.rotate()
    current = alone.current_send_key()
    assert current is not None
    assert current.generation == 1
    assert [to for to, _ in sent] == [None]


def test_constructor_checks() -> None:
    def noop(*_: object) -> None:
        return None

    with pytest.raises(ValueError, match="passphrase"):
        kx.KeyExchange(ROOM, "a", "", noop, noop, noop, slot=1)
    with pytest.raises(ValueError, match="participant_id"):
        kx.KeyExchange(ROOM, "", "x", noop, noop, noop, slot=1)
    with pytest.raises(ValueError, match="must not be negative"):
        kx.KeyExchange(ROOM, "a", "x", noop, noop, noop, slot=-1)


# --- Interop with the browser implementation (Node) ------------------------------------------


class NodeMember:
    """A browser participant run by tests/js/kx_driver.mjs in a Node subprocess."""

    def __init__(self, relay: Relay, member_id: str, slot: int, passphrase: str = PASSPHRASE):
        assert NODE is not None
        self.relay = relay
        self.id = member_id
        self.keys: dict[str, list[tuple[int, bytes]]] = {}
        self.rejected: list[tuple[str, str]] = []
        self.send_keys: list[tuple[int, bytes]] = []
        self.proc = subprocess.Popen(
            [NODE, str(ROOT / "tests" / "js" / "kx_driver.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        self.command(
            op="init", room=ROOM, id=member_id, passphrase=passphrase, slot=slot, iterations=FAST
        )

    def _read_lines(self) -> None:
        # A thread, because select() cannot see lines already in the pipe's read buffer.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def command(self, **cmd: Any) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        events: list[dict[str, Any]] = []
        while True:
            try:
                line = self.lines.get(timeout=10)
            except queue.Empty:
                raise AssertionError(f"node driver did not answer {cmd['op']}") from None
            assert line, "node driver exited"
            event = json.loads(line)
            if event["ev"] == "done":
                return events
            assert event["ev"] != "error", event["message"]
            events.append(event)
            self._apply(event)

    def _apply(self, event: dict[str, Any]) -> None:
        if event["ev"] == "send":
            self.relay.post(Sent(self.id, event["to"], event["payload"]))
        elif event["ev"] == "key":
            self.keys.setdefault(event["sender"], []).append(
                (int(event["kid"], 16), bytes.fromhex(event["key"]))
            )
        elif event["ev"] == "sendKey":
            self.send_keys.append((int(event["kid"], 16), bytes.fromhex(event["key"])))
        elif event["ev"] == "rejected":
            self.rejected.append((event["peer"], event["reason"]))

    def frames(self, op: str, frames: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        (result,) = self.command(
            op=op, frames=[{"kind": kind, "hex": data.hex()} for kind, data in frames]
        )
        return list(result["results"])

    def start(self) -> None:
        self.command(op="start")

    def deliver(self, sender: str, payload: str) -> None:
        self.command(op="relay", payload=payload, **{"from": sender})

    def joined(self, peer_id: str) -> None:
        self.command(op="joined", id=peer_id)

    def left(self, peer_id: str) -> None:
        self.command(op="left", id=peer_id)

    def run_timers(self) -> None:
        self.command(op="timers")

    def latest_key_from(self, sender: str) -> tuple[int, bytes] | None:
        got = self.keys.get(sender)
        return got[-1] if got else None

    def send_key(self) -> tuple[int, bytes]:
        return self.send_keys[-1]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=5)


@pytest.fixture
def node_members() -> Iterator[list[NodeMember]]:
    if NODE is None:
        pytest.skip("node is not installed")
    made: list[NodeMember] = []
    yield made
    for member in made:
        member.close()


VP8_KEYFRAME = bytes.fromhex("5003009d012a8002e001") + b"keyframe payload"
VP8_DELTA = bytes.fromhex("b10100") + b"delta payload"
OPUS_FRAME = bytes.fromhex("fc") + b"opus"
FRAMES = [("video", VP8_KEYFRAME), ("video", VP8_DELTA), ("audio", OPUS_FRAME), ("audio", b"")]


def _protect(sender: sf.Sender, kind: str, frame: bytes) -> bytes:
    return sender.protect(
        frame, sf.clear_prefix_len_for("VP8" if kind == "video" else "opus", frame)
    )


def _unprotect(receiver: sf.Receiver, kind: str, data: bytes) -> bytes:
    codec = "VP8" if kind == "video" else "opus"
    return receiver.unprotect(data, sf.clear_prefix_len_for(codec, data))


def test_interop_python_and_browser_agree_and_exchange_frames(
    node_members: list[NodeMember],
) -> None:
    relay = Relay()
    py = relay.join("py", 1)
    js = NodeMember(relay, "js", 2)
    node_members.append(js)
    relay.add(js)
    py2 = relay.join("py2", 3)
    _assert_all_agree([py, js, py2])
    assert [py.rejected, js.rejected, py2.rejected] == [[], [], []]

    # Frames the browser code protects open in Python, and the other way round.
    js_kid, _ = js.send_key()
    py_receiver = sf.Receiver()
    py_receiver.add_key(*py.keys["js"][-1])
    results = js.frames("protect", FRAMES)
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "empty"]
    for (kind, frame), result in zip(FRAMES, results, strict=True):
        data = bytes.fromhex(result["hex"])
        if frame:
            prefix_len = sf.vp8_clear_prefix_len(data) if kind == "video" else 0
            assert sf.parse_envelope(data, prefix_len)[0].kid == js_kid
        assert _unprotect(py_receiver, kind, data) == frame

    py_kid, py_key = py.send_key()
    py_sender = sf.Sender(py_kid, py_key)
    protected = [(kind, _protect(py_sender, kind, frame)) for kind, frame in FRAMES]
    opened = js.frames("unprotect", protected)
    assert [bytes.fromhex(r["hex"]) for r in opened] == [frame for _, frame in FRAMES]
    # A frame altered in transit is dropped by the browser code, never returned.
    kind, data = protected[1]
    altered = data[:-1] + bytes([data[-1] ^ 1])
    assert js.frames("unprotect", [(kind, altered)]) == [{"status": "auth-failed"}]


def test_interop_rotation_wrong_passphrase_and_tampering(node_members: list[NodeMember]) -> None:
    relay = Relay()
    py = relay.join("py", 1)
    js = NodeMember(relay, "js", 2)
    node_members.append(js)
    relay.add(js)
    leaver = relay.join("leaver", 3)
    js_old = leaver.latest_key_from("js")
    assert js_old is not None

    # A browser participant with the wrong passphrase: rejected by both, gets nothing.
    intruder = NodeMember(relay, "intruder", 4, "not the passphrase")
    node_members.append(intruder)
    relay.add(intruder)
    assert intruder.keys == {}
    assert ("intruder", kx.REJECT_UNVERIFIED) in py.rejected
    assert ("intruder", kx.REJECT_UNVERIFIED) in js.rejected

    # Rotation in both implementations when someone leaves.
    relay.leave("leaver")
    relay.leave("intruder")
    relay.run_timers()
    js_new = js.send_key()
    py_new = py.send_key()
    assert js_new[0] == sf.compose_kid(2, 1)
    assert py_new[0] == sf.compose_kid(1, 1)
    assert js_new[1] != js_old[1]
    _assert_all_agree([py, js])

    # Old key message replayed to the browser: ignored. Altered: reported.
    old = next(
        d
        for d in relay.log
        if (d.sender, d.recipient) == ("py", "js")
        and _type(d.payload) == "key"
        and kx.decode_payload(d.payload)["gen"] == 0
    )
    before = len(js.keys["py"])
    js.deliver(old.sender, old.payload)
    assert len(js.keys["py"]) == before
    js.deliver(old.sender, _rewrite(old.payload, lambda m: m.update(gen=2)))
    assert js.rejected[-1] == ("py", kx.REJECT_KEY_UNAUTHENTICATED)


def test_node_suite_is_present() -> None:
    # The JS side of these tests lives in tests/js/ and runs with `node --test tests/js/`.
    assert (ROOT / "tests" / "js" / "keyexchange.test.mjs").is_file()
    assert os.access(ROOT / "tests" / "js" / "kx_driver.mjs", os.R_OK)


# --- A real browser (opt-in: pytest -m slow) -------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless=new", *SHARED_FLAGS, "--enable-logging=stderr", "--v=0"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


def _run_smoke_page(user_data_dir: Path) -> dict[str, Any]:
    """Serve the repository on loopback, open tests/js/browser/smoke.html, return its result."""
    handler = functools.partial(_QuietHandler, directory=str(ROOT))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tests/js/browser/smoke.html"
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "SMOKE " in line:
                lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    result: dict[str, Any] | None = None
    try:
        while True:
            line = lines.get(timeout=45)
            assert line, "chromium exited before the page finished"
            if '"SMOKE END"' in line:
                break
            # Chromium logs: ... "SMOKE {json}", source: URL (line)
            text = line.split('"SMOKE ', 1)[1].rsplit('", source:', 1)[0]
            result = json.loads(text)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.shutdown()
    assert result is not None
    return result


@pytest.mark.slow
def test_browser_worker_and_key_exchange(tmp_path: Path) -> None:
    """Chromium runs keyexchange.js and worker.js on real encoded frames (about 8 s)."""
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is missing: scripts/test.sh installs it")
        pytest.skip("chromium is not installed")
    result = _run_smoke_page(tmp_path)
    assert "error" not in result, result.get("error")
    assert result["kx"]["agree"]
    assert result["kx"]["rejected"] == []
    legs = {leg["name"]: leg for leg in result["legs"]}
    for name in ("script", "streams"):
        leg = legs[name]
        assert leg["errors"] == []
        video = next(s for s in leg["inbound"] if s["kind"] == "video")
        assert video["codec"] == "video/VP8"
        assert video["framesDecoded"] > 10
        for stream in leg["recv"]:
            assert stream["ok"] > 10
            assert stream["authFailed"] == stream["unknownKid"] == 0
        # The fake camera averages about RGB (8, 150, 2); decrypting garbage would not.
        red, green, blue = leg["meanRgb"]
        assert (red < 30, 120 < green < 180, blue < 30) == (True, True, True), leg["meanRgb"]
    wrong = legs["wrong-key"]
    video = next(s for s in wrong["inbound"] if s["kind"] == "video")
    assert video["framesDecoded"] == 0
    for stream in wrong["recv"]:
        assert stream["ok"] == 0
        assert stream["authFailed"] > 10
