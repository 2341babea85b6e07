"""The bundle's ``manifest.json``: its schema, its validator and the bundle reader (torch-free).

A bundle is a folder holding the model files, ``manifest.json``, ``eval.npz`` (a small labelled
held-out set) and ``golden.npz`` (raw inputs, their preprocessed form and the PyTorch fp32
reference embeddings). Reading one validates the manifest and checks every file's sha256.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np

from .errors import BundleError
from .files import TEMPORARY
from .formats import FORMATS
from .preprocessing import Preprocessing

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FILE_STATUSES = ("verified", "degraded")  # formats.STATUSES' words for a file a bundle holds

# The schema: a dict gives the required keys of an object, a tuple the types a value may take.
class Optional(NamedTuple):
    """A field that bundles written before it existed lack (its reader then takes a default)."""

    types: tuple


NUMBER = (int, float)
QUANT_IO = {"name": (str,), "dtype": (str,), "shape": (list,), "scale": (float, type(None)), "zero_point": (int, type(None))}
FIDELITY = {
    "num_samples": (int,),
    "mean_cosine": NUMBER,
    "min_cosine": NUMBER,
    "max_abs_diff": NUMBER,
    "relative_error": Optional(NUMBER),
    "top1_neighbour_agreement": NUMBER,
    "precision_at_1": NUMBER,
    "reference_precision_at_1": NUMBER,
}
FILE = {
    "path": (str,),
    "format": (str,),
    "precision": (str,),
    "size_bytes": (int,),
    "sha256": (str,),
    "status": (str,),
    "input": QUANT_IO,
    "output": QUANT_IO,
    "fidelity": FIDELITY,
    "int8": Optional((dict,)),  # int8 files: what the int8 search chose and tried (export.quantize)
}
DATA_FILE = {"path": (str,), "sha256": (str,), "num_samples": (int,)}
SCHEMA = {
    "schema_version": (int,),
    "toolkit_version": (str,),
    "created_utc": (str,),
    "input": {"name": (str,), "shape": (list,), "layout": (str,), "dtype": (str,)},
    "preprocessing": {
        "raw_range": (list,),
        "resize": (list,),
        "resize_mode": Optional((str,)),
        "interpolation": Optional((str,)),
        "grey_conversion": (str,),
        "channels": (int,),
        "scale": NUMBER,
        "mean": (list,),
        "std": (list,),
    },
    "embedding": {
        "output_name": (str,),
        "dim": (int,),
        "l2_normalized": (bool,),
        "distance": (str,),
        "distance_weights": (list, type(None)),
    },
    "thresholds": {"far_1e-2": NUMBER, "far_1e-3": NUMBER, "accept": (str,), "measured_on": (str,)},
    "training": {"loss": (str,), "dataset": (str,), "backbone": (str,), "metrics": (dict,)},
    "eval": DATA_FILE,
    "golden": DATA_FILE,
    "files": (list,),
    "qat": Optional((dict,)),  # made from a quantization-aware fine-tune of the run's model (export.qat)
}


def optional_fields(schema: dict | None = None, prefix: str = "") -> set[str]:
    """The dotted paths of the fields older bundles may lack."""
    schema = SCHEMA if schema is None else schema
    paths = set()
    for key, spec in schema.items():
        if isinstance(spec, Optional):
            paths.add(prefix + key)
        elif isinstance(spec, dict):
            paths |= optional_fields(spec, f"{prefix}{key}.")
    return paths


def schema_paths(schema: dict, prefix: str = "") -> set[str]:
    """Every dotted field path a schema dict defines, under ``prefix``."""
    paths = set()
    for key, spec in schema.items():
        paths.add(prefix + key)
        if isinstance(spec, dict):
            paths |= schema_paths(spec, f"{prefix}{key}.")
    return paths


def field_names() -> set[str]:
    """Every manifest field name (``embedding.dim``, ``files[].input.scale``, ...)."""
    return schema_paths(SCHEMA) | schema_paths(FILE, "files[].")


def check_schema(value, spec, where: str = "") -> None:
    """Raise ``BundleError`` where ``value`` breaks ``spec`` (dicts: required keys; tuples: allowed types)."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise BundleError(f"manifest field {where or 'root'} must be an object")
        for key, sub in spec.items():
            if key not in value and isinstance(sub, Optional):
                continue
            if key not in value:
                raise BundleError(f"manifest is missing {where + '.' if where else ''}{key}: export the bundle again")
            check_schema(value[key], sub.types if isinstance(sub, Optional) else sub, f"{where + '.' if where else ''}{key}")
    elif not isinstance(value, spec) or (isinstance(value, bool) and bool not in spec):
        names = " or ".join(t.__name__ for t in spec)
        raise BundleError(f"manifest field {where} must be {names}, got {type(value).__name__}")


def validate_manifest(manifest: dict) -> dict:
    """Raise ``BundleError`` at the first field that breaks the schema; return the manifest."""
    check_schema(manifest, SCHEMA, "")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {manifest['schema_version']} is not {SCHEMA_VERSION}: use the matching device_bench"
        )
    if not manifest["files"]:
        raise BundleError("manifest lists no model files")
    for i, entry in enumerate(manifest["files"]):
        check_schema(entry, FILE, f"files[{i}]")
        if entry["format"] not in FORMATS or entry["precision"] not in FORMATS[entry["format"]].precisions or entry["status"] not in FILE_STATUSES:
            raise BundleError(f"files[{i}] has an unknown format, precision or status: {entry['format']}, {entry['precision']}, {entry['status']}")
    return manifest


def sha256_file(path: Path) -> str:
    import hashlib  # here, not at the top: OpenSSL costs a benchmark child ~4 MB of RSS

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A validated bundle on disk; ``eval.npz`` and ``golden.npz`` are read only when asked for."""

    path: Path
    manifest: dict

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def files(self) -> list[dict]:
        return self.manifest["files"]

    def file(self, fmt: str, precision: str) -> dict:
        for entry in self.files:
            if entry["format"] == fmt and entry["precision"] == precision:
                return entry
        have = ", ".join(f"{e['format']} {e['precision']}" for e in self.files)
        raise BundleError(f"the bundle has no {fmt} {precision} model (it has: {have}): export it with that precision")

    def _arrays(self, key: str) -> dict[str, np.ndarray]:
        with np.load(bundle_file(self.path, self.manifest[key]["path"], key), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def eval_set(self) -> dict[str, np.ndarray]:
        """``images`` (raw, N x H x W x C) and ``labels``."""
        return self._arrays("eval")

    def golden(self) -> dict[str, np.ndarray]:
        """``images`` (raw), ``inputs`` (preprocessed, NCHW float32) and ``embeddings`` (PyTorch fp32)."""
        return self._arrays("golden")


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a float")
    return value


def bundle_file(root: Path, relative: str, field: str) -> Path:
    """The file a manifest path names. It must be relative and normalised (no ``..``, ``.`` or empty
    part, no backslash, drive or NUL) and, symlinks resolved, inside the bundle folder: a bundle
    never makes a device read a file elsewhere."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(c in relative for c in "\\\0") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"manifest field {field} is {relative!r}, not a relative path inside the bundle: export the bundle again")
    path = Path(root) / relative
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise BundleError(f"manifest field {field} ({relative}) leads outside the bundle folder, to {path.resolve()}: export the bundle again")
    return path


def read_bundle(path: Path, verify_sha256: bool = True, staging: bool = False) -> Bundle:
    """Read and validate ``path/manifest.json`` and check the sha256 of every file it lists.

    ``verify_sha256=False`` only checks that the files exist: for a benchmark child process
    whose parent has just verified the same bundle. A staging folder (an export under way, or
    one that died) is refused, except with ``staging=True``: the exporter's check before its rename.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if TEMPORARY.match(path.name) and not staging:
        raise BundleError(f"{path} is the staging folder of an unfinished export, not a bundle: export again (that removes it)")
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle (no {MANIFEST}): pass the folder 'edge-siamese export' wrote")
    try:
        manifest = json.loads(manifest_path.read_text(), parse_constant=_not_a_number, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}): export the bundle again") from None
    validate_manifest(manifest)
    listed = [(f"files[{i}].path", e) for i, e in enumerate(manifest["files"])] + [("eval.path", manifest["eval"]), ("golden.path", manifest["golden"])]
    for field, entry in listed:
        file_path = bundle_file(path, entry["path"], field)
        if not file_path.is_file():
            raise BundleError(f"{entry['path']} is missing from {path}: copy the whole bundle folder")
        if verify_sha256 and sha256_file(file_path) != entry["sha256"]:
            raise BundleError(
                f"{entry['path']} in {path} does not match its sha256 in {MANIFEST} (changed or truncated): copy or export the bundle again"
            )
    return Bundle(path, manifest)
