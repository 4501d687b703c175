"""How a sweep runs: the flags of ``lightrainer tune`` beside ``--config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Where trials run: this machine (``optuna``) or a Ray cluster.
BACKENDS = ("optuna", "ray")


@dataclass
class SweepOptions:
    """How a sweep runs (the flags of ``lightrainer tune`` beside ``--config``)."""

    space: Any
    trials: int = 20
    resume: bool = False
    workers: int = 1
    storage: str | None = None
    backend: str = "optuna"
    address: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    timeout: float | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    quiet: bool = True
