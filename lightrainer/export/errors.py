"""Exceptions of the export layer."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be done or produced a wrong model; the message names the cause and the fix."""


class MissingDependencyError(ImportError):
    """An optional dependency (or a GPU) that a requested feature needs is absent; one line says how to fix it."""
