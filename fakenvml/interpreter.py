"""An interpreter path that a `#!` line can hold.

The kernel splits a shebang at the first blank, so a clone under "/home/me/my projects" gives
scripts (the fake `vllm` console script, a fake nvidia-smi) an interpreter path that cannot be
written there. A symlink without blanks, in the temporary directory, to this interpreter's
environment (the venv) serves instead: Python finds the venv's pyvenv.cfg and site-packages
through it, so the script runs with the same packages.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def shebang_python() -> str:
    """sys.executable, or the same interpreter through a blank-free symlink when its path has blanks."""
    executable = Path(sys.executable)
    if not any(char.isspace() for char in str(executable)):
        return str(executable)
    prefix = Path(sys.prefix)
    target, inside = (prefix, executable.relative_to(prefix)) if executable.is_relative_to(prefix) else (
        executable.parent, Path(executable.name))  # fmt: skip
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    link = Path(tempfile.gettempdir()) / f"gpu-residency-python-{digest}"
    if not link.is_symlink() or os.readlink(link) != str(target):
        staged = link.with_name(f"{link.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        staged.symlink_to(target, target_is_directory=True)
        os.replace(staged, link)  # atomic: concurrent test processes all see a whole link
    shebang = link / inside
    if any(char.isspace() for char in str(shebang)):
        raise RuntimeError(f"no interpreter path without blanks for {executable} (temporary directory {link.parent})")
    return str(shebang)
