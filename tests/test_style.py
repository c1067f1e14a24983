"""The code base stays ruff-clean: lint and format are part of the suite, not a separate habit."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is a test dependency: pip install -e '.[test]'")
    # --no-cache: the checkout may be read-only (a cache under it cannot be written).
    result = subprocess.run([ruff, *args, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# The exporter's layers, lowest first: a module may import its own layer's package or a lower
# layer, never one above it (and never a sibling package of the same rank). A module in no layer
# fails the test, so a new one is placed on purpose.
LAYERS = {
    "base": (0, ("exporter", "exporter.errors", "exporter.supervisor", "exporter.flags")),
    "sources": (1, ("exporter.sources",)),
    "engines": (2, ("exporter.engines", "exporter.registry")),
    "snapshot": (3, ("exporter.snapshot",)),
    "exits": (4, ("exporter.exits",)),
    "sleep_wake": (4, ("exporter.sleep_wake",)),
    "gpu_probe": (4, ("exporter.gpu_probe",)),
    "pollers": (5, ("exporter.pollers",)),
    "collectors": (6, ("exporter.collectors",)),
    "web": (7, ("exporter.web",)),
    "cli": (8, ("exporter.cli", "exporter.runtime", "exporter.watcher", "exporter.demo", "exporter.__main__")),
}
MAX_MODULE_LINES = 300


def _layer(module: str) -> str | None:
    """The layer whose longest prefix names `module` ("exporter" alone is only the package itself)."""
    best, length = None, -1
    for name, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix != "exporter" and module.startswith(prefix + "."))
            if matches and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an exporter module in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names if name.split(".")[0] == "exporter"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "exporter"]
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _wrong_way(own: str, target: str) -> bool:
    """`own`'s layer may not import `target`: another package at the same rank or above."""
    theirs = _layer(target) or _layer(target.rsplit(".", 1)[0])  # `from exporter.x import name`: name is no module
    return theirs is not None and theirs != own and LAYERS[theirs][0] >= LAYERS[own][0]


def test_exporter_imports_go_one_way():
    wrong = []
    for path in sorted((ROOT / "exporter").rglob("*.py")):
        module = _module_name(path)
        own = _layer(module)
        if own is None:
            wrong.append(f"{module}: in no layer of tests/test_style.py LAYERS")
            continue
        wrong += [
            f"{path.relative_to(ROOT)}:{line}: {own} imports {target}, which is not below it"
            for line, target in _imports(path)
            if _wrong_way(own, target)
        ]
    assert not wrong, "\n".join(wrong)


def test_the_layering_rule_refuses_imports_up_and_sideways(tmp_path):
    """The rule itself, on a module written here: the checks above would pass vacuously if it never fired."""
    module = tmp_path / "up.py"
    module.write_text("from exporter.collectors.assembly import ResidencyCollector\n")
    ((_, target),) = _imports(module)[:1]
    assert _wrong_way("sources", target), "a source importing a collector goes up"
    assert not _wrong_way("web", target), "the web layer may use the collectors"
    assert _wrong_way("exits", "exporter.sleep_wake.states"), "a sibling at the same rank"
    assert not _wrong_way("exits", "exporter.exits.events.ExitEvent"), "its own package"
    assert _layer("exporter") == "base" and _layer("exporter.nope") is None


def test_no_module_over_300_lines():
    long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for folder in ("exporter", "gate", "gpu_residency_common", "fakenvml")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"split these by concern (at most {MAX_MODULE_LINES} lines a module):\n" + "\n".join(long)
