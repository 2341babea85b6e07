"""The bundle writer: a temporary folder filled, validated, then renamed into place.

The manifest schema and the reader live in ``device_bench.manifest`` (the device reads what
this writes); this module only assembles and commits.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from device_bench.manifest import MANIFEST, read_bundle, sha256_file


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside ``out``, where the bundle is built before ``commit``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_arrays(folder: Path, name: str, **arrays: np.ndarray) -> dict:
    """Save an ``.npz`` into the bundle and return its manifest entry."""
    path = folder / name
    np.savez_compressed(path, **arrays)
    return {"path": name, "sha256": sha256_file(path), "num_samples": int(len(next(iter(arrays.values()))))}


def file_entry(folder: Path, name: str) -> dict:
    path = folder / name
    return {"path": name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def commit(tmp: Path, out: Path, manifest: dict, make_zip: bool) -> Path:
    """Write the manifest, check the bundle as a device would (schema, sha256s), and move it to ``out``."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    listed = {e["path"] for e in manifest["files"]} | {manifest["eval"]["path"], manifest["golden"]["path"], MANIFEST}
    for stray in [p for p in tmp.iterdir() if p.name not in listed]:
        stray.unlink()
    read_bundle(tmp)
    out = Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    archive = out.with_name(f"{out.name}.zip")
    if not make_zip:
        archive.unlink(missing_ok=True)  # an older zip would no longer match the bundle
    else:
        partial = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(out.iterdir()):
                zf.write(path, f"{out.name}/{path.name}")
        os.replace(partial, archive)
    return out
