"""The ``cpu`` target: ``python -m device_bench`` in a subprocess on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from device_bench.document import validate_result

from ...errors import UserError, last_line


def bench(bundle: Path, settings, address: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "DEVICE_BENCH_TARGET": "cpu"}
        command = [sys.executable, "-m", "device_bench", str(bundle), *settings.device_bench_args(), "--quiet", "--json", str(out)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if not out.exists():
            raise UserError(last_line(proc).replace(" (see 'python -m device_bench --help')", ""))
        return validate_result(json.loads(out.read_text()))
