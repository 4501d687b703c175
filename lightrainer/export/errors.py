"""Exceptions of the export layer (defined in :mod:`lightrainer.errors`, where every layer can raise them)."""

from __future__ import annotations

from lightrainer.errors import ExportError, MissingDependencyError

__all__ = ["ExportError", "MissingDependencyError"]
