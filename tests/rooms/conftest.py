"""Fixtures for room-protocol tests: a real SFU in process, aiortc participants."""

from tests.media.harness import sfu

__all__ = ["sfu"]
