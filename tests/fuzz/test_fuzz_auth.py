"""Access tokens (sfu/control/auth.py): verify_token raises AuthError and nothing else, for any
string and for tokens signed with the right key whose claims hold any JSON values."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sfu.control.auth import AuthError, verify_token
from tests.fuzz.generators import JWT_SIGN, JWT_TEXT
from tests.fuzz.strategies import FUZZ, inputs, run_target
from tests.fuzz.targets import CONFIG, NOW, sign

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec="utf-8"), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
CLAIMS = ("exp", "nbf", "iat", "sub", "room", "grants", "name", "iss", "aud", "jti")
GOOD = {
    "exp": NOW + 3600,
    "iat": NOW - 10,
    "sub": "alice",
    "room": "room1",
    "grants": {"publish": True},
}
HEADER = b'{"alg":"HS256","typ":"JWT","kid":"devkey"}'


@FUZZ
@given(inputs("jwt"))
# Lone surrogates, from a JSON string or from aiohttp decoding a header's non-UTF-8 bytes,
# made PyJWT raise UnicodeEncodeError.
@example(bytes((JWT_TEXT,)) + b"\xed\xa0\x80")
@example(bytes((JWT_TEXT,)) + b"eyJhbGciOiJIUzI1NiJ9.e30.\xff")
def test_only_auth_error_escapes(data: bytes) -> None:
    run_target("jwt", data)


@FUZZ
@given(st.dictionaries(st.sampled_from(CLAIMS), json_values, max_size=len(CLAIMS)), st.data())
def test_signed_tokens_with_any_claim_values(
    changed: dict[str, object], data: st.DataObject
) -> None:
    # Start from a valid token and replace or add claims, so that each odd value is checked
    # behind a valid signature and, mostly, beside otherwise valid claims.
    claims = {**GOOD, **changed}
    if data.draw(st.booleans()):
        del claims[data.draw(st.sampled_from(sorted(claims)))]
    payload = json.dumps(claims).encode("utf-8", "surrogatepass")
    run_target("jwt", bytes((JWT_SIGN,)) + HEADER + b"\n" + payload)


@pytest.mark.parametrize("token", ["\ud800", "a.b.\udcff", "é.e30.x", "\x00"])
def test_text_that_is_no_jwt_is_a_401(token: str) -> None:
    with pytest.raises(AuthError) as refused:
        verify_token(CONFIG, token, now=NOW)
    assert refused.value.status == 401
    assert refused.value.code == "invalid_token"


def test_a_valid_token_still_verifies() -> None:
    token = sign(HEADER, json.dumps(GOOD).encode()).decode()
    grants = verify_token(CONFIG, token, now=NOW)
    assert (grants.room, grants.identity, grants.can_publish) == ("room1", "alice", True)
