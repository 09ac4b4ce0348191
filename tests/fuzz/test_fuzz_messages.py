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


@pytest.mark.parametrize("depth", [10, sys.getrecursionlimit() // 2, 10 * sys.getrecursionlimit()])
def test_nesting_beyond_the_stack_is_a_protocol_error_or_parses(depth: int) -> None:
    text = '{"type": "relay", "payload": "AAAA", "to": ' + "[" * depth + "]" * depth + "}"
    if depth > sys.getrecursionlimit():
        with pytest.raises(ProtocolError) as refused:
            messages.decode(text)
        assert refused.value.code == "invalid_message"
        return
    kind, fields = messages.decode(text)
    assert kind == "relay"
    # Walking the decoded value again (Relay.parse makes text of `to`) must not overflow.
    relay = messages.Relay.parse(fields)
    assert relay.payload == "AAAA"
    assert isinstance(relay.to, str)
    assert relay.to.startswith("[" * 10)
