"""The engine registry: how a framework tells the exporter which processes are engines.

Framework side (standard library only, safe to import anywhere)::

    from exporter.registry import registered_engine
    with registered_engine("rollout-0", root_pid=proc.pid, url="http://127.0.0.1:30000"):
        ...

One JSON file per engine in a directory (a hostPath shared with the exporter), written
atomically (temporary file + rename) so the exporter never reads half an entry. The
entry records the writer's PID namespace and the root's start time, so the exporter
can find the process from another container and tell it from a later process that
reuses the PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from exporter.sources.proctable import own_namespace, read_proc
from gpu_residency_common.files import UntrustedFileError, ensure_dir, parse_json_as, read_untrusted, write_atomic

DEFAULT_DIR = "/run/gpu-residency/engines"
REGISTRY_ENV = "GPU_RESIDENCY_REGISTRY"
ADVERTISE_ENV = "POD_IP"  # Kubernetes' downward API: the address other pods reach this one at
ENTRY_SUFFIX = ".json"
MAX_ENTRY_BYTES = 64 * 1024
MAX_URL_CHARS = 2048
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
KINDS = ("sglang", "vllm", "trainer", "other")
STATES = ("starting", "active", "asleep", "stopped")


class RegistryError(ValueError):
    """An entry that is invalid, with a message that says which field and why; `reason` is the
    error counter's label (malformed, too_large, refused, unreadable, name_mismatch)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EngineEntry:
    name: str
    root_pid: int
    kind: str = "sglang"
    url: str | None = None
    pid_ns: int | None = None  # inode of the writer's PID namespace
    start_ticks: int | None = None  # the root's start time, against PID reuse
    net_ns: int | None = None  # inode of the writer's network namespace (whose loopback `url` may name)
    advertise_host: str | None = None  # the writer's address for other network namespaces ($POD_IP)
    state: str | None = None  # starting | active | asleep | stopped, as the framework says
    state_since: float | None = None  # wall-clock time of the last state change

    def validate(self) -> EngineEntry:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise RegistryError(f"engine name {self.name!r} must match {NAME_PATTERN.pattern}")
        if isinstance(self.root_pid, bool) or not isinstance(self.root_pid, int) or self.root_pid <= 0:
            raise RegistryError(f"root_pid {self.root_pid!r} must be a positive integer")
        if self.kind not in KINDS:
            raise RegistryError(f"kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if self.url is not None and (not isinstance(self.url, str) or len(self.url) > MAX_URL_CHARS):
            raise RegistryError(f"url must be a string of at most {MAX_URL_CHARS} characters")
        if self.advertise_host is not None:
            try:
                ipaddress.ip_address(self.advertise_host)
            except (TypeError, ValueError):
                raise RegistryError(f"advertise_host {self.advertise_host!r} must be an IP address") from None
        for key in ("pid_ns", "start_ticks", "net_ns"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise RegistryError(f"{key} must be an integer")
        if self.state is not None and self.state not in STATES:
            raise RegistryError(f"state {self.state!r} must be one of {', '.join(STATES)}")
        since = self.state_since
        if since is not None and (isinstance(since, bool) or not isinstance(since, int | float) or since != since):
            raise RegistryError("state_since must be a number")
        return self

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineEntry:
        data = parse_json_as(RegistryError, text)
        if not isinstance(data, dict):
            raise RegistryError("an entry must be a JSON object")
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        try:
            return cls(**known).validate()
        except TypeError as exc:  # a missing required field
            raise RegistryError(str(exc)) from None


def registry_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get(REGISTRY_ENV) or DEFAULT_DIR)


def read_entry(path: Path) -> EngineEntry:
    """One entry file, read as untrusted input (no symlinks, regular file, bounded).

    An entry is valid only in the file named after its engine (`<name>.json`): in a shared (1777)
    registry the sticky bit keeps another user from replacing that file, and a second file claiming
    the name must not take the engine over (reason name_mismatch)."""
    try:
        entry = EngineEntry.from_json(read_untrusted(path, MAX_ENTRY_BYTES).data)
    except UntrustedFileError as exc:
        if exc.reason == "missing":
            raise FileNotFoundError(str(exc)) from None
        raise RegistryError(str(exc), exc.reason) from None
    if path.name != f"{entry.name}{ENTRY_SUFFIX}":
        raise RegistryError(
            f"engine {entry.name!r} may only be registered in {entry.name}{ENTRY_SUFFIX}", "name_mismatch"
        )
    return entry


def register_engine(
    name: str,
    root_pid: int | None = None,
    url: str | None = None,
    kind: str = "sglang",
    directory: str | os.PathLike | None = None,
    state: str | None = None,
    advertise_host: str | None = None,
) -> Path:
    """Record an engine whose process tree (root and all descendants) the exporter attributes.

    `root_pid` is the engine's launch process as this process sees it (default: this one).
    `state` (optional) starts the engine's sleep/wake tracking, e.g. "starting".
    `advertise_host` (default $POD_IP): where an exporter in another network namespace
    reaches a `url` written with a loopback host; the engine must listen there too.
    """
    pid = os.getpid() if root_pid is None else root_pid
    entry = EngineEntry(
        name=name,
        root_pid=pid,
        kind=kind,
        url=url,
        pid_ns=own_namespace("pid"),
        start_ticks=info.start_ticks if (info := read_proc(pid)) else None,
        net_ns=own_namespace("net"),
        advertise_host=advertise_host or os.environ.get(ADVERTISE_ENV) or None,
        state=state,
        state_since=time.time() if state else None,
    ).validate()
    return _write_entry(ensure_dir(registry_dir(directory)), entry)


def _write_entry(folder: Path, entry: EngineEntry) -> Path:
    path = folder / f"{entry.name}{ENTRY_SUFFIX}"
    write_atomic(path, json.dumps(asdict(entry)))
    return path


def set_engine_state(name: str, state: str, directory: str | os.PathLike | None = None) -> EngineEntry:
    """Record that the engine is now `state` (starting | active | asleep | stopped).

    Call it right after /release_memory_occupation returned ("asleep") and after
    /resume_memory_occupation ("active"): the exporter measures, from this moment, how
    long the memory takes to really go (or come back).
    """
    folder = registry_dir(directory)
    path = folder / f"{name}{ENTRY_SUFFIX}"
    try:
        entry = read_entry(path)
    except FileNotFoundError:
        raise RegistryError(f"engine {name!r} is not registered in {folder}") from None
    updated = dataclasses.replace(entry, state=state, state_since=time.time()).validate()
    _write_entry(folder, updated)
    return updated


@contextlib.contextmanager
def engine_asleep(name: str, directory: str | os.PathLike | None = None) -> Iterator[None]:
    """Mark the engine asleep for the block (after its release), active again after it.

    requests.post(f"{url}/release_memory_occupation")
    with engine_asleep("rollout-0"):
        train_step()
        requests.post(f"{url}/resume_memory_occupation")
    """
    set_engine_state(name, "asleep", directory)
    try:
        yield
    finally:
        set_engine_state(name, "active", directory)


def unregister_engine(name: str, directory: str | os.PathLike | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        (registry_dir(directory) / f"{name}{ENTRY_SUFFIX}").unlink()


@contextlib.contextmanager
def registered_engine(name: str, **kwargs) -> Iterator[Path]:
    """Register for the duration of a block; unregister however the block ends."""
    path = register_engine(name, **kwargs)
    try:
        yield path
    finally:
        unregister_engine(name, kwargs.get("directory"))
