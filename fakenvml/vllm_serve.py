"""The fake vLLM (fakenvml/vllm.py) standing in for `vllm serve`, as a process.

`python -m fakenvml.vllm_serve serve MODEL --port P [--tensor-parallel-size N]` serves on P and
starts its engine's process tree as vLLM does (`VLLM::EngineCore`, which holds the GPU memory at
TP=1, or its `VLLM::Worker_TP<i>` children), prints its URL, then one line per GPU-holding
process: its PID. It exits when the process that started it goes away. `console_script(dir)`
writes a `vllm` script, so the command line is `<python> <dir>/vllm serve ...` like a real
install's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fakenvml.fake_http import stop_process
from fakenvml.interpreter import shebang_python
from fakenvml.vllm import MODEL, VERSIONS, FakeVllm


def console_script(directory: Path) -> Path:
    """A `vllm` console script running this fake, as pip installs vLLM's (a Python shebang)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "vllm"
    script.write_text(f"#!{shebang_python()}\nimport sys\nfrom fakenvml.vllm_serve import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


@dataclass
class VllmProcess:
    """A started fake `vllm serve`: the process, its URL and the PIDs that hold GPU memory."""

    proc: subprocess.Popen
    url: str
    workers: list[int]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def launch(args: list[str], script: Path | None = None, dev_mode: bool = True, timeout: float = 30.0) -> VllmProcess:
    """Start `vllm serve ARGS` (through `script`, else `python -m fakenvml.vllm_serve`); wait for its URL and PIDs."""
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1" if dev_mode else "0")
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    # The script is executed itself: the kernel runs its shebang's interpreter, argv [python, script, ...], comm "vllm".
    command = [str(script)] if script else [sys.executable, "-m", "fakenvml.vllm_serve"]
    proc = subprocess.Popen([*command, "serve", *args], stdout=subprocess.PIPE, text=True, env=env)
    ready = threading.Event()
    lines: list[str] = []

    def read() -> None:
        lines.append(proc.stdout.readline().strip())
        count = int(lines[0].split()[1]) if lines[0] else 0
        lines.extend(proc.stdout.readline().strip() for _ in range(count))
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not lines[0]:
        proc.kill()
        raise RuntimeError(f"fake vllm serve did not start: {lines}")
    return VllmProcess(proc, lines[0].split()[0], [int(line) for line in lines[1:]])


def _rank_of(pid: int) -> int:
    """The rank in a worker's title (VLLM::Worker_TP1 -> 1), which it set before printing its PID."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    digits = title[len(title.rstrip("0123456789")) :]
    return int(digits) if digits else 0


def main(argv: list[str] | None = None) -> int:
    """`vllm serve [MODEL] [--host H] [--port P] [--tensor-parallel-size N]`, fake: prints '<url> <n>' then n PIDs."""
    from fakenvml.tree import start as start_tree

    parser = argparse.ArgumentParser(
        prog="vllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model", nargs="?", default=MODEL)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--fake-version", choices=VERSIONS, default="0.11.1")
    parser.add_argument("--fake-mode", default="ok")
    parser.add_argument("--fake-lifetime", type=float, default=300.0)
    parser.add_argument("--fake-op-seconds", type=float, default=0.0, help="how long each sleep-mode call takes")
    parser.add_argument("--fake-fail-first", action="store_true", help="the first sleep-mode call fails (HTTP 500)")
    args = parser.parse_args(argv)
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE", "0") == "1"
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host  # the fake stays on loopback
    server = FakeVllm(args.fake_version, args.fake_mode, args.data_parallel_size, dev_mode, host, args.port, None)
    server.op_seconds = args.fake_op_seconds
    server.fail_next = args.fake_fail_first
    tp = args.tensor_parallel_size
    if tp > 1:  # the engine core's workers hold the memory
        tree = start_tree(tp, depth=1, title="VLLM::Worker_TP{rank}", max_seconds=args.fake_lifetime,
                          parent_title="VLLM::EngineCore")  # fmt: skip
    else:  # the model runs inside the engine core
        tree = start_tree(1, depth=0, title="VLLM::EngineCore", max_seconds=args.fake_lifetime)
    print(f"{server.url} {len(tree.leaves)}", flush=True)
    for pid in sorted(tree.leaves, key=_rank_of):  # leaves print in any order; ranks in order here
        print(pid, flush=True)
    # A plain flag: Event.set() from a signal handler can deadlock against Event.wait().
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    deadline, parent = time.monotonic() + args.fake_lifetime, os.getppid()
    while not stopping and time.monotonic() < deadline and os.getppid() == parent:  # never outlives its starter
        time.sleep(0.2)
    tree.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
