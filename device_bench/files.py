"""Files written whole or not at all, on both sides: a temporary name beside the target, then a
rename. Temporary names carry the writer's process id, so that a later run can tell one whose
writer died (``remove_dead_temporaries``) and remove it; JSON is strict (no NaN or Infinity)."""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator


TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|staging)-(?P<pid>\d+)$")


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """``.NAME.KIND-PID`` beside ``path``: hidden, and named after its writer."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` (files or folders) whose writer is no longer running."""
    folder = Path(path).parent
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = TEMPORARY.match(entry.name)
        if match and match["name"] == Path(path).name and not _alive(int(match["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with suppress(OSError):  # a read-only folder: the check that follows says so
                    entry.unlink()


def folder_problem(folder: Path) -> str:
    """Why no file can be made in ``folder`` (or in the nearest folder above it that exists, where
    ``folder`` would be created), or ''. Checked before the work, not after it."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder: choose a path in a folder"
    remove_dead_temporaries(existing / "edge-siamese-probe")
    probe = temporary_name(existing / "edge-siamese-probe")
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        return f"cannot write in {existing}: {(exc.strerror or type(exc).__name__).lower()}; choose a place you can write to"
    probe.unlink()
    return ""


def new_file_problem(path: Path, force: bool) -> str:
    """Why the file ``path`` cannot be written (new, or replaced with ``force``), or ''."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder: give the name of a file to write"
    if path.exists() and not force:
        return f"{path} already exists: pass --force to overwrite it"
    if not path.parent.is_dir():
        return f"{path.parent} is not a folder: create it, or write {path.name} elsewhere"
    return folder_problem(path.parent)


def plain_file_mode(path: Path) -> None:
    """The mode a new file gets under the umask (0644 usually): not 0600, not executable, whatever a writer chose."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    and is removed on any failure. The result gets the usual 0644 (umask) mode."""
    path = Path(path)
    remove_dead_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        plain_file_mode(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def json_text(obj) -> str:
    """Strict JSON: a NaN or an infinity is an error here, never a literal another reader rejects."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def write_json(path: Path, obj) -> None:
    text = json_text(obj)  # before the temporary: a NaN leaves nothing behind
    with atomic_path(path) as tmp:
        tmp.write_text(text)
