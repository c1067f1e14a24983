"""docs/BENCHMARKS.md is written by several benchmarks, each run on its own: each owns one section
between `<!-- NAME:begin -->` and `<!-- NAME:end -->` and replaces only that."""

from __future__ import annotations

from pathlib import Path

TITLE = "# Benchmarks\n"


def splice(document: Path, name: str, text: str) -> None:
    """Put `text` in place of section `name` of `document` (at its end if it has none); the rest stays."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = document.read_text() if document.exists() else TITLE
    section = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    document.write_text(current)
