"""The project's error type for user mistakes (the bottom layer: imports nothing of lightrainer)."""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A user mistake in the configuration: names the key, the allowed values and the fix."""


def closest_hint(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``key``, or an empty string."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        lower = {k.lower(): k for k in known}
        found = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
        close = [lower[found[0]]] if found else []
    return f" (did you mean {close[0]!r}?)" if close else ""
