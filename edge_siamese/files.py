"""Result files written whole or not at all: a temporary name in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_new_file(path: Path | None, force: bool) -> None:
    """Before the work: stop unless ``path`` (when given) can be written, new or with ``force``."""
    if path is None:
        return
    if path.exists() and not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a folder: create it, or write {path.name} elsewhere")


def check_replaceable(path: Path, marker: str, force: bool, hint: str = "") -> None:
    """Before the work: an existing result folder ``path`` may be replaced only with ``force``, and
    only when it is a result of this kind (``marker`` in it) or empty: a mistyped --out never
    deletes other data. ``hint`` follows the --force advice (e.g. ", or --resume to continue it")."""
    path = Path(path)
    if not path.exists():
        return
    if not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it{hint}")
    if not (path.is_dir() and ((path / marker).exists() or not any(path.iterdir()))):
        raise UserError(f"{path} holds something else (no {marker} in it): --force replaces only an earlier result; choose another --out")


def remove_result_folder(path: Path, marker: str) -> None:
    """``--force``: delete the result folder ``path``, after ``check_replaceable`` has allowed it."""
    check_replaceable(path, marker, force=True)
    if Path(path).exists():
        shutil.rmtree(path)
