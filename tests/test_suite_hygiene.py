"""The suite's own guarantees: nothing it starts outlives it, CI runs exactly the README's command, and every
test the docs cite exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, SESSION_MARK

LEAKY_TEST = """
import subprocess, sys

def test_forgets_its_child():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "leaked-by-a-test"])
"""


def test_a_process_that_outlives_the_session_fails_the_run_and_is_named(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    env["GPU_RESIDENCY_LEFTOVER_GRACE_S"] = "1"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cloudcoil", "-p", "conftest",
         "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout, "the test itself passed: the leftover alone fails the run"
    assert "outlived the session" in result.stdout and "leaked-by-a-test" in result.stdout, result.stdout
    assert time.monotonic() - started < 50, "the leftover was killed, not waited out"
    assert [pid for pid in os.listdir("/proc") if b"leaked-by-a-test" in _cmdline(pid)] == [], "it kills what it names"


def _cmdline(pid: str) -> bytes:
    """A process's command line; empty when it is not a process or left before it was read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() if pid.isdigit() else b""
    except OSError:
        return b""


def test_every_process_started_here_carries_the_session_mark():
    child = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ.get({SESSION_MARK!r}, ''))"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert child.stdout.strip() == os.environ[SESSION_MARK] != ""


def test_ci_runs_exactly_the_readme_test_command():
    readme_block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    setup_lines = [line for line in readme_block.splitlines() if line.strip()]
    assert len(setup_lines) == 2, "the README starts with exactly two set-up commands"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 ")]
    assert ci_lines == [setup_lines[1]], (ci_lines, setup_lines[1])


def test_a_child_with_a_deadline_of_its_own_ends_by_itself_and_keeps_its_pid():
    from fakenvml.lifetime import with_alarm, with_timeout

    sleeper = [sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(60)", "past-its-deadline"]
    alarmed = subprocess.Popen(with_alarm(sleeper, 2), stdout=subprocess.PIPE)
    wrapped = subprocess.Popen(with_timeout(sleeper, 2), stdout=subprocess.PIPE)
    try:
        alarmed.stdout.readline()  # the sleeper runs: under the PID the test started
        assert b"past-its-deadline" in Path(f"/proc/{alarmed.pid}/cmdline").read_bytes()
        started = time.monotonic()
        assert alarmed.wait(timeout=30) == -14, "SIGALRM ended it"  # -signal.SIGALRM
        assert wrapped.wait(timeout=30) == 124, "timeout(1) ended it"
        assert time.monotonic() - started < 20
    finally:
        for proc in (alarmed, wrapped):
            proc.kill()
            proc.wait()


def test_every_test_the_docs_cite_exists():
    """A doc that says which test holds a behaviour must name a test that runs: a renamed test leaves
    the doc pointing at nothing. (`tests/test_x.py` paths are files, and may be another project's.)"""
    defined = {
        name for path in (ROOT / "tests").glob("test_*.py") for name in re.findall(r"def (test_\w+)", path.read_text())
    }
    docs = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
    cited = {
        (doc.relative_to(ROOT).as_posix(), name)
        for doc in docs
        for name in re.findall(r"\b(test_\w+)\b(?!\.py)", doc.read_text())
    }
    assert cited, "the docs cite tests: the pattern must find them"
    assert sorted((doc, name) for doc, name in cited if name not in defined) == []
