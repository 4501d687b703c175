"""Where lightrainer's log lines go when the program set up no logging (a notebook, a script).

The command line configures logging itself. A notebook or a script that calls
:func:`lightrainer.build_trainer` usually does not, and Python would then drop every INFO line:
the per-epoch lines and the closing summary of a fit. As Lightning does for its own logger,
``build_trainer`` (and ``lightrainer.tune``) give the ``lightrainer`` logger a handler of last
resort when the program has set up no logging at all; a program that configured logging keeps its
own levels and handlers.
"""

from __future__ import annotations

import logging


class FallbackHandler(logging.StreamHandler):
    """A stderr handler that stays silent once the root logger has a handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the record propagates to the program's own handlers
        super().emit(record)


def install_fallback_handler(name: str = "lightrainer") -> None:
    """INFO lines of logger ``name`` printed (message only) where the program set up no logging
    (the root logger has no handler); idempotent, and a level the program set is kept."""
    if logging.getLogger().handlers:
        return  # the program configured logging: its levels and handlers decide
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(handler, FallbackHandler) for handler in logger.handlers):
        handler = FallbackHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
