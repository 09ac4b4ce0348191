"""Fixtures for the in-process engine tests (see harness.py)."""

from __future__ import annotations

import pytest

from tests.engine.harness import EngineHarness


@pytest.fixture
def harness() -> EngineHarness:
    return EngineHarness()
