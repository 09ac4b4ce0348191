"""Long fuzzing runs of every parser that sees client input.

Run: python bench/fuzz.py [--inputs N] [--parser NAME ...] [--seed S]
     python bench/fuzz.py --parser NAME --replay FILE   (re-run one saved input)

The targets, generators and properties are the ones tests/fuzz runs under hypothesis
(tests/fuzz/targets.py); hypothesis manages a few thousand inputs a minute, so this driver
feeds them from a seeded `random.Random` instead: a corpus of generated messages per parser,
mutated (truncations, bit flips, bad length fields, splices), plus fresh messages and noise.
The same seed gives the same inputs.

Per parser it reports inputs run, how many were accepted, the distinct refusals (the
documented error's messages, and a normalised count with numbers and quoted values folded),
unexpected exceptions and failed properties (each distinct one written with its input to
--out as a reproducer), the slowest input (and its time when run again on its own, which
tells a slow input from a busy machine; the input is saved too), and the peak RSS of the
process after the parser ran together with the RSS growth during its run. Exit status 1
when anything unexpected happened, 3 when an input hung.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import random
import re
import resource
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz.mutation import RandomChooser, between, mutate
from tests.fuzz.targets import MAX_NOISE, TARGETS, Outcome, Target

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fuzz"
CORPUS_SIZE = 512
# Kept per parser, so that a parser refusing with ever-new text cannot exhaust memory here.
DEFAULT_MAX_DISTINCT = 100_000
RETIMES = 5
MAX_REPRODUCERS = 20
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Folding for the normalised count: "payload type 300" and "payload type 301" are one message.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+")


def normalise(message: str) -> str:
    return _NUMBER.sub("N", _QUOTED.sub("'…'", message))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class Report:
    parser: str
    source: str
    documented: str
    inputs: int = 0
    accepted: int = 0
    refusals: int = 0
    distinct_refusals: set[str] = field(default_factory=set)
    normalised_refusals: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    findings: dict[str, str] = field(default_factory=dict)  # kind -> reproducer path
    slowest_us: float = 0.0
    slowest_again_us: float = 0.0
    slowest_input: bytes = b""
    seconds: float = 0.0
    rss_growth: int = 0
    peak_rss: int = 0

    def summary(self) -> dict[str, object]:
        top = sorted(self.normalised_refusals.items(), key=lambda kv: -kv[1])[:10]
        return {
            "parser": self.parser,
            "source": self.source,
            "documented_error": self.documented,
            "inputs": self.inputs,
            "accepted": self.accepted,
            "refusals": self.refusals,
            "distinct_refusal_messages": len(self.distinct_refusals),
            "distinct_refusal_messages_normalised": len(self.normalised_refusals),
            "most_frequent_refusals": top,
            "unexpected_exceptions": self.unexpected,
            "reproducers": self.findings,
            "slowest_input_us": round(self.slowest_us, 1),
            "slowest_input_run_again_us": round(self.slowest_again_us, 1),
            "seconds": round(self.seconds, 1),
            "rss_growth_mib": round(self.rss_growth / 2**20, 1),
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
        }


class Watchdog:
    """Ends the run when one input takes `seconds`: saves that input, dumps every thread's
    stack and exits 3. A hang inside C code that holds the GIL starves this thread, so
    faulthandler's own timer (re-armed as inputs complete) is the backstop."""

    def __init__(self, seconds: float, out: Path) -> None:
        self.seconds = seconds
        self.out = out
        self.done = 0
        self.current = b""
        self.parser = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def rearm(self) -> None:
        faulthandler.dump_traceback_later(self.seconds * 3, exit=True)

    def _watch(self) -> None:
        last, since = -1, time.monotonic()
        while not self._stop.wait(1.0):
            if self.done != last:
                last, since = self.done, time.monotonic()
                continue
            if time.monotonic() - since >= self.seconds:
                path = self.out / f"{self.parser}-hang.bin"
                path.write_bytes(self.current)
                print(f"\n{self.parser}: no result after {self.seconds} s; input in {path}")
                faulthandler.dump_traceback(all_threads=True)
                os._exit(3)


def save_reproducer(out: Path, parser: str, kind: str, data: bytes, text: str) -> Path:
    path = out / f"{parser}-{zlib.crc32(kind.encode()):08x}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(
        f"{text}\nreplay: python bench/fuzz.py --parser {parser} --replay {path}\n"
    )
    return path


def retime(target: Target, data: bytes) -> float:
    """The best of a few runs of one input, in µs."""
    best = float("inf")
    for _ in range(RETIMES):
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # already reported when it first ran
            target.run(data, Outcome())
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def fuzz(
    target: Target, inputs: int, seed: int, out: Path, watchdog: Watchdog, max_distinct: int
) -> Report:
    rng = random.Random(f"{seed}:{target.name}")
    c = RandomChooser(rng)
    report = Report(target.name, target.source, target.documented)
    corpus = [target.generate(c) for _ in range(CORPUS_SIZE)]
    watchdog.parser = target.name
    rss_before = rss_bytes()
    started = time.perf_counter()
    perf = time.perf_counter
    for n in range(inputs):
        roll = rng.randrange(100)
        if roll < 5:
            data = rng.randbytes(rng.randrange(MAX_NOISE + 1))
        elif roll < 20:
            # Fresh messages keep the corpus from settling on its first few hundred shapes.
            data = target.generate(c)
            corpus[rng.randrange(CORPUS_SIZE)] = data
        elif roll < 30:
            data = corpus[rng.randrange(CORPUS_SIZE)]
        else:
            data = mutate(c, corpus[rng.randrange(CORPUS_SIZE)], between(c, 1, 4))
        watchdog.current = data
        outcome = Outcome()
        t0 = perf()
        try:
            accepted = target.run(data, outcome)
        except Exception as exc:
            accepted = False
            report.unexpected += 1
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            kind = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            if kind not in report.findings and len(report.findings) < MAX_REPRODUCERS:
                text = "".join(traceback.format_exception(exc))
                report.findings[kind] = str(save_reproducer(out, target.name, kind, data, text))
                print(f"  {target.name}: {kind}: {exc!s:.200}", flush=True)
        elapsed = (perf() - t0) * 1e6
        if elapsed > report.slowest_us:
            report.slowest_us = elapsed
            report.slowest_input = data
        report.accepted += accepted
        for message in outcome.refusals:
            report.refusals += 1
            if len(report.distinct_refusals) < max_distinct:
                report.distinct_refusals.add(message)
            folded = normalise(message)
            if (
                folded in report.normalised_refusals
                or len(report.normalised_refusals) < max_distinct
            ):
                report.normalised_refusals[folded] = report.normalised_refusals.get(folded, 0) + 1
        watchdog.done = n
        if n % 1000 == 0:
            watchdog.rearm()
    report.inputs = inputs
    report.seconds = time.perf_counter() - started
    report.rss_growth = rss_bytes() - rss_before
    report.peak_rss = peak_rss_bytes()
    report.slowest_again_us = retime(target, report.slowest_input)
    (out / f"{target.name}-slowest.bin").write_bytes(report.slowest_input)
    return report


def replay(target: Target, path: Path) -> int:
    outcome = Outcome()
    try:
        accepted = target.run(path.read_bytes(), outcome)
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{target.name}: accepted={accepted} refusals={outcome.refusals}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per parser")
    parser.add_argument(
        "--parser",
        action="append",
        choices=sorted(TARGETS),
        help="parser to fuzz (repeatable; default: all)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="reproducers and summary")
    parser.add_argument("--hang-seconds", type=float, default=10.0)
    parser.add_argument(
        "--max-distinct",
        type=int,
        default=DEFAULT_MAX_DISTINCT,
        help="distinct refusal messages kept per parser (they cost memory)",
    )
    parser.add_argument("--replay", type=Path, help="run one saved input and show the error")
    args = parser.parse_args()
    names = args.parser or list(TARGETS)
    if args.replay:
        if len(names) != 1:
            parser.error("--replay needs exactly one --parser")
        return replay(TARGETS[names[0]], args.replay)

    args.out.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(args.hang_seconds, args.out)
    watchdog.start()
    started = time.perf_counter()
    reports = []
    print(
        f"{'parser':<10}{'inputs':>10}{'accepted':>10}{'rejected':>10}{'distinct':>10}"
        f"{'folded':>8}{'unexp.':>8}{'slowest':>10}{'again':>8}{'seconds':>9}{'RSS+':>8}"
        f"{'peak':>8}"
    )
    for name in names:
        report = fuzz(TARGETS[name], args.inputs, args.seed, args.out, watchdog, args.max_distinct)
        reports.append(report)
        print(
            f"{name:<10}{report.inputs:>10}{report.accepted:>10}"
            f"{report.inputs - report.accepted:>10}"
            f"{len(report.distinct_refusals):>10}{len(report.normalised_refusals):>8}"
            f"{report.unexpected:>8}{report.slowest_us:>8.0f}µs"
            f"{report.slowest_again_us:>6.0f}µs{report.seconds:>9.0f}"
            f"{report.rss_growth / 2**20:>6.1f}Mi{report.peak_rss / 2**20:>6.0f}Mi",
            flush=True,
        )
    watchdog.stop()
    total = time.perf_counter() - started
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "seconds": round(total, 1),
        "parsers": [r.summary() for r in reports],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"total {total:.0f} s; summary in {args.out / 'summary.json'}")
    return 1 if any(r.unexpected for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
