"""Documentation generated from code, so docs/configuration.md cannot drift from the model."""

from __future__ import annotations

from sfu.config import reference_rows


def config_reference_markdown() -> str:
    lines = [
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, kind, default, description in reference_rows():
        cells = (f"`{key}`", kind, f"`{default}`", description)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
