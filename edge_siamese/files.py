"""Where results go: checked before the work (a file or folder that can be written there, and
replaced only with --force). The writing itself is ``device_bench.files``: whole or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path

from device_bench.files import folder_problem, new_file_problem, remove_dead_temporaries

from .errors import UserError


def check_new_file(path: Path | None, force: bool) -> None:
    """Before the work: stop unless ``path`` (when given) can be written, new or with ``force``."""
    problem = new_file_problem(path, force) if path is not None else ""
    if problem:
        raise UserError(problem)


def check_replaceable(path: Path, marker: str, force: bool, hint: str = "") -> None:
    """Before the work: a result folder can be written at ``path``; an existing one may be replaced
    only with ``force``, and only when it is a result of this kind (``marker`` in it) or empty,
    never the current folder or one above it: a mistyped --out never deletes other data. ``hint``
    follows the --force advice (e.g. ", or --resume to continue it")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder: choose another --out")
    if problem := folder_problem(path.parent):
        raise UserError(problem)
    remove_dead_temporaries(path)
    if not path.exists():
        return
    if not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it{hint}")
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise UserError(f"--out {path} is the current folder or holds it: --force would delete it; choose another --out")
    if not ((path / marker).exists() or not any(path.iterdir())):
        raise UserError(f"{path} holds something else (no {marker} in it): --force replaces only an earlier result; choose another --out")


def remove_result_folder(path: Path, marker: str) -> None:
    """``--force``: delete the result folder ``path``, after ``check_replaceable`` has allowed it."""
    check_replaceable(path, marker, force=True)
    if Path(path).exists():
        shutil.rmtree(path)
