"""ICE-lite agent: authentication, address learning, nomination, role conflicts, consent."""

from __future__ import annotations

import asyncio
import os
import random
import struct
from typing import cast

import aioice
import aioice.ice
import pytest
from aioice import stun as aioice_stun

from sfu.media import ice, stun
from sfu.media.ice import IceLiteAgent, IceLiteSession, IceState

CLIENT_UFRAG = "cli1"
CLIENT_ADDR = ("198.51.100.20", 50000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _check(
    session: IceLiteSession,
    *,
    pwd: str | None = None,
    username: str | None = None,
    controlling: int | None = 1,
    controlled: int | None = None,
    use_candidate: bool = False,
    tid: bytes | None = None,
) -> bytes:
    """A connectivity check as aioice (a full, controlling agent) would send it."""
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=tid,
    )
    request.attributes["USERNAME"] = username or f"{session.local_ufrag}:{CLIENT_UFRAG}"
    request.attributes["PRIORITY"] = 1853824767
    if controlling is not None:
        request.attributes["ICE-CONTROLLING"] = controlling
    if controlled is not None:
        request.attributes["ICE-CONTROLLED"] = controlled
    if use_candidate:
        request.attributes["USE-CANDIDATE"] = None
    request.add_message_integrity((pwd or session.local_pwd).encode())
    return bytes(request)


def _response(data: bytes | None, session: IceLiteSession) -> aioice_stun.Message:
    assert data is not None
    msg = aioice_stun.parse_message(data)
    assert msg.check_message_integrity(session.local_pwd.encode())
    return msg


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def agent(clock: FakeClock) -> IceLiteAgent:
    return IceLiteAgent(clock=clock)


# --- credentials ---------------------------------------------------------------------------


def test_generated_credentials(agent: IceLiteAgent) -> None:
    sessions = [agent.create_session() for _ in range(200)]
    assert len({s.local_ufrag for s in sessions}) == 200
    for s in sessions:
        assert len(s.local_ufrag) >= 4
        assert len(s.local_pwd) >= 22
        assert set(s.local_ufrag + s.local_pwd) <= set(ice.ICE_CHARS)
        assert agent.get(s.local_ufrag) is s
        assert s.state is IceState.NEW
    assert len(agent) == 200
    # Secrets never reach a log line through repr().
    assert sessions[0].local_pwd not in repr(sessions[0])


# --- the happy path ------------------------------------------------------------------------


def test_valid_check_answered_and_address_learned(agent: IceLiteAgent, clock: FakeClock) -> None:
    session = agent.create_session(remote_ufrag=CLIENT_UFRAG, remote_pwd="x" * 22)
    tid = os.urandom(12)
    out = agent.handle_stun(_check(session, tid=tid), CLIENT_ADDR)
    response = _response(out, session)
    assert response.message_class == aioice_stun.Class.RESPONSE
    assert response.transaction_id == tid
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT_ADDR
    assert "FINGERPRINT" in response.attributes
    assert session.addresses == {CLIENT_ADDR}
    assert session.selected is None
    assert session.state is IceState.CHECKING
    assert session.last_check == clock.now
    assert agent.requests_ok == 1


def test_remote_ufrag_unknown_until_sdp_then_enforced(agent: IceLiteAgent) -> None:
    session = agent.create_session()
    assert agent.handle_stun(_check(session), CLIENT_ADDR) is not None
    session.set_remote_credentials("other", "y" * 22)
    assert agent.handle_stun(_check(session), CLIENT_ADDR) is None
    assert agent.requests_unknown_ufrag == 1
    assert agent.handle_stun(_check(session, username=f"{session.local_ufrag}:other"), CLIENT_ADDR)


def test_use_candidate_nominates_latest_wins(agent: IceLiteAgent) -> None:
    session = agent.create_session(remote_ufrag=CLIENT_UFRAG)
    a, b = ("192.0.2.1", 1000), ("2001:db8::5", 2000)
    assert agent.handle_stun(_check(session, use_candidate=True), a) is not None
    assert session.selected == a
    assert session.state is IceState.CONNECTED
    # A plain check from another address validates it but does not move the selection.
    assert agent.handle_stun(_check(session), b) is not None
    assert session.selected == a
    assert agent.handle_stun(_check(session, use_candidate=True), b) is not None
    assert session.selected == b
    assert session.addresses == {a, b}
    assert session.state is IceState.CONNECTED


def test_ipv6_four_tuple_address_stored_as_given(agent: IceLiteAgent) -> None:
    session = agent.create_session()
    # What an AF_INET6 socket hands datagram_received: (host, port, flowinfo, scope_id).
    addr = cast(ice.Address, ("2001:db8::7", 3478, 0, 0))
    out = agent.handle_stun(_check(session, use_candidate=True), addr)
    assert _response(out, session).attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 3478)
    assert session.selected == addr


# --- what must be dropped --------------------------------------------------------------------


def test_integrity_failure_dropped_and_nothing_learned(agent: IceLiteAgent) -> None:
    session = agent.create_session(remote_ufrag=CLIENT_UFRAG)
    assert agent.handle_stun(_check(session, pwd="wrong-password-wrong-pwd"), CLIENT_ADDR) is None
    assert agent.requests_unauthenticated == 1
    assert session.addresses == set()
    assert session.last_check is None
    assert session.state is IceState.NEW


def test_missing_integrity_dropped(agent: IceLiteAgent) -> None:
    session = agent.create_session()
    data = stun.encode(
        stun.BINDING_REQUEST,
        os.urandom(12),
        [
            (stun.ATTR_USERNAME, f"{session.local_ufrag}:{CLIENT_UFRAG}".encode()),
            (stun.ATTR_ICE_CONTROLLING, struct.pack("!Q", 1)),
            (stun.ATTR_USE_CANDIDATE, b""),
        ],
    )
    assert agent.handle_stun(data, CLIENT_ADDR) is None
    assert agent.requests_unauthenticated == 1
    assert session.selected is None


@pytest.mark.parametrize("username", ["nosuchufrag:cli1", "no-colon-at-all"])
def test_wrong_or_bad_username_dropped(agent: IceLiteAgent, username: str) -> None:
    session = agent.create_session()
    assert agent.handle_stun(_check(session, username=username), CLIENT_ADDR) is None
    assert agent.requests_unknown_ufrag + agent.requests_unauthenticated == 1
    assert session.addresses == set()


def test_address_learned_only_after_auth(agent: IceLiteAgent) -> None:
    session = agent.create_session()
    forged = _check(session, pwd="attacker-guess-000000000", use_candidate=True)
    assert agent.handle_stun(forged, CLIENT_ADDR) is None
    assert CLIENT_ADDR not in session.addresses
    assert session.selected is None
    assert agent.handle_stun(_check(session), CLIENT_ADDR) is not None
    assert CLIENT_ADDR in session.addresses


def test_bad_fingerprint_dropped(agent: IceLiteAgent) -> None:
    session = agent.create_session()
    data = bytearray(_check(session))
    data[-1] ^= 0xFF
    assert agent.handle_stun(bytes(data), CLIENT_ADDR) is None
    assert agent.malformed == 1
    assert session.addresses == set()


def test_garbage_and_non_requests_dropped(agent: IceLiteAgent) -> None:
    session = agent.create_session()
    assert agent.handle_stun(b"\x00\x01garbage", CLIENT_ADDR) is None
    assert agent.malformed == 1
    indication = stun.encode(stun.BINDING_INDICATION, os.urandom(12))
    assert agent.handle_stun(indication, CLIENT_ADDR) is None
    stray = stun.build_binding_success(os.urandom(12), CLIENT_ADDR, session.key)
    assert agent.handle_stun(stray, CLIENT_ADDR) is None
    assert agent.ignored == 2
    assert agent.requests_ok == 0


def test_address_cap(clock: FakeClock) -> None:
    agent = IceLiteAgent(max_addresses=2, clock=clock)
    session = agent.create_session()
    a, b, c = ("192.0.2.1", 1), ("192.0.2.2", 2), ("192.0.2.3", 3)
    assert agent.handle_stun(_check(session), a) is not None
    assert agent.handle_stun(_check(session), b) is not None
    assert agent.handle_stun(_check(session, use_candidate=True), c) is None
    assert agent.address_cap_rejections == 1
    assert session.addresses == {a, b}
    assert session.state is not IceState.CONNECTED
    # Known addresses keep working when the set is full.
    assert agent.handle_stun(_check(session, use_candidate=True), b) is not None
    assert session.selected == b
    assert agent.address_cap_rejections == 1


# --- role conflicts and bad checks -----------------------------------------------------------


@pytest.mark.parametrize("tiebreaker", [0, 1, 2**64 - 1])
def test_peer_claiming_controlled_gets_signed_487(agent: IceLiteAgent, tiebreaker: int) -> None:
    session = agent.create_session()
    out = agent.handle_stun(
        _check(session, controlling=None, controlled=tiebreaker, use_candidate=True), CLIENT_ADDR
    )
    response = _response(out, session)
    assert response.message_class == aioice_stun.Class.ERROR
    assert response.error_code == 487
    assert agent.role_conflicts == 1
    assert session.addresses == set()
    assert session.selected is None


@pytest.mark.parametrize(("controlling", "controlled"), [(None, None), (5, 6)])
def test_check_without_exactly_one_role_gets_400(
    agent: IceLiteAgent, controlling: int | None, controlled: int | None
) -> None:
    session = agent.create_session()
    out = agent.handle_stun(
        _check(session, controlling=controlling, controlled=controlled), CLIENT_ADDR
    )
    assert _response(out, session).error_code == 400
    assert agent.bad_requests == 1
    assert session.addresses == set()


# --- consent freshness ---------------------------------------------------------------------


def test_consent_expiry_with_injected_clock(agent: IceLiteAgent, clock: FakeClock) -> None:
    start = clock.now
    fresh = agent.create_session()
    idle = agent.create_session()
    clock.now = start + 10
    assert agent.handle_stun(_check(fresh, use_candidate=True), CLIENT_ADDR) is not None

    assert agent.expire(start + 29.9) == []
    # Never checked: consent runs from creation.
    assert agent.expire(start + 30) == [idle]
    assert idle.state is IceState.CLOSED
    assert agent.expire(start + 39.9) == []
    # Checked at +10: consent runs from the last valid check.
    clock.now = start + 40
    assert agent.expire() == [fresh]
    assert fresh.state is IceState.CLOSED
    assert agent.consent_expiries == 2

    # Closed sessions stay registered until removed, answer nothing, and do not expire twice.
    assert agent.get(fresh.local_ufrag) is fresh
    assert agent.handle_stun(_check(fresh), CLIENT_ADDR) is None
    assert agent.expire(start + 1000) == []
    assert agent.consent_expiries == 2
    assert agent.remove(fresh.local_ufrag) is fresh
    assert agent.remove(fresh.local_ufrag) is None
    assert agent.get(fresh.local_ufrag) is None
    assert len(agent) == 1


def test_every_check_refreshes_consent(agent: IceLiteAgent, clock: FakeClock) -> None:
    session = agent.create_session()
    for _ in range(5):
        clock.now += 20
        assert agent.handle_stun(_check(session), CLIENT_ADDR) is not None
        assert agent.expire() == []
    assert session.consent_deadline == clock.now + 30


# --- fuzz through the agent ------------------------------------------------------------------


def test_agent_never_raises_on_mutated_checks(agent: IceLiteAgent) -> None:
    rng = random.Random(8445)
    session = agent.create_session()
    good = _check(session, use_candidate=True)
    unchanged = 0
    authentic = 0
    rounds = 3000
    for _ in range(rounds):
        data = bytearray(good[: rng.randrange(len(good) + 1)] if rng.random() < 0.3 else good)
        for _ in range(rng.randrange(1, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        unchanged += data == good
        # A mutation confined to the trailing FINGERPRINT can still leave a valid check, e.g.
        # when its type changes and it becomes an ignored attribute after MESSAGE-INTEGRITY.
        authentic += len(data) == len(good) and data[:-8] == good[:-8]
        agent.handle_stun(bytes(data), CLIENT_ADDR)
    # Every datagram lands in exactly one counter; only checks whose signed part is intact
    # get through.
    counted = (
        agent.requests_ok
        + agent.requests_unauthenticated
        + agent.requests_unknown_ufrag
        + agent.malformed
        + agent.ignored
        + agent.bad_requests
        + agent.role_conflicts
    )
    assert counted == rounds
    assert unchanged <= agent.requests_ok <= authentic


# --- a real aioice agent over real UDP -------------------------------------------------------


class _LiteServer(asyncio.DatagramProtocol):
    def __init__(self, agent: IceLiteAgent) -> None:
        self.agent = agent
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport does not subclass DatagramTransport on every Python.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        response = self.agent.handle_stun(data, addr)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)


async def _aioice_connect(*, controlling: bool, remote_is_lite: bool) -> None:
    agent = IceLiteAgent()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _LiteServer(agent), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    conn = aioice.Connection(ice_controlling=controlling, use_ipv6=False)
    conn.remote_is_lite = remote_is_lite
    try:
        session = agent.create_session(conn.local_username, conn.local_password)
        conn.remote_username = session.local_ufrag
        conn.remote_password = session.local_pwd
        await conn.gather_candidates()
        (local,) = conn.local_candidates
        await conn.add_remote_candidate(
            aioice.Candidate(
                foundation="server",
                component=1,
                transport="udp",
                priority=2130706431,
                host="127.0.0.1",
                port=port,
                type="host",
            )
        )
        await conn.add_remote_candidate(None)
        await asyncio.wait_for(conn.connect(), timeout=5)

        assert session.state is IceState.CONNECTED
        assert session.selected == (local.host, local.port)
        assert agent.requests_ok >= 1
        assert agent.requests_unauthenticated == 0
        assert agent.role_conflicts == (0 if controlling else 1)
    finally:
        await conn.close()
        transport.close()


@pytest.mark.parametrize(
    ("controlling", "remote_is_lite"),
    [
        # aioice nominates on its first check (USE-CANDIDATE straight away).
        (True, False),
        # aioice checks first, then nominates with a second request (regular nomination).
        (True, True),
        # aioice starts controlled, gets our 487, switches to controlling and retries.
        (False, False),
    ],
)
def test_real_aioice_connection_completes(
    monkeypatch: pytest.MonkeyPatch, controlling: bool, remote_is_lite: bool
) -> None:
    # aioice leaves loopback out of its host candidates.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    asyncio.run(_aioice_connect(controlling=controlling, remote_is_lite=remote_is_lite))
