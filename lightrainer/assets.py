"""Files that ship with the package: the ready configs, found by name from any folder.

``lightrainer fit --config mnist.yaml`` (or ``configs/mnist.yaml``) reads the shipped
``mnist.yaml`` when no such file exists where the command runs, as Ultralytics resolves
``yolo11n.yaml``. A file on disk always wins, so a user's own ``configs/mnist.yaml`` is read as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

#: Suffixes of the shipped config files.
CONFIG_SUFFIXES = (".yaml", ".yml")
#: The subfolder of shipped sweep spaces (``lightrainer tune --space spaces/digits.yaml``).
SPACES = "spaces"


def configs_dir() -> Path:
    """The folder of shipped configs: ``lightrainer/configs`` in an installed wheel, the repository's
    ``configs/`` in a source checkout or an editable install."""
    packaged = _PACKAGE / "configs"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped config files, sorted (``digits.yaml``, ``mnist.yaml``, ...)."""
    folder = configs_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())


def resolve_config(path: str | os.PathLike) -> Path:
    """The config file ``path`` names.

    Args:
        path: a path as the user wrote it.

    Returns:
        ``path`` itself when something exists there, or when it names no shipped config; else the
        shipped config of that name (``path`` is a bare name such as ``mnist.yaml``, or
        ``configs/<name>``; a sweep space ``spaces/<name>`` or ``configs/spaces/<name>``).
    """
    given = Path(path)
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    shipped_name = len(parts) == 1 or (len(parts) == 2 and parts[0] == SPACES)
    if given.exists() or given.suffix not in CONFIG_SUFFIXES or given.is_absolute() or not shipped_name:
        return given
    shipped = configs_dir().joinpath(*parts)
    return shipped if shipped.is_file() else given


__all__ = ["CONFIG_SUFFIXES", "SPACES", "configs_dir", "resolve_config", "shipped_configs"]
