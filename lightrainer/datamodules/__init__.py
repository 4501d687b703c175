"""LightningDataModules: in-memory tensors, arrays, image folders and offline built-in sets."""

from lightrainer.datamodules.arrays import ArrayDataModule
from lightrainer.datamodules.augment import AUGMENTATIONS, Augmentation, BatchAugment, register_augmentation
from lightrainer.datamodules.base import LightrainerDataModule, stratified_split
from lightrainer.datamodules.digits import DigitsDataModule
from lightrainer.datamodules.folder import ImageFolderDataModule
from lightrainer.datamodules.memory import InMemoryBatchLoader
from lightrainer.datamodules.mnist import MNIST5kDataModule
from lightrainer.datamodules.photos import PhotoPatchesDataModule, RandomPatchLoader
from lightrainer.datamodules.stream import StreamBatchLoader

__all__ = [
    "AUGMENTATIONS",
    "ArrayDataModule",
    "Augmentation",
    "BatchAugment",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "InMemoryBatchLoader",
    "LightrainerDataModule",
    "MNIST5kDataModule",
    "PhotoPatchesDataModule",
    "RandomPatchLoader",
    "StreamBatchLoader",
    "register_augmentation",
    "stratified_split",
]
