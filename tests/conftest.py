"""Shared fixtures: the real CLI in a subprocess, and a tiny trained run built once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).parent / "edge-siamese"


def run_cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed ``edge-siamese`` console script; ``check`` asserts exit status 0."""
    proc = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"edge-siamese {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: non-zero exit, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def shadow_run(tmp_path_factory) -> Path:
    """Shadow, d=8, on digits with the default settings: the README's first run."""
    out = tmp_path_factory.mktemp("runs") / "shadow-d8"
    run_cli("train", "--dataset", "digits", "--loss", "shadow", "--dim", "8", "--quiet", "--out", out)
    return out
