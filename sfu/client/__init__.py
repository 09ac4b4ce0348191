"""Blindfold's Python client (bots, tests, load generation); never imported by the server."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sfu.client.e2ee import E2eeConfig, E2eeContext, E2eeCounters, EncryptedFrame
    from sfu.client.whip import Publication, Subscription, WhipError, publish, subscribe

__all__ = [
    "E2eeConfig",
    "E2eeContext",
    "E2eeCounters",
    "EncryptedFrame",
    "Publication",
    "Subscription",
    "WhipError",
    "publish",
    "subscribe",
]

# Importing this package must stay cheap: aiortc loads PyAV/FFmpeg, so the submodules that
# need it are imported only when one of their names is first used.
_LAZY = {
    "E2eeConfig": "sfu.client.e2ee",
    "E2eeContext": "sfu.client.e2ee",
    "E2eeCounters": "sfu.client.e2ee",
    "EncryptedFrame": "sfu.client.e2ee",
    "Publication": "sfu.client.whip",
    "Subscription": "sfu.client.whip",
    "WhipError": "sfu.client.whip",
    "publish": "sfu.client.whip",
    "subscribe": "sfu.client.whip",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
