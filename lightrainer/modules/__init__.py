"""Task LightningModules and network blocks."""

from lightrainer.modules.blocks import (
    Conv,
    Conv2dWithConstraint,
    ConvWithConstraint,
    DWConvWithConstraint,
    LinearWithConstraint,
    SeparableConv,
)
from lightrainer.modules.augment_preview import AugmentPreview
from lightrainer.modules.backbones import BACKBONE_SOURCES, BackboneSource, build_backbone
from lightrainer.modules.classification import ClassificationModule
from lightrainer.modules.nets import SmallCNN
from lightrainer.modules.vqvae import CodebookUsage, VQVAEModule, build_lpips, build_vqvae
from lightrainer.modules.vqvae_net import VQVAE, VQVAEDecoder, VQVAEEncoder, VectorQuantizer

__all__ = [
    "AugmentPreview",
    "BACKBONE_SOURCES",
    "BackboneSource",
    "ClassificationModule",
    "build_backbone",
    "Conv",
    "Conv2dWithConstraint",
    "ConvWithConstraint",
    "DWConvWithConstraint",
    "LinearWithConstraint",
    "SeparableConv",
    "SmallCNN",
    "VQVAE",
    "VQVAEDecoder",
    "VQVAEEncoder",
    "VQVAEModule",
    "VectorQuantizer",
    "CodebookUsage",
    "build_lpips",
    "build_vqvae",
]
