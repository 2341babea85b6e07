"""The ``ssh://user@host[:port]`` target: device_bench on a real device, copied there with the bundle."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import device_bench
from device_bench.document import validate_result

from ...errors import UserError, last_line


def bench(bundle: Path, settings, address: str) -> dict:
    """Copy device_bench and the bundle to ``address`` (a temporary folder there), run, fetch the JSON."""
    host, _, port = address.partition(":")
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", *(["-p", port] if port else []), host]
    scp = ["scp", "-q", "-r", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", *(["-P", port] if port else [])]
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise UserError(f"the ssh target needs {tool}: apt-get install openssh-client")

    def call(cmd: list[str], what: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode not in ok:
            raise UserError(f"{cmd[0]} to {host} failed ({what}): {last_line(proc)}")
        return proc

    remote = call([*ssh, "mktemp -d"], "making a temporary folder").stdout.strip()
    try:
        package = Path(device_bench.__file__).parent
        call([*scp, str(package), str(bundle), f"{host}:{remote}/"], "copying device_bench and the bundle")
        args = " ".join(shlex.quote(a) for a in [*settings.device_bench_args(), "--quiet", "--json", f"{remote}/bench.json"])
        # device_bench exits 1 when a row failed; its JSON still counts. Without the JSON, its error does.
        command = f"cd {shlex.quote(remote)} && DEVICE_BENCH_TARGET=ssh {settings.remote_python} -m device_bench {shlex.quote(bundle.name)} {args}"
        run = call([*ssh, command], "device_bench", (0, 1))
        fetched = subprocess.run([*ssh, f"cat {shlex.quote(remote)}/bench.json"], capture_output=True, text=True, timeout=600)
        if fetched.returncode != 0:
            raise UserError(f"device_bench on {host} wrote no result: {last_line(run)}")
        result = json.loads(fetched.stdout)
    finally:
        subprocess.run([*ssh, f"rm -rf {shlex.quote(remote)}"], capture_output=True, timeout=60)
    return validate_result(result)
