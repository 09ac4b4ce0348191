"""Room-protocol messages (sfu/control/rooms/messages.py): decode() and every message parser
raise ProtocolError and nothing else; `join` is never refused by parsing."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfu.control.rooms import messages
from sfu.control.rooms.errors import ProtocolError
from tests.fuzz.strategies import FUZZ, inputs, run_target

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(inputs("messages"))
def test_decoder_and_parsers_raise_only_protocol_error(data: bytes) -> None:
    run_target("messages", data)


@FUZZ
@given(
    st.sampled_from(["join", "publish_offer", "subscribe", "mute", "relay", "ping", "leave"]),
    st.dictionaries(
        st.sampled_from(["sdp", "tracks", "muted", "to", "payload", "ts"]), json_values
    ),
)
def test_any_field_values(kind: str, fields: dict[str, object]) -> None:
    text = json.dumps({**fields, "type": kind})
    run_target("messages", text.encode("utf-8", "surrogatepass"))


def parse_relay(text: str) -> messages.Relay:
    _, fields = messages.decode(text)
    return messages.Relay.parse(fields)


@pytest.mark.parametrize("depth", [10, sys.getrecursionlimit() // 2, 10 * sys.getrecursionlimit()])
def test_nesting_is_a_protocol_error_at_any_depth(depth: int) -> None:
    # Beyond the stack json.loads refuses it; below, the relay target is not a participant id.
    text = '{"type": "relay", "payload": "AAAA", "to": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(ProtocolError) as refused:
        parse_relay(text)
    assert refused.value.code == "invalid_message"
