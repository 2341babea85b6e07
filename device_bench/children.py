"""Child processes that end with their parent: a benchmark killed with kill -9 leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run(cmd: list[str], progress: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with output captured as text, in a child that ends when this process does.
    ``progress``: the child's progress lines (stderr lines that start with ``[``) are shown as they come."""
    parent = os.getpid()
    if not progress:
        return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=lambda: _die_with_parent(parent), **kwargs)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: _die_with_parent(parent), **kwargs)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()))  # a full stdout pipe must not block the child
    reader.start()
    kept = []
    for line in proc.stderr:
        if line.startswith("["):
            sys.stderr.write(line)
            sys.stderr.flush()
        else:
            kept.append(line)
    reader.join()
    return subprocess.CompletedProcess(cmd, proc.wait(), "".join(stdout), "".join(kept))
