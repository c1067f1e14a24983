"""docs/SECURITY.md says what the exporter reads of other processes, and how much: the table is
held to the code's own constants and names, so neither can drift alone."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import ROOT

from exporter.sources import proctable
from gpu_residency_common.holders import MAX_NAME, TITLE_PREFIXES

DOC = (ROOT / "docs" / "SECURITY.md").read_text()
ROWS = [line for line in DOC.split("## What the exporter reads", 1)[1].splitlines() if line.startswith("| ")]


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} bytes"


def _row(reader: str) -> list[str]:
    (row,) = [row for row in ROWS if f"`{reader}`" in row.split(" | ")[1]]
    return [cell.strip() for cell in row.strip("|").split(" | ")]


@pytest.mark.parametrize(
    "reader, limit",
    [
        ("proctable.read_proc", proctable.STAT_BYTES),
        ("proctable.read_nspid", proctable.STATUS_BYTES),
        ("ProcView.title", proctable.TITLE_BYTES),
        ("ProcView.launchers", proctable.LAUNCHER_ARGV_BYTES),
        ("proctable.read_argv", proctable.DISCOVERY_ARGV_BYTES),
        ("ProcView.cgroup", proctable.CGROUP_BYTES),
    ],
)
def test_each_proc_read_is_documented_with_the_codes_limit(reader, limit):
    what = _row(reader)[0]
    assert f"first {_size(limit)}" in what or f"up to {_size(limit)}" in what, (reader, what)


def test_the_titles_that_become_labels_are_the_codes():
    row = " ".join(_row("ProcView.title"))
    assert all(f"`{prefix}`" in row for prefix in TITLE_PREFIXES), TITLE_PREFIXES
    assert f"cut at {MAX_NAME}" in row and "every GPU process" in row


def test_every_reader_the_table_names_exists():
    for name in re.findall(r"`(proctable\.\w+|ProcView\.\w+)`", "\n".join(ROWS)):
        owner, attribute = name.split(".")
        assert hasattr(proctable if owner == "proctable" else proctable.ProcView, attribute), name


def test_every_proc_read_has_a_named_limit():
    tree = ast.parse((ROOT / "exporter" / "sources" / "proctable.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") in
             ("_read", "_read_bytes")]  # fmt: skip
    limits = {node.args[1].id for node in calls if isinstance(node.args[1], ast.Name)}
    assert len(calls) >= 6 and all(isinstance(node.args[1], ast.Name) for node in calls)
    assert limits <= {"limit", *[name for name in vars(proctable) if name.endswith("_BYTES")]}, limits
