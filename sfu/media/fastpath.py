"""The native fan-out core, seen from Python: loading it, and the Router that drives it.

`rtc.fastpath: auto` uses the core when the extension was built and pylibsrtp exposes what
it borrows (the addresses of libsrtp's protect/unprotect and each session's context); if
either is missing the SFU logs one warning line and runs the pure-Python path. `off` never
loads it. docs/architecture.md ("Native fast path") describes what the core does and what it
never touches.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from sfu.media.router import Attention, Copy, CopySink, Route, Router
from sfu.media.rtp import RtpHeader
from sfu.media.stats import MediaStats

log = logging.getLogger(__name__)

try:
    from pylibsrtp._binding import ffi as _ffi
    from pylibsrtp._binding import lib as _lib
except ImportError:  # pragma: no cover - the pinned pylibsrtp has it
    _ffi = _lib = None


def probe() -> tuple[ModuleType | None, str]:
    """The extension module if it can run here, and a one-line description either way."""
    try:
        module = importlib.import_module("sfu.media._fastpath")
    except ImportError as exc:
        return None, f"unavailable: the extension sfu.media._fastpath is not built ({exc})"
    if srtp_functions() is None:
        return None, "unavailable: this pylibsrtp does not expose libsrtp's functions"
    return module, "available (recvmmsg/sendmmsg batches, libsrtp borrowed from pylibsrtp)"


def load(mode: str) -> ModuleType | None:
    """The extension module for `rtc.fastpath` = `mode`, or None for the Python path."""
    if mode == "off":
        return None
    module, description = probe()
    if module is None:
        log.warning(
            "media: native fast path %s; forwarding in pure Python (slower). Reinstall with "
            "a C compiler and Python headers (docs/deployment.md) or set rtc.fastpath: off",
            description,
        )
    return module


def srtp_functions() -> tuple[int, int] | None:
    """Addresses of libsrtp's srtp_protect and srtp_unprotect inside pylibsrtp."""
    if _ffi is None or not all(hasattr(_lib, n) for n in ("srtp_protect", "srtp_unprotect")):
        return None
    return (
        int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "srtp_protect"))),
        int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "srtp_unprotect"))),
    )


def context_address(session: Any) -> int:
    """The srtp_t of one pylibsrtp Session (a private attribute of the pinned version)."""
    return int(_ffi.cast("uintptr_t", session._srtp[0]))


class NativeRouter(Router):
    """The same contract as `Router`, with records and the loop in the extension."""

    def __init__(self, stats: MediaStats, integrity_sample_every: int, module: ModuleType):
        super().__init__(stats, integrity_sample_every)
        self.module = module
        # Set when the engine has its socket (or its capture sink, in tests).
        self.core: Any = None

    def new_route(self, kind: str) -> Route:
        route: Route = self.module.Route(kind)
        return route

    def new_copy(
        self,
        sink: CopySink,
        *,
        ssrc: int,
        payload_type: int,
        ext_map: list[int],
        identity_ext: bool,
        last_seq: int,
        last_ts: int,
    ) -> Copy:
        copy: Copy = self.module.Copy(
            sink.peer,  # type: ignore[attr-defined]
            sink,
            ssrc,
            payload_type,
            ext_map,
            identity_ext,
            last_seq,
            last_ts,
        )
        return copy

    def fan_out(self, route: Route, data: bytes, hdr: RtpHeader, now: float) -> Attention | None:
        attention: Attention | None = self.core.fan_out(route, data, now)
        return attention

    def send_one(self, copy: Copy, data: bytes, hdr: RtpHeader, now: float, kind: str) -> bool:
        return bool(self.core.send_one(copy, data, now, kind))

    def inject_payload_fault(self, copies: int) -> None:
        self.core.inject_payload_fault(copies)

    def take_counters(self) -> dict[str, int]:
        if self.core is None:
            return {}
        counters: dict[str, int] = self.core.take_counters()
        stats = self.stats
        audio, video = stats.by_kind["audio"], stats.by_kind["video"]
        audio[2] += counters["out_audio"]
        audio[3] += counters["out_audio_bytes"]
        video[2] += counters["out_video"]
        video[3] += counters["out_video_bytes"]
        stats.rtp_out += counters["rtp_out"]
        stats.rtp_bytes_out += counters["rtp_bytes_out"]
        stats.srtp_failures += counters["protect_failures"]
        stats.integrity[0] += counters["integrity_match"]
        stats.integrity[1] += counters["integrity_mismatch"]
        for seconds in self.core.take_latency():
            stats.forward_latency.observe(seconds)
        return counters
