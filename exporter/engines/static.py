"""A static engine config file: the engines of a fixed deployment, found by a PID file or a fixed PID."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from exporter.engines.registry import EngineEntry, RegistryError


class ConfigError(ValueError):
    """A static engine config that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class StaticEngine:
    """An engine of a fixed deployment, found by a PID file or a fixed PID."""

    name: str
    kind: str
    url: str | None
    pid_file: str | None
    root_pid: int | None


def load_static_config(path: str) -> list[StaticEngine]:
    """Read `[[engines]]` tables (name, kind, url, pid_file | root_pid) from a TOML file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    tables = data.get("engines", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: 'engines' must be an array of tables ([[engines]])")
    engines = []
    for number, table in enumerate(tables, start=1):
        where = f"{path}: engines #{number}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(table) - {"name", "kind", "url", "pid_file", "root_pid"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if ("pid_file" in table) == ("root_pid" in table):
            raise ConfigError(f"{where}: give exactly one of pid_file or root_pid")
        try:
            # Validate name, kind and url with the registry's own rules.
            EngineEntry(
                name=table.get("name", ""),
                root_pid=table.get("root_pid", 1),
                kind=table.get("kind", "sglang"),
                url=table.get("url"),
            ).validate()
        except RegistryError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        engines.append(
            StaticEngine(
                name=table["name"],
                kind=table.get("kind", "sglang"),
                url=table.get("url"),
                pid_file=table.get("pid_file"),
                root_pid=table.get("root_pid"),
            )
        )
    names = [engine.name for engine in engines]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{path}: duplicate engine names {duplicates}")
    return engines


def pid_from_file(path: str) -> int | None:
    try:
        text = Path(path).read_text()[:64].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
