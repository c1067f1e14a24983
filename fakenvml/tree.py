"""A real process tree standing in for an engine: root -> ... -> leaves that "hold" GPU memory.

    python -m fakenvml.tree --depth 2 --leaves 2 --title 'sglang::scheduler_TP{rank}'

starts a chain `depth` levels deep whose last level has `leaves` processes, each titled
with the real setproctitle package as SGLang, vLLM and Ray title theirs (`{rank}` in the
title becomes the leaf's index: sglang::scheduler_TP0, sglang::scheduler_TP1, ...), and
prints one line per leaf: its PID. `--parent-title` titles the leaves' parent too (vLLM's
`VLLM::EngineCore` above its `VLLM::Worker_TP0`, `VLLM::Worker_TP1`). Without setproctitle (an
interpreter that lacks it) only the 15-byte comm is set. Every process exits when its parent
goes away, on SIGTERM, or after --max-seconds, so nothing outlives the test or demo that
started it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_NAME = 15


@dataclass
class Tree:
    """A started tree: its root process and the PIDs of its leaves (the grandchildren)."""

    root: subprocess.Popen
    leaves: list[int]

    @property
    def pid(self) -> int:
        return self.root.pid

    def stop(self) -> None:
        self.root.terminate()
        self.root.wait(timeout=10)


SGLANG_SCHEDULER = "sglang::scheduler_TP{rank}"


def start(
    leaves: int = 1,
    depth: int = 2,
    title: str = SGLANG_SCHEDULER,
    max_seconds: float = 3600.0,
    parent_title: str | None = None,
) -> Tree:
    """Start a tree (for tests, the demo and benchmarks) and wait for its leaves' PIDs."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "fakenvml.tree", "--depth", str(depth), "--leaves", str(leaves),
               "--title", title, "--max-seconds", str(max_seconds)]  # fmt: skip
    if parent_title:
        command += ["--parent-title", parent_title]
    root = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    return Tree(root, [int(root.stdout.readline()) for _ in range(leaves)])


def _set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)
        return
    setproctitle.setproctitle(title)  # cmdline becomes the title; comm its first 15 bytes


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fakenvml.tree", *args], stdout=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2, help="levels below this process (0: this is a leaf)")
    parser.add_argument("--leaves", type=int, default=1, help="processes at the last level")
    parser.add_argument("--title", default=SGLANG_SCHEDULER, help="leaf title; {rank} becomes the leaf's index")
    parser.add_argument("--parent-title", help="title of the leaves' parent (default: untitled)")
    parser.add_argument("--leaf-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)

    parent = os.getppid()
    children: list[subprocess.Popen] = []
    common = ["--title", args.title, "--max-seconds", str(args.max_seconds)]
    if args.depth > 1:
        titled = ["--parent-title", args.parent_title] if args.parent_title else []
        children.append(_spawn(["--depth", str(args.depth - 1), "--leaves", str(args.leaves), *common, *titled]))
    elif args.depth == 1:
        if args.parent_title:
            _set_title(args.parent_title)
        for index in range(args.leaves):
            children.append(_spawn(["--depth", "0", "--leaf-index", str(index), *common]))
    else:
        _set_title(args.title.replace("{rank}", str(args.leaf_index)))
        os.write(sys.stdout.fileno(), f"{os.getpid()}\n".encode())  # one write: lines never interleave

    # A plain flag: Event.set() from a signal handler can deadlock against Event.wait().
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    deadline = time.monotonic() + args.max_seconds
    while not stopping and time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.2)
    for child in children:
        child.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
