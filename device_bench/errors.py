"""The device side's exception type, and the one line an operating-system error becomes."""

from __future__ import annotations

import errno

HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this system allows (file size limit): free some space, raise the limit or write elsewhere",
    errno.EROFS: "it is on a read-only file system: write elsewhere",
    errno.EACCES: "permission denied: write elsewhere",
    errno.EPERM: "permission denied: write elsewhere",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file name",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ENOENT: "it does not exist: check the path",
}


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says what is wrong and what to do."""


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: the path, the cause, and what to do."""
    cause = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    where = f"{exc.filename}: " if exc.filename else ""
    hint = HINTS.get(exc.errno)
    return f"{where}{cause}" + (f"; {hint}" if hint else "")
