"""Task LightningModules and network blocks."""

from lightrainer.modules.classification import ClassificationModule

__all__ = ["ClassificationModule"]
