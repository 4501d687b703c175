"""The project's error types (the bottom layer: imports nothing of lightrainer).

Every layer raises these, so a command tells a user's mistake (exit code 2, one paragraph) from
a bug whichever layer found it.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A user mistake in the configuration: names the key, the allowed values and the fix."""


class ExportError(ValueError):
    """An export that cannot be done or produced a wrong model; the message names the cause and the fix."""


class MissingDependencyError(ImportError):
    """An optional dependency (or a GPU) that a requested feature needs is absent; one line says how to fix it."""


class TrainingDiverged(RuntimeError):
    """Training stopped because its numbers stopped being finite: ``nan_patience`` + 1 optimizer
    steps in a row had a NaN/inf loss or gradient (each was skipped), or the model's state itself
    holds NaN. The message names the epoch and step. The run's last finite checkpoints are kept
    and nothing non-finite was written. Not a user mistake in the config: the command exits 1.
    """


class WeightsError(ConfigError, ExportError):
    """A weights file that is missing, not a lightrainer weights file, or saved by another model.

    A :class:`ConfigError` (the command or config named the wrong file or network) and, for the
    export code that reads most weights files, an :class:`ExportError`: either ``except`` catches it.
    """


def closest_hint(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``key``, or an empty string."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        lower = {k.lower(): k for k in known}
        found = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
        close = [lower[found[0]]] if found else []
    if not close:
        # "accuracy" for "acc": a known name that the key starts with (or the other way round).
        text = key.lower()
        prefixes = [k for k in known if len(k) >= 3 and (text.startswith(k.lower()) or k.lower().startswith(text))]
        close = sorted(prefixes, key=len, reverse=True)[:1] if len(text) >= 3 else []
    return f" (did you mean {close[0]!r}?)" if close else ""


class WriteError(ConfigError):
    """A file of the run cannot be written (a full disk, a folder that is not writable): the
    message names the folder and the cause; the previous file is intact. The command exits 2."""
