"""Helpers shared by the deployment tests: the metric catalogue of docs/metrics.md, and a
PromQL scan for the metric names an expression uses (tool lookup with the skip/fail rule is
tests/conftest.py's `tool`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def compose_volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a compose short-syntax volume, e.g. ./sfu.yaml:/etc/x:ro."""
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("rw")
    assert len(parts) == 3, f"unexpected volume syntax {spec!r}"
    return parts[0], parts[1], parts[2]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ---------------------------------------------------------------------------------------------
# docs/metrics.md is kept true to the code, so it is the catalogue panels and alerts may use.


class MetricCatalogue:
    def __init__(self, names: dict[str, str], prefixes: list[str]) -> None:
        self.names = names  # exact name -> type (counter, gauge, histogram)
        self.prefixes = prefixes  # `process_*` rows: families the client library defines

    def knows(self, name: str) -> bool:
        if name in self.names or any(name.startswith(p) for p in self.prefixes):
            return True
        # A histogram is queried through its series, never by its bare name.
        base, _, suffix = name.rpartition("_")
        return suffix in ("bucket", "sum", "count") and self.names.get(base) == "histogram"


def metric_catalogue(path: Path = ROOT / "docs" / "metrics.md") -> MetricCatalogue:
    names: dict[str, str] = {}
    prefixes: list[str] = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        kind = cells[1]
        # A row may name several families: `python_info`, `python_gc_*`.
        for name in re.findall(r"`([a-zA-Z_:][a-zA-Z0-9_:]*\*?)`", cells[0]):
            if name.endswith("*"):
                prefixes.append(name[:-1])
            else:
                names[name] = kind
    assert len(names) > 10, f"could not read the metric table in {path}"
    return MetricCatalogue(names, prefixes)


# Series Prometheus makes itself for every target; no exporter defines them.
SYNTHETIC_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or values, durations or numbers. Deliberately simple (no full parser): the
    expressions checked are ours, and test_metric_scan_catches_unknown_names pins it."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries, e.g. [$__rate_interval]
    # Label lists of aggregations and vector matching.
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if word.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names
