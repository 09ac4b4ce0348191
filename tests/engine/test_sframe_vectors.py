"""The server's key-free SFrame header parser (sfu/media/envelope.py) against RFC 9605
Appendix C.1, and its frame-format sizes against the limits both clients are held to.

The vectors and limits live in tests/client/sframe_vectors.json, which the Python client's
tests and the browser client's (tests/js/) read too, so all three readers of the envelope are
checked against one copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sfu.media import codecs, envelope
from sfu.media.envelope import parse_sframe_header

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "client" / "sframe_vectors.json").read_text(encoding="utf-8")
)
HEADERS: list[tuple[int, int, bytes]] = [
    (int(v["kid"], 16), int(v["ctr"], 16), bytes.fromhex(v["header"])) for v in VECTORS["header"]
]
LIMITS: dict[str, int] = {k: v for k, v in VECTORS["limits"].items() if not k.startswith("_")}


def test_every_rfc_9605_header_vector_parses_to_its_kid_and_ctr() -> None:
    assert len(HEADERS) == 289
    for kid, ctr, encoded in HEADERS:
        size = len(encoded)
        assert parse_sframe_header(encoded, 0, size) == (kid, ctr, size), encoded.hex()
        # Inside a payload, as the judge sees it: after a clear prefix, before ciphertext.
        framed = bytes(10) + encoded + b"\xff" * 20
        assert parse_sframe_header(framed, 10, len(framed)) == (kid, ctr, size), encoded.hex()
        # Cut short by the end of the frame: not a header.
        assert parse_sframe_header(framed, 10, 10 + size - 1) is None, encoded.hex()


def test_the_server_uses_the_sizes_both_clients_use() -> None:
    assert LIMITS["vp8_keyframe_clear_prefix_len"] == codecs.VP8_KEYFRAME_CLEAR_PREFIX_LEN
    assert LIMITS["vp8_delta_clear_prefix_len"] == codecs.VP8_DELTA_CLEAR_PREFIX_LEN
    assert LIMITS["opus_clear_prefix_len"] == codecs.OPUS_CLEAR_PREFIX_LEN
    assert LIMITS["aead_tag_len"] == envelope.AEAD_TAG
    assert max(len(encoded) for _, _, encoded in HEADERS) == LIMITS["max_header_len"]
