"""lightrainer: train a PyTorch model from one flat YAML file, on PyTorch Lightning.

Importing the package registers every built-in entry of the registries (optimizers, schedules,
calibration methods, quantization backends, export formats, tasks), so that a config validated
anywhere sees them; a user's own entries register the same way, from their own modules.
"""

from lightrainer.config import Config, ConfigError, TaskKey, load_config
from lightrainer.module import LightrainerModule
from lightrainer.trainer import build_trainer
from lightrainer.sweep import tune
from lightrainer.version import __version__

# The built-in entries of the registries (imported for their registrations).
import lightrainer.datamodules  # noqa: E402,F401
import lightrainer.export  # noqa: E402,F401
import lightrainer.modules  # noqa: E402,F401
import lightrainer.quant  # noqa: E402,F401

__all__ = ["Config", "ConfigError", "LightrainerModule", "TaskKey", "build_trainer", "load_config", "tune", "__version__"]
