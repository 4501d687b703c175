"""Benchmark helper callback: records the wall-clock time of the first training step."""

from __future__ import annotations

import os
import time

import lightning as L


class FirstStepTimer(L.Callback):
    """Writes ``time.time()`` at the first training batch to the file named by $LT_FIRST_STEP_FILE."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = os.environ.get("LT_FIRST_STEP_FILE")
        if path and not os.path.exists(path):
            with open(path, "w") as f:
                f.write(repr(time.time()))
