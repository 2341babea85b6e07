"""The ``cpu`` target: ``python -m device_bench`` in a subprocess on this machine.

The document comes back on the child's standard output (``--json -``): no temporary file that a
killed parent would leave behind, and the child ends with its parent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from device_bench import children
from device_bench.document import validate_result

from ...errors import UserError, last_line


def bench(bundle: Path, settings, address: str = "") -> dict:
    command = [sys.executable, "-m", "device_bench", str(bundle), *settings.device_bench_args(), "--json", "-"]
    proc = children.run(command, progress=settings.progress, env={**os.environ, "DEVICE_BENCH_TARGET": "cpu"})
    if proc.returncode not in (0, 1) or not proc.stdout.strip():  # 1: a row failed; the document still counts
        raise UserError(last_line(proc).replace(" (see 'python -m device_bench --help')", ""))
    return validate_result(json.loads(proc.stdout))
