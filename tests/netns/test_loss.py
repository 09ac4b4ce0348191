"""An end-to-end-encrypted call through the SFU with 10 % of all UDP datagrams dropped by the
kernel (tests/netns/losscall.py: a throwaway network namespace, iptables' statistic match).

Targets: at least 99 % of the video frames and 95 % of the audio frames the publisher sent
reach the subscriber's decoder, repaired by NACK and retransmission. Video meets its target.
Audio cannot, for a reason on the subscriber's side: aiortc's receiver never NACKs audio, and
its audio jitter buffer discards good packets around every gap, so with the same loss the same
two peers connected directly deliver as little (bench/loss.py; docs/performance.md, "Loss").
That target is kept, marked as an expected failure with that reason (strict: the day it passes,
the mark must go), and the SFU's own share of it is asserted on its own: every audio frame
reaches the SFU, which asks the publisher for what its hop lost, and the SFU forwards all of
it. One call of about 20 s serves all three tests.

A second call spreads the room over two media workers (`rtc.workers: 2`), so every packet also
crosses the relay between them, a third lossy hop whose losses the relay's ends repair between
themselves (the receiving end NACKs, the sending end resends from its cache).
"""

from __future__ import annotations

import pytest

from tests.conftest import IN_CI
from tests.netns.losscall import CallResult, run_in_namespace, unavailable_reason

pytestmark = pytest.mark.slow

LOSS = 0.10
SECONDS = 12.0


def _require_loss() -> None:
    reason = unavailable_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true runs as root; scripts/test.sh installs the tools)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def call() -> CallResult:
    _require_loss()
    result = run_in_namespace("sfu", LOSS, seconds=SECONDS, drain=2.0, timeout=50.0)
    # At 30 and 50 frames a second; far fewer would mean the call stalled, not loss.
    assert result.video.sent >= 0.9 * 30 * SECONDS, result
    assert result.audio.sent >= 0.9 * 50 * SECONDS, result
    return result


def test_video_frames_survive_10_percent_loss_through_the_sfu(call: CallResult) -> None:
    assert call.video.delivered >= 0.99 * call.video.sent, call


def test_the_sfu_repairs_and_forwards_all_audio_it_is_sent(call: CallResult) -> None:
    assert call.audio.at_sfu >= 0.99 * call.audio.sent, call
    assert call.sfu["audio_out"] >= call.sfu["audio_in"], call


@pytest.mark.xfail(
    strict=True,
    reason="aiortc's RTCRtpReceiver makes no NACK generator for audio, and its audio jitter "
    "buffer (16 packets, prefetch 4) drops complete packets around each gap: peer to peer, "
    "the same peers deliver about half the audio frames at 10 % loss (docs/performance.md, Loss)",
)
def test_audio_frames_survive_10_percent_loss_through_the_sfu(call: CallResult) -> None:
    assert call.audio.delivered >= 0.95 * call.audio.sent, call


def test_video_frames_survive_10_percent_loss_on_every_hop_across_a_worker_relay() -> None:
    _require_loss()
    call = run_in_namespace("relay", LOSS, seconds=SECONDS, drain=2.0, timeout=60.0)
    assert call.video.sent >= 0.9 * 30 * SECONDS, call
    # The media did cross a relay, and it was repaired on the way.
    assert call.sfu["relays"] == 1, call
    assert call.sfu["relay_packets_sent"] > 0, call
    assert call.sfu["nacks_served"] > 0, call
    assert call.video.delivered >= 0.99 * call.video.sent, call
