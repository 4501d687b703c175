"""Atomic, durable file writes: the one helper every file the project writes goes through.

A file is written to a temporary name in the same folder, flushed and fsynced, then moved over
the final name with ``os.replace`` (and the folder fsynced on POSIX), so a killed process or a
machine that loses power leaves the previous complete file or the new one, never a partial one.
This is the bottom layer: it imports nothing of lightrainer.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from lightrainer.errors import WriteError

#: errno values that mean "this folder cannot take the file" (full disk, quota, permissions, read-only).
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

PathLike = Union[str, os.PathLike]

#: Prefix of the temporary files (hidden; a later start may clean those a killed process left).
TMP_PREFIX = "."
TMP_MARK = ".tmp"


def temp_path_for(path: PathLike) -> Path:
    """The temporary name ``path`` is written under before it is moved into place."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: PathLike, path: PathLike) -> None:
    """Move the complete file ``tmp`` over ``path``, flushed to disk first (and the rename too)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).resolve().parent)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (for libraries that write by file name:
    ``torch.save``, ``savefig``, ``onnx.save``); moved into place when the block ends without an
    error, removed otherwise.

    Example:
        with atomic_path(run_dir / "results.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except OSError as err:
        if err.errno not in _CANNOT_WRITE:
            raise
        # Name the folder and the cause, not the temporary file (the previous file is intact).
        raise WriteError(
            f"cannot write {path.name} in {path.parent}: {err.strerror or err} (a full disk or a folder that is "
            f"not writable?); {path.name} as it was before is intact"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(path: PathLike, data: Union[str, bytes], encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically and durably; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically and durably; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
