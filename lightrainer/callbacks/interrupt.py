"""SIGTERM / SIGINT: save the interrupted state as ``weights/last.ckpt``, say how to resume, exit
non-zero (128 + the signal's number, as a shell reports a process a signal ended).

Lightning handles SIGTERM itself: its handler lets the current batch finish, then raises
``SIGTERMException`` (a ``SystemExit``) that ends the fit, which by itself exits 0 ("Received
SIGTERM" looked like a success). This callback hooks ``on_exception``: the state there is that of
a finished batch (Lightning's loops restart from it: the model, the optimizer, the position in the
epoch, the random generators), so it saves it with ``trainer.save_checkpoint`` (written atomically
by the run's checkpoint I/O) and sets the exit code. Ctrl+C (SIGINT) takes the same path: while
training, the first SIGINT asks Lightning's SIGTERM handler to stop after the batch; a second one
stops at once, without saving. Under SLURM with ``requeue: True``, Lightning's own
``SLURMEnvironment(auto_requeue=True)`` requeues the job on its signal (see
:func:`lightrainer.trainer.build_trainer`); this callback still saves and exits.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def exit_code(signum: int) -> int:
    """The exit code of a process a signal stopped: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(signum)


def resume_command(argv: Sequence[str], checkpoint: Path) -> Optional[str]:
    """The command that resumes a ``lightrainer fit`` run from ``checkpoint``: the same arguments
    with ``--ckpt_path`` set to it (an earlier ``--ckpt_path`` or ``--resume`` is replaced), or None
    when ``argv`` is not a ``lightrainer fit`` command line (a Python script)."""
    program = Path(argv[0]).name if argv else ""
    from_package = program == "__main__.py" and Path(argv[0]).parent.name == "lightrainer"
    if not (program == "lightrainer" or from_package) or len(argv) < 2 or argv[1] != "fit":
        return None
    args: list[str] = []
    rest = iter(argv[2:])
    for arg in rest:
        if arg == "--ckpt_path":
            next(rest, None)
        elif arg != "--resume" and not arg.startswith(("--ckpt_path=", "--resume=")):
            args.append(arg)
    return shlex.join(["lightrainer", "fit", *args, "--ckpt_path", str(checkpoint)])


class InterruptCheckpoint(Callback):
    """On SIGTERM or SIGINT while training: save ``weights/last.ckpt`` of the interrupted state,
    log what happened and the exact resume command, and end the process with 128 + the signal's
    number (see the module docstring).

    An interruption during validation saves nothing: ``last.ckpt`` of the previous epoch stays,
    and the resumed run repeats the epoch, so its validation metrics are whole.

    Args:
        dirpath: the run's ``weights`` folder.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.signum: Optional[int] = None
        self._previous_sigint: Any = None

    # ------------------------------------------------------------------ SIGINT, as SIGTERM
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Python's own KeyboardInterrupt stays
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        sigterm = signal.getsignal(signal.SIGTERM)
        if self.signum is not None or not callable(sigterm):
            raise KeyboardInterrupt  # a second Ctrl+C (or no handler to defer to): stop now
        self.signum = signal.SIGINT
        log.warning("SIGINT: finishing this batch, then saving the run (Ctrl+C again stops at once, unsaved)")
        sigterm(signal.SIGTERM, frame)  # Lightning's handler: stop after the batch, on every rank

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            try:
                signal.signal(signal.SIGINT, self._previous_sigint)
            except ValueError:
                pass
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    # ------------------------------------------------------------------ the interruption
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return  # KeyboardInterrupt raised anywhere: the state may be mid-step; nothing saved
        signum = self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        code = exit_code(signum)
        # SIGTERMException is a SystemExit with no code: the process would exit 0.
        exception.code = code
        path = self.dirpath / "last.ckpt"
        where = f"epoch {trainer.current_epoch + 1}, after {trainer.global_step} optimizer step(s)"
        if not trainer.training:
            if trainer.is_global_zero:
                log.warning("%s during %s (%s): nothing saved; %s is the end of the previous epoch. "
                            "Exit code %d.", name, "validation" if trainer.validating else "set-up", where,
                            path, code)
            return
        trainer.save_checkpoint(path, weights_only=False)
        if not trainer.is_global_zero:
            return
        command = resume_command(sys.argv, path)
        how = f"{command}" if command else f"trainer.fit(..., ckpt_path={str(path)!r})"
        log.warning("%s: stopped in %s; the interrupted state is saved in %s. Resume with: %s. Exit code %d.",
                    name, where, path, how, code)
