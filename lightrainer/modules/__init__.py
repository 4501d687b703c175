"""Task LightningModules and network blocks."""

from lightrainer.modules.blocks import (
    Conv,
    Conv2dWithConstraint,
    ConvWithConstraint,
    DWConvWithConstraint,
    LinearWithConstraint,
    SeparableConv,
)
from lightrainer.modules.classification import ClassificationModule
from lightrainer.modules.nets import SmallCNN

__all__ = [
    "ClassificationModule",
    "Conv",
    "Conv2dWithConstraint",
    "ConvWithConstraint",
    "DWConvWithConstraint",
    "LinearWithConstraint",
    "SeparableConv",
    "SmallCNN",
]
