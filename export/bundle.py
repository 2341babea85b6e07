"""The bundle writer: a temporary folder filled, validated, then renamed into place.

The manifest schema and the reader live in ``device_bench.manifest`` (the device reads what
this writes); this module only assembles and commits.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from device_bench.files import atomic_path, json_text, remove_dead_temporaries, temporary_name
from device_bench.manifest import MANIFEST, read_bundle, sha256_file


def staging_dir(out: Path) -> Path:
    """A fresh staging folder beside ``out`` (``.NAME.staging-PID``), where the bundle is built
    before ``commit``; those of exports that died are removed first, and no reader takes one for a bundle."""
    out = Path(out)
    remove_dead_temporaries(out)
    tmp = temporary_name(out, "staging")
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
    (tmp / MANIFEST).write_text(json_text(manifest))  # strict: a NaN figure stops here, unwritten
    listed = {e["path"] for e in manifest["files"]} | {manifest["eval"]["path"], manifest["golden"]["path"], MANIFEST}
    for stray in [p for p in tmp.iterdir() if p.name not in listed]:
        stray.unlink()
    read_bundle(tmp, staging=True)
    out = Path(out)
    if out.exists():
        old = temporary_name(out)
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
        with atomic_path(archive) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(out.iterdir()):
                zf.write(path, f"{out.name}/{path.name}")
    return out
