"""Fixtures for the in-process engine tests (see harness.py)."""

from __future__ import annotations

import pytest

from sfu.media.fastpath import probe
from tests.conftest import IN_CI
from tests.engine import harness as harness_module
from tests.engine.harness import EngineHarness


def native_core_built() -> bool:
    return probe()[0] is not None


@pytest.fixture(autouse=True, params=["native", "python"])
def forwarding_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every engine test runs on both forwarding paths: the native core and pure Python."""
    path: str = request.param
    if path == "native" and not native_core_built():
        if IN_CI:
            pytest.fail("the native fast path is not built (scripts/test.sh builds it)")
        pytest.skip("the native fast path is not built here")
    monkeypatch.setattr(harness_module, "DEFAULT_FASTPATH", "auto" if path == "native" else "off")
    return path


@pytest.fixture
def harness() -> EngineHarness:
    return EngineHarness()
