"""One end-to-end-encrypted call under random UDP loss, through the SFU or peer to peer.

Loss comes from the kernel, not from a relay in the test: each call runs in a fresh network
namespace that has only `lo`, and once the call is up an iptables rule there drops every
UDP datagram arriving on `lo` with probability p (`-m statistic --mode random`). The kernel
on the test machines has no `netem` qdisc (docs/testing.md). TCP is untouched, so the WHIP
and WHEP exchanges never see loss; STUN, DTLS, SRTP and SRTCP all do, in both directions.
Every datagram crosses `lo` once per hop: through the SFU a media packet faces the loss twice
(publisher to SFU, SFU to subscriber), peer to peer once.

The publisher protects every frame with SFrame (sfu/client/e2ee.py); its counter (CTR) is
unique per frame, so frames are matched end to end exactly, without timing: a frame counts
as delivered when the subscriber reassembled it completely and it authenticated, i.e. when
it was handed to the decoder. Frames the publisher sent in the first `seconds` of the loss
are counted; the loss stays on for `drain` more seconds so that their repairs face it too.

`python -m tests.netns.losscall --mode sfu --loss 0.1` runs one call in the current network
namespace and prints its result as one JSON line; `run_in_namespace` does that inside a
throwaway namespace and is what the test and bench/loss.py call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
KINDS = ("video", "audio")
# The call must be up (both kinds decoding) before the loss starts; ICE, DTLS and the first
# keyframe are not what is measured.
READY_VIDEO_FRAMES = 30
READY_AUDIO_FRAMES = 50
SETUP_TIMEOUT = 30.0


@dataclass
class KindResult:
    sent: int = 0
    """Frames the publisher protected while the loss was on (the counted window)."""
    delivered: int = 0
    """Of those, frames the subscriber reassembled and authenticated (matched by CTR)."""
    decoded: int = 0
    """Frames the subscriber's decoder put out in the same wall-clock window (not matched
    per frame, so it can be off by the frames in flight at either edge)."""
    at_sfu: int = 0
    """Audio only, mode "sfu" only: frames of the window that reached the SFU (by CTR, read
    from the clear SFrame header), repairs included."""
    arrived: int = 0
    """Audio only: frames of the window whose packet reached the subscriber's RTP stack (by
    CTR), before aiortc's jitter buffer decides what the decoder gets."""

    @property
    def ratio(self) -> float:
        return self.delivered / self.sent if self.sent else 0.0


@dataclass
class CallResult:
    mode: str
    loss: float
    seconds: float
    video: KindResult = field(default_factory=KindResult)
    audio: KindResult = field(default_factory=KindResult)
    video_packets_per_frame: float = 0.0
    sfu: dict[str, int] = field(default_factory=dict)
    """SFU counters over the window (mode "sfu" only)."""

    def kind(self, kind: str) -> KindResult:
        return self.video if kind == "video" else self.audio

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CallResult:
        raw = json.loads(text)
        video, audio = KindResult(**raw.pop("video")), KindResult(**raw.pop("audio"))
        return cls(video=video, audio=audio, **raw)


# ---------------------------------------------------------------------------------------------
# Namespaces (run as root, outside the call)


def unavailable_reason() -> str | None:
    """Why loss cannot be made here, or None: root, `ip netns` and the iptables statistic
    match are all needed, and are tried for real in a probe namespace."""
    if os.geteuid() != 0:
        return "needs root (ip netns add, iptables)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package {package})"
    try:
        with namespace("bf-probe") as name:
            _add_loss_rule(0.5, ["ip", "netns", "exec", name])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", "") or ""
        return f"cannot drop packets in a network namespace: {exc} {output}".strip()
    return None


@contextlib.contextmanager
def namespace(prefix: str = "bf-loss") -> Iterator[str]:
    """A fresh network namespace with only `lo`, up; deleted on the way out, whatever
    happened inside."""
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        yield name
    finally:
        subprocess.run(
            ["ip", "netns", "delete", name], check=False, capture_output=True, timeout=10
        )


def run_in_namespace(
    mode: str, loss: float, seconds: float, drain: float, timeout: float
) -> CallResult:
    """One call in a throwaway namespace; the child is killed if it overruns `timeout`."""
    with namespace() as name:
        command = [
            "ip",
            "netns",
            "exec",
            name,
            sys.executable,
            "-m",
            "tests.netns.losscall",
            "--mode",
            mode,
            "--loss",
            str(loss),
            "--seconds",
            str(seconds),
            "--drain",
            str(drain),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFU_")}
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"the {mode} call at {loss:.0%} loss failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return CallResult.from_json(proc.stdout.strip().splitlines()[-1])


def _add_loss_rule(loss: float, prefix: list[str] | None = None) -> None:
    # INPUT on lo sees every datagram exactly once, whichever process sent it.
    subprocess.run(
        [
            *(prefix or []),
            "iptables",
            "-w",
            "-A",
            "INPUT",
            "-i",
            "lo",
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            f"{loss:.4f}",
            "-j",
            "DROP",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    )


# ---------------------------------------------------------------------------------------------
# The call (inside the namespace)


class Tally:
    """CTRs of frames sent while the window is open and of every frame received; decoded
    frames per kind while the window is open."""

    def __init__(self) -> None:
        self.window_open = False
        self.sent: dict[str, set[int]] = {k: set() for k in KINDS}
        self.received: dict[str, set[int]] = {k: set() for k in KINDS}
        self.audio_at_sfu: set[int] = set()
        self.audio_arrived: set[int] = set()
        self.sent_total: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.decoded_total: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.decoded_window: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.tasks: list[asyncio.Task[None]] = []

    def on_sent(self, frame: Any) -> None:
        self.sent_total[frame.kind] += 1
        if self.window_open and frame.ctr is not None:
            self.sent[frame.kind].add(frame.ctr)

    def on_received(self, frame: Any) -> None:
        if frame.ctr is not None:
            self.received[frame.kind].add(frame.ctr)

    def tap_sfu(self, audio_payload_type: int) -> Any:
        """For the publisher transport's packet tap: CTRs of the audio that reached the SFU."""
        from sfu.client.sframe import SFrameError, decode_header
        from sfu.media.rtp import parse_header

        def tap(packet: bytes) -> None:
            hdr = parse_header(packet)
            if hdr is None or hdr.payload_type != audio_payload_type:
                return
            with contextlib.suppress(SFrameError):
                self.audio_at_sfu.add(decode_header(packet, hdr.header_len)[0].ctr)

        return tap

    def watch_arrivals(self, pc: Any) -> None:
        """Record the CTR of every audio packet the subscriber's receiver gets, ahead of the
        E2EE hook and aiortc's jitter buffer (the same private seam sfu/client/e2ee.py uses;
        an Opus packet carries one whole protected frame)."""
        from sfu.client.sframe import SFrameError, decode_header

        for transceiver in pc.getTransceivers():
            if transceiver.kind != "audio":
                continue
            buffer = transceiver.receiver._RTCRtpReceiver__jitter_buffer
            inner = buffer.add

            def add(packet: Any, inner: Any = inner) -> Any:
                with contextlib.suppress(SFrameError):
                    self.audio_arrived.add(decode_header(packet._data)[0].ctr)
                return inner(packet)

            buffer.add = add

    def on_track(self, track: Any) -> None:
        self.tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: Any) -> None:
        while True:
            try:
                await track.recv()
            except Exception:
                return
            self.decoded_total[track.kind] += 1
            if self.window_open:
                self.decoded_window[track.kind] += 1

    def ready(self) -> bool:
        return (
            self.decoded_total["video"] >= READY_VIDEO_FRAMES
            and self.decoded_total["audio"] >= READY_AUDIO_FRAMES
        )


def publisher_tracks() -> list[Any]:
    """Video with enough detail for several packets per frame, and a tone in real time."""

    import numpy as np
    from aiortc.mediastreams import VideoStreamTrack
    from av import VideoFrame

    class TextureTrack(VideoStreamTrack):
        # Precomputed and cycled: drawing noise per frame would cost CPU the peers need.
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(7)
            base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
            self.frames = [np.roll(base, 4 * i, axis=1) for i in range(30)]
            self.count = 0

        async def recv(self) -> VideoFrame:
            pts, time_base = await self.next_timestamp()
            frame = VideoFrame.from_ndarray(self.frames[self.count % 30], format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            self.count += 1
            return frame

    from tests.media.harness import ToneTrack

    return [TextureTrack(), ToneTrack()]


async def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {SETUP_TIMEOUT}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _measure(tally: Tally, loss: float, seconds: float, drain: float) -> None:
    await _wait(tally.ready, "the call to decode audio and video")
    if loss > 0:
        _add_loss_rule(loss)
    tally.window_open = True
    await asyncio.sleep(seconds)
    tally.window_open = False
    await asyncio.sleep(drain)


async def _video_packets_sent(pc: Any) -> int:
    report = await pc.getStats()
    return sum(
        s.packetsSent for s in report.values() if s.type == "outbound-rtp" and s.kind == "video"
    )


def _result(mode: str, loss: float, seconds: float, tally: Tally, packets: int) -> CallResult:
    result = CallResult(mode=mode, loss=loss, seconds=seconds)
    for kind in KINDS:
        sent = tally.sent[kind]
        result.kind(kind).sent = len(sent)
        result.kind(kind).delivered = len(sent & tally.received[kind])
        result.kind(kind).decoded = tally.decoded_window[kind]
    audio = tally.sent["audio"]
    result.audio.at_sfu = len(audio & tally.audio_at_sfu)
    result.audio.arrived = len(audio & tally.audio_arrived)
    result.video_packets_per_frame = round(packets / max(tally.sent_total["video"], 1), 2)
    return result


KID_KEY = (0x31, bytes(range(16)))


async def call_through_sfu(loss: float, seconds: float, drain: float) -> CallResult:
    """Publisher and subscriber on one in-process media plane; the SFU's counters and its
    tap on the publisher's transport come straight from the engine."""
    return await _call_through_server("sfu", {}, loss, seconds, drain)


async def call_through_relay(loss: float, seconds: float, drain: float) -> CallResult:
    """The same call with `rtc.workers: 2` and the room spread over both workers: the
    publisher on worker 0, the subscriber on worker 1, the media crossing the relay between
    them. Every media packet faces the loss three times (publisher to worker 0, the relay,
    worker 1 to subscriber), and each hop's losses must be repaired on that hop. The SFU's
    counters come from /metrics (the engines live in the worker processes)."""
    env = {"SFU_RTC__WORKERS": "2", "SFU_RTC__ROOM_TRANSPORTS_PER_WORKER": "1"}
    return await _call_through_server("relay", env, loss, seconds, drain)


async def _call_through_server(
    mode: str, env: dict[str, str], loss: float, seconds: float, drain: float
) -> CallResult:
    from sfu.app import Server
    from sfu.client.e2ee import E2eeConfig
    from sfu.client.whip import publish, subscribe
    from tests.media.harness import make_config, metrics_text, token

    kid, key = KID_KEY
    tally = Tally()
    server = Server(make_config(**env))
    await server.start()
    in_process = mode == "sfu"

    async def counters() -> dict[str, float]:
        if in_process:
            # Read through the engine each time: that folds in what the native core counted.
            return dict(_sfu_counters(server.engine.stats))
        return _relay_counters(await metrics_text(server))

    try:
        publication = await publish(
            f"{server.url}/whip/room1/cam",
            token(server, identity="pub", publish=True),
            publisher_tracks(),
            E2eeConfig(send_kid=kid, send_key=key, on_frame=tally.on_sent),
        )
        subscription = await subscribe(
            f"{server.url}/whep/room1/cam",
            token(server, identity="sub", subscribe=True),
            E2eeConfig(receive_keys={kid: key}, on_frame=tally.on_received),
            on_track=tally.on_track,
        )
        tally.watch_arrivals(subscription.pc)
        if in_process:
            session = next(s for s in server.rooms.sessions.values() if s.kind == "whip")
            audio_pt = next(p.codec.payload_type for p in session.producers if p.kind == "audio")
            server.engine.transports[session.transport.id].packet_tap = tally.tap_sfu(audio_pt)
        try:
            await _wait(tally.ready, "the call to decode audio and video")
            before = await counters()
            await _measure(tally, loss, seconds, drain)
            after = await counters()
            packets = await _video_packets_sent(publication.pc)
        finally:
            await subscription.close()
            await publication.close()
    finally:
        await server.close()
    result = _result(mode, loss, seconds, tally, packets)
    result.sfu = {name: round(after[name] - before[name]) for name in after}
    if "relays" in after:
        result.sfu["relays"] = round(after["relays"])  # a gauge, not a count
    return result


def _relay_counters(text: str) -> dict[str, float]:
    from tests.media.harness import metric_value

    return {
        "relays": metric_value(text, "sfu_relays"),
        "relay_packets_sent": metric_value(text, "sfu_relay_packets_sent_total"),
        "nacks_received": metric_value(text, 'sfu_nacks_total{result="received"}'),
        "nacks_served": metric_value(text, 'sfu_nacks_total{result="served"}'),
        "nacks_missed": metric_value(text, 'sfu_nacks_total{result="missed"}'),
    }


def _sfu_counters(stats: Any) -> dict[str, int]:
    return {
        "nacks_received": stats.nacks_received,
        "nacks_served": stats.nacks_served,
        "nacks_missed": stats.nacks_missed,
        # Not resent: already resent within a round trip, too old, over the resend budget.
        "nacks_suppressed_rtt": stats.nacks_suppressed[0],
        "nacks_suppressed_old": stats.nacks_suppressed[1],
        "nacks_suppressed_budget": stats.nacks_suppressed[2],
        "rtx_sent": stats.rtx_sent[0],
        "audio_in": stats.by_kind["audio"][0],
        "audio_out": stats.by_kind["audio"][2],
        "video_in": stats.by_kind["video"][0],
        "video_out": stats.by_kind["video"][2],
    }


async def call_peer_to_peer(loss: float, seconds: float, drain: float) -> CallResult:
    """The same two aiortc peers, E2EE hooks and codecs, connected directly."""
    from aiortc import RTCPeerConnection

    from sfu.client.e2ee import E2eeConfig, E2eeContext
    from sfu.client.whip import prefer_offered_codecs

    kid, key = KID_KEY
    tally = Tally()
    sender = E2eeContext(E2eeConfig(send_kid=kid, send_key=key, on_frame=tally.on_sent))
    receiver = E2eeContext(E2eeConfig(receive_keys={kid: key}, on_frame=tally.on_received))
    pub, sub = RTCPeerConnection(), RTCPeerConnection()
    sub.on("track", tally.on_track)
    try:
        for track in publisher_tracks():
            transceiver = pub.addTransceiver(track, direction="sendonly")
            prefer_offered_codecs(transceiver)
            sender.attach_sender(transceiver.sender)
        await pub.setLocalDescription(await pub.createOffer())
        await sub.setRemoteDescription(pub.localDescription)
        for transceiver in sub.getTransceivers():
            receiver.attach_receiver(transceiver.receiver)
        await sub.setLocalDescription(await sub.createAnswer())
        await pub.setRemoteDescription(sub.localDescription)
        tally.watch_arrivals(sub)
        await _measure(tally, loss, seconds, drain)
        packets = await _video_packets_sent(pub)
    finally:
        await pub.close()
        await sub.close()
    return _result("p2p", loss, seconds, tally, packets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("sfu", "relay", "p2p"), required=True)
    parser.add_argument("--loss", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--drain", type=float, default=2.0)
    args = parser.parse_args(argv)
    # Loopback is all this namespace has, and aioice leaves it out (docs/testing.md); the
    # harness import patches that.
    import tests.media.harness  # noqa: F401

    run = {"sfu": call_through_sfu, "relay": call_through_relay, "p2p": call_peer_to_peer}[
        args.mode
    ]
    result = asyncio.run(run(args.loss, args.seconds, args.drain))
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
