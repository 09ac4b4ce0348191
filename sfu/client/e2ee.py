"""Frame-level end-to-end encryption (SFrame, ``docs/e2ee.md``) for aiortc senders and receivers.

aiortc has no encoded-frame transform API (nothing like ``RTCRtpScriptTransform``), so these
hooks reach into aiortc internals. They patch *instances* (one ``RTCRtpSender``, one
``RTCRtpReceiver``, the encoder object a hooked sender creates), never classes, so peers that
are not hooked behave exactly as before. The seams, all in aiortc 1.16 (see
:data:`SUPPORTED_AIORTC`; other versions are refused because these names are private):

Send side (``aiortc/rtcrtpsender.py``, ``aiortc/codecs/vpx.py``, ``aiortc/codecs/opus.py``)
    ``RTCRtpSender._run_rtp`` calls ``self._next_encoded_frame(codec)`` once per frame, which
    creates ``self.__encoder = get_encoder(codec)`` on first use (the name-mangled
    ``_RTCRtpSender__encoder``) and then runs ``encoder.encode(frame, force_keyframe)`` in the
    default thread-pool executor (or ``encoder.pack(packet)`` for pre-encoded input).
    :meth:`E2eeContext.attach_sender` replaces ``_next_encoded_frame`` on the instance with a
    wrapper that installs a protected encoder in that slot before the original runs, so the
    original never creates a plain one.

    * VP8: ``Vp8Encoder.encode`` and ``.pack`` hand the whole encoded frame to
      ``self._packetize(buffer, picture_id)`` (a classmethod), which splits it and prepends the
      RFC 7741 payload descriptor. An instance attribute ``_packetize`` shadows the
      classmethod: it protects ``buffer`` (keeping ``vp8_clear_prefix_len`` bytes clear) and
      calls the original, so the payload descriptor stays outside and in the clear and the
      protected frame is exactly the packetizer's input.
    * Opus: one encoded frame per RTP payload, so ``encode`` and ``pack`` are wrapped on the
      instance and each returned payload is protected (clear prefix 0).

    REMB still reaches the encoder (``_handle_rtcp_packet`` sets ``target_bitrate`` on the
    same, real encoder object). Protection runs in the executor thread that encodes, so one
    lock per KID serialises the SFrame counter (audio and video encode concurrently, and two
    frames must never get one CTR).

Receive side (``aiortc/rtcrtpreceiver.py``, ``aiortc/jitterbuffer.py``)
    ``RTCRtpReceiver._handle_rtp_packet`` depayloads each packet (the VP8 descriptor is
    stripped) and calls ``self.__jitter_buffer.add(packet)`` (``_RTCRtpReceiver__jitter_buffer``),
    which returns ``(pli_flag, JitterFrame | None)``: a reassembled encoded frame that is then
    queued for the decoder thread. :meth:`E2eeContext.attach_receiver` wraps ``add`` on that
    jitter-buffer instance: a returned frame is unprotected in place, or replaced by ``None``
    (dropped, never decoded) when it does not open. The codec comes from the receiver's
    payload-type map (``_RTCRtpReceiver__codecs``), filled by ``receive()``.

Zero-length frames pass through untouched in both directions. Only Opus and VP8 have a
clear-prefix rule; any other codec is refused (sender: the frame raises, which stops the
track; receiver: the frame is dropped and counted as malformed).

This module imports aiortc only inside the attach methods, so importing it is cheap.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, Literal

from sfu.client.sframe import (
    AES_128_GCM_SHA256_128,
    CipherSuite,
    Receiver,
    Sender,
    SFrameAuthError,
    SFrameError,
    SFrameUnknownKidError,
    clear_prefix_len_for,
    parse_envelope,
)

if TYPE_CHECKING:
    from aiortc.codecs.base import Encoder
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    from aiortc.rtcrtpsender import RTCRtpSender
    from aiortc.rtp import RtpPacket

__all__ = [
    "SUPPORTED_AIORTC",
    "E2eeConfig",
    "E2eeContext",
    "E2eeCounters",
    "E2eeUnsupportedError",
    "EncryptedFrame",
    "ReceiverHook",
    "SenderHook",
    "check_aiortc_version",
]

# The hooks were written and tested against these aiortc releases (version prefix match).
SUPPORTED_AIORTC: Final = ("1.16.",)

_SENDER_ENCODER: Final = "_RTCRtpSender__encoder"
_RECEIVER_JITTER: Final = "_RTCRtpReceiver__jitter_buffer"
_RECEIVER_CODECS: Final = "_RTCRtpReceiver__codecs"
_RECEIVER_KIND: Final = "_RTCRtpReceiver__kind"
_HOOKED: Final = "_blindfold_e2ee_hook"


class E2eeUnsupportedError(RuntimeError):
    """The installed aiortc (or the object given) does not have the internals the hooks use."""


@dataclass(frozen=True)
class EncryptedFrame:
    """One protected frame as the sender produced it or the receiver reassembled it."""

    direction: Literal["send", "recv"]
    kind: str
    """``"audio"`` or ``"video"``."""
    codec: str
    """The SDP codec name, e.g. ``"opus"`` or ``"VP8"``."""
    data: bytes
    """The protected frame: clear prefix, SFrame header, ciphertext and tag."""
    timestamp: int | None
    """Send: the encoder's timestamp (codec clock from 0). Receive: the RTP timestamp."""
    kid: int | None
    """From the SFrame header; ``None`` if the frame is not a well-formed envelope."""
    ctr: int | None
    """From the SFrame header: unique per frame and KID, so it matches frames end to end."""


FrameCallback = Callable[[EncryptedFrame], None]


@dataclass(frozen=True)
class E2eeConfig:
    """Key material for one participant. None of it is ever sent to the SFU.

    ``send_kid``/``send_key``: the KID (``compose_kid``) and base key this client protects its
    own frames with. ``receive_keys``: KID to base key for every sender it should decrypt.
    ``on_frame``: called on the event loop with every protected frame sent or received
    (before decryption), e.g. to compare what a publisher produced with what arrived.
    """

    send_kid: int | None = None
    send_key: bytes | None = field(default=None, repr=False)
    receive_keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)
    on_frame: FrameCallback | None = field(default=None, compare=False)
    suite: CipherSuite = AES_128_GCM_SHA256_128

    def __post_init__(self) -> None:
        if (self.send_kid is None) != (self.send_key is None):
            raise ValueError("send_kid and send_key must be given together")

    @property
    def can_send(self) -> bool:
        return self.send_kid is not None


@dataclass
class E2eeCounters:
    """Frame counters of one hook (or summed over a context's hooks)."""

    frames_protected: int = 0
    frames_unprotected: int = 0
    auth_failures: int = 0
    unknown_kid: int = 0
    malformed: int = 0
    """Not a well-formed envelope, no clear-prefix rule for the codec, or (send side) a frame
    too short for its clear prefix. Dropped."""
    empty_frames: int = 0
    """Zero-length frames passed through untouched."""

    @property
    def dropped(self) -> int:
        return self.auth_failures + self.unknown_kid + self.malformed

    def __add__(self, other: E2eeCounters) -> E2eeCounters:
        return E2eeCounters(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


def check_aiortc_version() -> str:
    """Return aiortc's version, or raise :class:`E2eeUnsupportedError` if the hooks don't fit it."""
    import aiortc

    version = str(getattr(aiortc, "__version__", "unknown"))
    if not version.startswith(SUPPORTED_AIORTC):
        raise E2eeUnsupportedError(
            f"Blindfold's E2EE hooks patch aiortc internals and were written and tested against "
            f"aiortc {', '.join(v + 'x' for v in SUPPORTED_AIORTC)}; aiortc {version} is "
            "installed. Install a supported aiortc, or re-check the seams described in "
            "sfu/client/e2ee.py and extend SUPPORTED_AIORTC."
        )
    return version


class _SendState:
    """The one SFrame sender (one counter) of a (KID, base key), shared by every track."""

    __slots__ = ("__weakref__", "lock", "sender")

    def __init__(self, kid: int, key: bytes, suite: CipherSuite, counter: int) -> None:
        self.sender = Sender(kid, key, suite, counter=counter)
        self.lock = threading.Lock()


_SendIdent = tuple[int, int, bytes]

# Two Sender objects for one (KID, key) would each start at CTR 0 and repeat nonces, so every
# context in this process that sends under the same key shares one state (docs/e2ee.md §5),
# and a state created again after the last one was dropped resumes its counter. Only a
# SHA-256 of each key and its next CTR outlive the state; the key itself does not.
_send_states: weakref.WeakValueDictionary[_SendIdent, _SendState] = weakref.WeakValueDictionary()
_next_counters: dict[_SendIdent, int] = {}
_send_states_lock = threading.Lock()


def _remember_counter(ident: _SendIdent, sender: Sender) -> None:
    # Runs from garbage collection, possibly while _send_states_lock is held: no locking here.
    _next_counters[ident] = max(_next_counters.get(ident, 0), sender.counter)


def _shared_send_state(kid: int, key: bytes, suite: CipherSuite) -> _SendState:
    ident = (kid, suite.suite_id, hashlib.sha256(key).digest())
    with _send_states_lock:
        state = _send_states.get(ident)
        if state is None:
            state = _SendState(kid, key, suite, _next_counters.get(ident, 0))
            weakref.finalize(state, _remember_counter, ident, state.sender)
            _send_states[ident] = state
        return state


def _header_of(data: bytes, clear_prefix_len: int, suite: CipherSuite) -> tuple[int, int] | None:
    try:
        header, _ = parse_envelope(data, clear_prefix_len, suite)
    except SFrameError:
        return None
    return header.kid, header.ctr


class E2eeContext:
    """The keys and counters of one participant, and the hooks attached to its peers."""

    def __init__(self, config: E2eeConfig) -> None:
        self.config = config
        self._send: _SendState | None = None
        if config.send_kid is not None and config.send_key is not None:
            self._send = _shared_send_state(config.send_kid, config.send_key, config.suite)
        self.receiver = Receiver(config.suite)
        for kid, key in config.receive_keys.items():
            self.receiver.add_key(kid, key)
        self.hooks: list[SenderHook | ReceiverHook] = []

    @property
    def counters(self) -> E2eeCounters:
        total = E2eeCounters()
        for hook in self.hooks:
            total = total + hook.counters
        return total

    def set_send_key(self, kid: int, key: bytes) -> None:
        """Rotate: frames sealed from now on use ``kid`` and ``key`` (a new generation)."""
        self._send = _shared_send_state(kid, key, self.config.suite)

    def add_receive_key(self, kid: int, key: bytes) -> None:
        self.receiver.add_key(kid, key)

    def remove_receive_key(self, kid: int) -> None:
        self.receiver.remove_key(kid)

    def attach_sender(self, sender: RTCRtpSender) -> SenderHook:
        """Protect every frame ``sender`` sends. Call before it has encoded anything."""
        if self._send is None:
            raise ValueError("this E2eeConfig has no send_kid/send_key")
        hook = SenderHook(self, sender)
        self.hooks.append(hook)
        return hook

    def attach_receiver(self, receiver: RTCRtpReceiver) -> ReceiverHook:
        """Unprotect every frame ``receiver`` reassembles; drop those that fail."""
        hook = ReceiverHook(self, receiver)
        self.hooks.append(hook)
        return hook

    def _emit(self, event: EncryptedFrame) -> None:
        callback = self.config.on_frame
        if callback is not None:
            callback(event)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class SenderHook:
    """E2EE on one ``RTCRtpSender``: see the module docstring for the seam."""

    def __init__(self, context: E2eeContext, sender: RTCRtpSender) -> None:
        check_aiortc_version()
        if getattr(sender, _HOOKED, None) is not None:
            raise ValueError("this RTCRtpSender already has an E2EE hook")
        if _SENDER_ENCODER not in vars(sender) or not callable(
            getattr(sender, "_next_encoded_frame", None)
        ):
            raise E2eeUnsupportedError("RTCRtpSender lacks the internals the E2EE hook uses")
        if getattr(sender, _SENDER_ENCODER) is not None:
            raise ValueError("the sender has already encoded frames in the clear; hook it first")
        self.context = context
        self.kind = sender.kind
        self.counters = E2eeCounters()
        self._suite = context.config.suite
        # Encoding runs in executor threads; callbacks are handed back to this loop.
        self._loop = _running_loop()
        original: Callable[[RTCRtpCodecParameters], Any] = sender._next_encoded_frame

        async def next_encoded_frame(codec: RTCRtpCodecParameters) -> Any:
            if getattr(sender, _SENDER_ENCODER) is None:
                setattr(sender, _SENDER_ENCODER, self._protected_encoder(codec))
            return await original(codec)

        setattr(sender, "_next_encoded_frame", next_encoded_frame)  # noqa: B010 (instance patch)
        setattr(sender, _HOOKED, self)

    def _protected_encoder(self, codec: RTCRtpCodecParameters) -> Encoder:
        from aiortc.codecs import get_encoder

        name = codec.name
        # Refuse before encoding anything: no clear-prefix rule means no safe way to send.
        clear_prefix_len_for(name, b"")
        encoder = get_encoder(codec)
        if name.lower() == "vp8":
            self._wrap_vp8(encoder, name)
        else:
            self._wrap_per_payload(encoder, name)
        return encoder

    def _wrap_vp8(self, encoder: Encoder, codec: str) -> None:
        packetize: Callable[[bytes, int], list[bytes]] | None = getattr(encoder, "_packetize", None)
        if packetize is None:
            raise E2eeUnsupportedError("aiortc's VP8 encoder has no _packetize seam")
        pending: list[bytes] = []

        def protected_packetize(buffer: bytes, picture_id: int) -> list[bytes]:
            sealed = self.seal(codec, buffer)
            if sealed is None:
                return []  # dropped: nothing of this frame goes out
            if sealed:
                pending.append(sealed)
            return packetize(sealed, picture_id)

        setattr(encoder, "_packetize", protected_packetize)  # noqa: B010 (instance patch)
        self._wrap_results(encoder, codec, lambda payloads: _drain(pending))

    def _wrap_per_payload(self, encoder: Encoder, codec: str) -> None:
        def protect_all(payloads: list[bytes]) -> list[bytes]:
            out = []
            for payload in payloads:
                sealed = self.seal(codec, payload)
                if sealed is not None:
                    out.append(sealed)
            return out

        self._wrap_results(encoder, codec, lambda payloads: payloads, transform=protect_all)

    def _wrap_results(
        self,
        encoder: Encoder,
        codec: str,
        sealed_of: Callable[[list[bytes]], list[bytes]],
        transform: Callable[[list[bytes]], list[bytes]] | None = None,
    ) -> None:
        """Wrap ``encode`` and ``pack`` so each sealed frame is reported with its timestamp."""
        for method in ("encode", "pack"):
            original: Callable[..., tuple[list[bytes], int]] = getattr(encoder, method)

            def wrapped(
                *args: Any, _original: Callable[..., tuple[list[bytes], int]] = original
            ) -> tuple[list[bytes], int]:
                payloads, timestamp = _original(*args)
                if transform is not None:
                    payloads = transform(payloads)
                for sealed in sealed_of(payloads):
                    if sealed:
                        self._report(codec, sealed, timestamp)
                return payloads, timestamp

            setattr(encoder, method, wrapped)

    def seal(self, codec: str, frame: bytes) -> bytes | None:
        """Protect one encoded frame; ``b""`` stays ``b""``; ``None`` means drop it."""
        state = self.context._send
        if state is None:
            raise ValueError("this E2eeContext has no send key")
        if not frame:
            with state.lock:
                self.counters.empty_frames += 1
            return b""
        prefix = clear_prefix_len_for(codec, frame)
        with state.lock:
            if len(frame) < prefix:
                # A malformed VP8 frame: shortening the prefix would desynchronise receivers.
                self.counters.malformed += 1
                return None
            sealed = state.sender.protect(frame, prefix)
            self.counters.frames_protected += 1
        return sealed

    def _report(self, codec: str, sealed: bytes, timestamp: int | None) -> None:
        if self.context.config.on_frame is None:
            return
        ident = _header_of(sealed, clear_prefix_len_for(codec, sealed), self._suite)
        event = EncryptedFrame(
            direction="send",
            kind=self.kind,
            codec=codec,
            data=sealed,
            timestamp=timestamp,
            kid=ident[0] if ident else None,
            ctr=ident[1] if ident else None,
        )
        loop = self._loop
        if loop is None or loop.is_closed():
            self.context._emit(event)
        else:
            loop.call_soon_threadsafe(self.context._emit, event)


def _drain(items: list[bytes]) -> list[bytes]:
    out = items[:]
    items.clear()
    return out


class ReceiverHook:
    """E2EE on one ``RTCRtpReceiver``: see the module docstring for the seam."""

    def __init__(self, context: E2eeContext, receiver: RTCRtpReceiver) -> None:
        check_aiortc_version()
        if getattr(receiver, _HOOKED, None) is not None:
            raise ValueError("this RTCRtpReceiver already has an E2EE hook")
        jitter_buffer = getattr(receiver, _RECEIVER_JITTER, None)
        codecs: dict[int, RTCRtpCodecParameters] | None = getattr(receiver, _RECEIVER_CODECS, None)
        if jitter_buffer is None or codecs is None or not callable(jitter_buffer.add):
            raise E2eeUnsupportedError("RTCRtpReceiver lacks the internals the E2EE hook uses")
        self.context = context
        self.kind = str(getattr(receiver, _RECEIVER_KIND, "unknown"))
        self.counters = E2eeCounters()
        original: Callable[[RtpPacket], tuple[bool, JitterFrame | None]] = jitter_buffer.add

        def add(packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
            pli_flag, frame = original(packet)
            if frame is None:
                return pli_flag, None
            codec = codecs.get(packet.payload_type)
            data = self.open(codec.name if codec else None, frame.data, frame.timestamp)
            if data is None:
                return pli_flag, None
            frame.data = data
            return pli_flag, frame

        setattr(jitter_buffer, "add", add)  # noqa: B010 (instance patch)
        setattr(receiver, _HOOKED, self)

    def open(self, codec: str | None, data: bytes, timestamp: int | None = None) -> bytes | None:
        """Unprotect one reassembled frame; ``None`` means drop it (never decode it)."""
        if not data:
            self.counters.empty_frames += 1
            return b""
        suite = self.context.receiver.suite
        try:
            prefix = clear_prefix_len_for(codec or "", data)
        except ValueError:
            prefix = None
        if self.context.config.on_frame is not None:
            ident = _header_of(data, prefix, suite) if prefix is not None else None
            self.context._emit(
                EncryptedFrame(
                    direction="recv",
                    kind=self.kind,
                    codec=codec or "",
                    data=data,
                    timestamp=timestamp,
                    kid=ident[0] if ident else None,
                    ctr=ident[1] if ident else None,
                )
            )
        if prefix is None:
            self.counters.malformed += 1
            return None
        try:
            plain = self.context.receiver.unprotect(data, prefix)
        except SFrameUnknownKidError:
            self.counters.unknown_kid += 1
            return None
        except SFrameAuthError:
            self.counters.auth_failures += 1
            return None
        except SFrameError:
            self.counters.malformed += 1
            return None
        self.counters.frames_unprotected += 1
        return plain
