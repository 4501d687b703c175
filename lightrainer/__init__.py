"""lightrainer: train a PyTorch model from one flat YAML file, on PyTorch Lightning."""

from lightrainer.config import Config, ConfigError, load_config
from lightrainer.module import LightrainerModule
from lightrainer.trainer import build_trainer

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "LightrainerModule", "build_trainer", "load_config", "__version__"]
