"""Shared fixtures: the real CLI in a subprocess, and a tiny trained run built once per test session."""

from __future__ import annotations

import json
import re
import select
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

CLI = Path(sys.executable).parent / "edge-siamese"


def colour_photos(root: Path, classes: int, per_class: int, noise: float, rng, modes=(("RGB", "jpg"),)) -> Path:
    """``root/pCLASS/I.SUFFIX``: noisy images of one random colour a class, 20 to 89 pixels a side,
    saved in ``modes`` (Pillow mode, suffix) in turn."""
    import numpy as np
    from PIL import Image

    for c in range(classes):
        (root / f"p{c}").mkdir(parents=True)
        colour = rng.integers(30, 225, 3)
        for i in range(per_class):
            mode, suffix = modes[i % len(modes)]
            h, w = rng.integers(20, 90, 2)
            pixels = np.clip(colour + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / f"p{c}" / f"{i}.{suffix}")
    return root


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


@pytest.fixture(scope="session")
def client_bundle(tmp_path_factory) -> Path:
    """A 2-epoch digits run exported to ONNX and TFLite, fp32 and int8: what the app clients load."""
    root = tmp_path_factory.mktemp("client-bundle")
    run_cli("train", "--dataset", "digits", "--epochs", "2", "--quiet", "--out", root / "run")
    run_cli("export", root / "run", "--int8", "--format", "onnx,tflite", "--quiet", "--out", root / "bundle")
    return root / "bundle"


def copy_bundle(bundle: Path, dest: Path, edit=None) -> Path:
    """A copy of ``bundle`` at ``dest``; ``edit(manifest)`` changes its manifest.json in place."""
    shutil.copytree(bundle, dest)
    if edit is not None:
        manifest = json.loads((dest / "manifest.json").read_text())
        edit(manifest)
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def other_schema(manifest):
    manifest["schema_version"] = 2


def tflite_only(manifest):
    manifest["files"] = [entry for entry in manifest["files"] if entry["format"] == "tflite"]


def wrong_input_shape(manifest):
    manifest["files"][0]["input"]["shape"] = ["batch", 1, 16, 16]


# Edits that make a bundle inconsistent, and what the clients' error says (the first fragment: every client).
BAD_MANIFESTS = [
    (other_schema, ["schema version 2 is not 1"]),
    (tflite_only, ["no ONNX file", "--format onnx"]),
    (wrong_input_shape, ["model_fp32.onnx", "[batch,1,8,8]", "[batch,1,16,16]"]),
]


def flip_byte(path: Path) -> None:
    """Corrupt a file in place by one byte in its middle: what a sha256 check must catch."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def ctrl_c_as_in_a_terminal() -> None:
    """For a child the tests stop with SIGINT: a terminal's process takes Ctrl-C, but one started
    under a shell's background job (``cmd &``, as a CI script may run pytest) inherits SIGINT
    ignored, and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def demo_server(bundle: Path, *args: str):
    """``edge-siamese demo BUNDLE --port 0`` in a subprocess: yields (process, the URL it printed);
    stops it with Ctrl-C (SIGINT) and checks that it exits cleanly."""
    proc = subprocess.Popen([str(CLI), "demo", str(bundle), "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # torch's import can be slow on a busy CI machine
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+/web/", line)
        assert match, f"no URL in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield proc, match.group(0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stderr = proc.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def served(client_bundle):
    """The URL of ``edge-siamese demo`` serving client_bundle, for one test module."""
    with demo_server(client_bundle) as (_, url):
        yield url
