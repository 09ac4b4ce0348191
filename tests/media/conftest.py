"""Fixtures for media-plane tests (see harness.py)."""

from tests.media.harness import sfu

__all__ = ["sfu"]
