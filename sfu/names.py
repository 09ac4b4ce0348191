"""Rules for the names users choose (rooms, streams, identities), shared by auth and signaling.

Room and stream names appear in URL paths (/whip/{room}/{stream}), so they are restricted to
characters that need no escaping; identities are free text but never control characters,
which would let a client forge log lines. Display names (join `name`, the token's `name`
claim) are broadcast to everyone in the room, so they exclude invisible and direction-changing
characters too.
"""

from __future__ import annotations

import re
import unicodedata

_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_IDENTITY_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
MAX_IDENTITY_LEN = 128
MAX_DISPLAY_NAME_LEN = 128
# Control, format (e.g. U+202E, which reverses how the rest of a line is shown), line and
# paragraph separators, lone surrogates: none belongs in a name shown to other participants.
_NAME_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def room_name_problem(name: str) -> str | None:
    """None if `name` is a valid room or stream name, else why not."""
    if _ROOM.fullmatch(name):
        return None
    return (
        f"{name!r} is not a valid name (1-64 characters of A-Z a-z 0-9 _ . -, "
        "starting with a letter or digit)"
    )


def identity_problem(identity: str) -> str | None:
    """None if `identity` is a valid participant identity, else why not."""
    if not identity:
        return "identity must not be empty"
    if len(identity) > MAX_IDENTITY_LEN:
        return f"identity is {len(identity)} characters; at most {MAX_IDENTITY_LEN} are allowed"
    if _IDENTITY_FORBIDDEN.search(identity):
        return "identity must not contain control characters"
    return None


def display_name_problem(name: str) -> str | None:
    """None if `name` may be shown to other participants as someone's display name."""
    if len(name) > MAX_DISPLAY_NAME_LEN:
        return f"name is {len(name)} characters; at most {MAX_DISPLAY_NAME_LEN} are allowed"
    if any(unicodedata.category(c) in _NAME_FORBIDDEN_CATEGORIES for c in name):
        return "name must not contain control, format or line-separator characters"
    return None
