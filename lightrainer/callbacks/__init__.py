"""Lightning callbacks of a lightrainer run.

The run-folder callbacks are imported here; the feature callbacks (quantization, export, pictures)
load their optional dependencies only when used, so they are imported on first access.
"""

from importlib import import_module
from typing import Any

from lightrainer.callbacks.checkpoint import RunCheckpoint
from lightrainer.callbacks.early_stopping import FitnessEarlyStopping
from lightrainer.callbacks.interrupt import InterruptCheckpoint
from lightrainer.callbacks.progress import EpochLines, LightrainerProgressBar
from lightrainer.callbacks.results import ResultsCSV
from lightrainer.callbacks.summary import RunSummary

_LAZY = {
    "ExportCallback": "lightrainer.callbacks.export",
    "PTQCallback": "lightrainer.callbacks.ptq",
    "QATCallback": "lightrainer.callbacks.qat",
    "PredictionWriter": "lightrainer.callbacks.predictions",
    "TestResults": "lightrainer.callbacks.test_results",
}

__all__ = ["EpochLines", "FitnessEarlyStopping", "InterruptCheckpoint", "LightrainerProgressBar", "ResultsCSV",
           "RunCheckpoint", "RunSummary", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightrainer.callbacks' has no attribute {name!r}")
