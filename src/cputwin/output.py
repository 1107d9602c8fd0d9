"""Output paths: checked before the work starts, and written whole or not at all.

A command that will write a file or a folder checks it first (`check_file`,
`check_folder`), so a path that cannot be written fails in one line at once rather than
after a long fit. Files are written through `write_atomic`: a failure part-way (a full
disk) leaves neither a half-written file under the real name nor a temporary one beside it.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from cputwin.errors import OutputError


def reason(exc: BaseException) -> str:
    """The operating system's words for why a write failed ('No space left on device')."""
    errno = getattr(exc, "errno", None)
    if errno is None:  # polars and others carry the OS error in their message
        match = re.search(r"(?:os error|errno) (\d+)", str(exc))
        errno = int(match.group(1)) if match else None
    if errno:
        return os.strerror(errno)
    return str(exc).split("\n")[0] or type(exc).__name__


def check_folder(path: Path, *, label: Path | None = None) -> Path:
    """Create `path` (and its parents) if needed and prove a file can be written in it.

    `label` is the output the folder is for, named in the error instead of the folder."""
    path = Path(path)
    name = label if label is not None else path
    if path.exists() and not path.is_dir():
        raise OutputError(f"{name}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".cputwin-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if label is None else f" in {path}"
        raise OutputError(f"{name}: cannot write{where} ({reason(exc)})") from None
    return path


def check_file(path: Path, *, append: bool = False) -> Path:
    """A file path that can be written: not a folder, its folder writable (created if
    missing). Only `append` (a log written in place) accepts an existing special file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if path.exists() and not append and not stat.S_ISREG(path.stat().st_mode):
        raise OutputError(f"{path}: exists and is not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: cannot write ({os.strerror(13)})")
    check_folder(path.parent, label=path)
    return path


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or "os error" in str(exc):  # polars: ComputeError
            raise OutputError(f"{path}: cannot write ({reason(exc)})") from None
        raise
    return path
