"""Active speaker from the RFC 6464 audio-level header extension alone (no payload access).

Each audio producer sums the loudness (127 - level in -dBov) of its packets; every interval
the room's detector turns the sums into a smoothed loudness per participant and picks a
dominant speaker with hysteresis, so a cough or a crossfade does not make the UI flap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

SMOOTHING = 0.5  # weight of the newest interval in the moving average
SPEAKING = 40.0  # loudness (127 - dBov) above which someone counts as speaking (~ -87 dBov)
MARGIN = 6.0  # a challenger must be this much louder than the current speaker...
CONFIRM = 2  # ...for this many intervals in a row
SILENCE = 3  # intervals of nobody speaking before the speaker list empties


class LevelSource(Protocol):
    def take_levels(self) -> tuple[int, int]: ...


class SpeakerDetector:
    def __init__(self) -> None:
        self.loudness: dict[str, float] = {}
        self.dominant: str | None = None
        self._challenger: str | None = None
        self._challenge_count = 0
        self._quiet = 0

    def update(self, sources: Mapping[str, Sequence[LevelSource]], now: float) -> list[str] | None:
        """Feed one interval; returns the new speaker list when the dominant one changed."""
        for pid, producers in sources.items():
            total = count = 0
            for producer in producers:
                s, c = producer.take_levels()
                total += s
                count += c
            current = total / count if count else 0.0
            previous = self.loudness.get(pid, 0.0)
            self.loudness[pid] = previous + SMOOTHING * (current - previous)
        for pid in list(self.loudness):
            if pid not in sources:
                del self.loudness[pid]
                if self.dominant == pid:
                    self.dominant = None
        speaking = sorted(
            (pid for pid, value in self.loudness.items() if value >= SPEAKING),
            key=lambda pid: -self.loudness[pid],
        )
        if not speaking:
            self._quiet += 1
            if self.dominant is not None and self._quiet >= SILENCE:
                self.dominant = None
                return []
            return None
        self._quiet = 0
        loudest = speaking[0]
        if self.dominant is None or self.dominant not in self.loudness:
            self.dominant = loudest
            return speaking
        if loudest == self.dominant:
            self._challenger, self._challenge_count = None, 0
            return None
        if self.loudness[loudest] < self.loudness[self.dominant] + MARGIN:
            return None
        if loudest != self._challenger:
            self._challenger, self._challenge_count = loudest, 0
        self._challenge_count += 1
        if self._challenge_count >= CONFIRM:
            self.dominant = loudest
            self._challenger, self._challenge_count = None, 0
            return speaking
        return None
