"""Hypothesis side of the fuzzers: the settings profile, the `inputs` strategy over the shared
generators, and `run_target`, which runs one input under a hang guard.

Budget: `BLINDFOLD_FUZZ_EXAMPLES` (default 100) examples per fuzz test, which keeps the whole
directory well inside 20 s on two busy cores. Raise it for a deeper local run, e.g.
`BLINDFOLD_FUZZ_EXAMPLES=5000 pytest tests/fuzz -q`; bench/fuzz.py is the long run.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.fuzz.targets import MAX_NOISE, TARGETS, Outcome, make_input

EXAMPLES_ENV = "BLINDFOLD_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 100
# A parser stuck in a loop never returns, so hypothesis's deadline (which times examples that
# finish) cannot see it; this alarm turns it into an exception hypothesis can shrink.
HANG_SECONDS = 5.0

settings.register_profile(
    "blindfold-fuzz",
    max_examples=int(os.environ.get(EXAMPLES_ENV, DEFAULT_EXAMPLES)),
    # Parsers take microseconds and the slowest target (a DTLS handshake) a few ms; a second
    # means superlinear work, yet never trips on a loaded CI machine.
    deadline=timedelta(seconds=1),
    # The structured inputs draw many small choices; that is their point, not a slow test.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
FUZZ = settings(settings.get_profile("blindfold-fuzz"))


class HypothesisChooser:
    """A `tests.fuzz.mutation.Chooser` over hypothesis draws, so failures shrink."""

    __slots__ = ("_draw",)

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw

    def below(self, n: int) -> int:
        return self._draw(st.integers(0, n - 1))

    def raw(self, n: int) -> bytes:
        return self._draw(st.binary(min_size=n, max_size=n))


def inputs(name: str) -> st.SearchStrategy[bytes]:
    """Inputs for target `name`: generated, generated then mutated, or plain noise."""
    target = TARGETS[name]

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        return make_input(target, HypothesisChooser(draw))

    return st.one_of(build(), st.binary(max_size=MAX_NOISE))


@contextmanager
def hang_guard(seconds: float = HANG_SECONDS) -> Iterator[None]:
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"no result after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_target(name: str, data: bytes) -> Outcome:
    """Run target `name` on `data`: its documented errors are caught and recorded; anything
    else, a failed property included, propagates to hypothesis."""
    out = Outcome()
    with hang_guard():
        TARGETS[name].run(data, out)
    return out
