"""ICE as the engine uses it: consent freshness closing transports, address changes, and
ICE restarts (new credentials on both sides for the same transport)."""

from __future__ import annotations

from sfu.media.rtcp import Bye
from sfu.media.transport import Transport, TransportState
from tests.engine.harness import Client, EngineHarness, vp8_packet

CONSENT = 5.0


def state(client: Client) -> TransportState:
    return client.transport.state


def closed_reasons(harness: EngineHarness) -> list[str]:
    reasons: list[str] = []

    def on_closed(transport: Transport) -> None:
        reasons.append(transport.close_reason or "")

    for transport in harness.engine.transports.values():
        transport.on_closed = on_closed
    return reasons


def test_consent_lapses_for_a_silent_client_and_its_transport_is_closed_and_forgotten() -> None:
    harness = EngineHarness(consent_timeout=CONSENT)
    publisher, producer = harness.publisher()
    subscriber, downtrack = harness.subscriber(producer)
    never_connected = harness.client("whep", connect=False)
    reasons = closed_reasons(harness)
    publisher.send_rtp(vp8_packet(0, 0, keyframe=True))

    # The subscriber keeps checking (as browsers do, every few seconds); the others are silent.
    harness.advance(CONSENT - 1.0)
    assert subscriber.check()
    harness.advance(0.9)
    assert reasons == []
    harness.advance(0.2)
    assert state(publisher) is TransportState.CLOSED
    assert state(never_connected) is TransportState.CLOSED
    assert reasons == [f"ICE consent expired (no valid check for {CONSENT:g} s)"] * 2
    assert state(subscriber) is TransportState.CONNECTED
    assert harness.engine.agent.consent_expiries == 2
    # The subscriber heard the end of the publisher's stream.
    assert subscriber.receive().rtcp_of(Bye) == [Bye((downtrack.ssrc,), b"")]

    # Forgotten: nothing from the old address or with the old credentials gets anywhere.
    assert publisher.transport.id not in harness.engine.transports
    assert not publisher.check()
    publisher.send_rtp(vp8_packet(1, 3000, keyframe=True))
    assert harness.engine.demux.dropped_unknown_address == 1
    assert subscriber.receive().rtp == []

    harness.advance(CONSENT)  # without further checks, the subscriber's lapses too
    assert state(subscriber) is TransportState.CLOSED


def test_media_follows_the_address_the_client_nominates(harness: EngineHarness) -> None:
    publisher, producer = harness.publisher()
    subscriber, _ = harness.subscriber(producer)
    publisher.send_rtp(vp8_packet(0, 0, keyframe=True))
    assert len(subscriber.receive().rtp) == 1

    old = subscriber.addr
    sent_to_old = len(harness.socket.to(old))
    assert subscriber.move_to(("198.51.100.200", 41000))  # e.g. Wi-Fi to mobile
    publisher.send_rtp(vp8_packet(1, 3000))
    assert len(subscriber.receive().rtp) == 1
    assert len(harness.socket.to(old)) == sent_to_old
    # The publisher moves too: its media from the new address is accepted.
    assert publisher.move_to(("198.51.100.201", 41001))
    publisher.send_rtp(vp8_packet(2, 6000))
    assert len(subscriber.receive().rtp) == 1


def test_ice_restart_swaps_the_credentials_and_keeps_media_flowing() -> None:
    harness = EngineHarness(consent_timeout=CONSENT)
    publisher, producer = harness.publisher()
    subscriber, _ = harness.subscriber(producer)
    publisher.send_rtp(vp8_packet(0, 0, keyframe=True))
    assert len(subscriber.receive().rtp) == 1
    old_ufrag, old_pwd = publisher.transport.ice.local_ufrag, publisher.transport.ice.local_pwd
    old_client_ufrag = publisher.ufrag

    publisher.restart_ice()
    ice = publisher.transport.ice
    assert (ice.local_ufrag, ice.local_pwd) != (old_ufrag, old_pwd)
    # Media keeps coming from the address the old session authenticated, before any new check.
    publisher.send_rtp(vp8_packet(1, 3000))
    assert len(subscriber.receive().rtp) == 1
    # Old server credentials, or the old client ufrag with the new ones: refused.
    assert not publisher.check(server_ufrag=old_ufrag, server_pwd=old_pwd)
    assert not publisher.check(client_ufrag=old_client_ufrag)
    # The new credentials work, from a new address too.
    assert publisher.move_to(("198.51.100.210", 42000))
    publisher.send_rtp(vp8_packet(2, 6000))
    assert len(subscriber.receive().rtp) == 1
    assert harness.engine.transports[publisher.transport.id] is publisher.transport

    # Consent is judged by the new credentials only: checks with the old ones do not count.
    harness.advance(CONSENT - 1.0)
    assert publisher.check()
    assert not publisher.check(server_ufrag=old_ufrag, server_pwd=old_pwd)
    harness.advance(CONSENT - 0.5)
    assert state(publisher) is TransportState.CONNECTED
    for _ in range(3):
        harness.advance(1.0)
        assert not publisher.check(server_ufrag=old_ufrag, server_pwd=old_pwd)
    assert state(publisher) is TransportState.CLOSED


def test_a_check_with_the_wrong_password_teaches_the_engine_nothing(
    harness: EngineHarness,
) -> None:
    client: Client = harness.client("whep", connect=False)
    assert not client.check(server_pwd="not-the-password-at-all!")
    assert client.datagrams() == []  # no answer at all, not even an error
    assert client.transport.addr is None
    assert harness.engine.agent.requests_unauthenticated == 1
    assert client.check()
    assert client.transport.addr == client.addr
