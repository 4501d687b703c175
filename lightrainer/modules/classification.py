"""Image (or any tensor) classification on the shared base."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from lightrainer.callbacks.classification_plots import ClassificationPlots, class_report, plot_confusion
from lightrainer.config import Config, ConfigError, TaskKey, unit_interval
from lightrainer.datamodules.augment import WithAugmentKeys, augment_values
from lightrainer.datamodules.mnist import MNIST5kDataModule
from lightrainer.module import LightrainerModule, StepOutput
from lightrainer.modules.augment_preview import AugmentPreview
from lightrainer.modules.backbones import backbone_normalization, build_backbone, check_net
from lightrainer.modules.nets import SmallCNN
from lightrainer.record import BUILD_SPECS_ATTR
from lightrainer.task import ExportOutput, ExportPart, ExportSpec, TestReport

log = logging.getLogger(__name__)


def _infer_num_classes(net: nn.Module) -> int:
    if isinstance(getattr(net, "num_classes", None), int):
        return net.num_classes
    last_linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1].out_features
    raise ValueError(
        "cannot tell the number of classes of this network: pass num_classes=... to ClassificationModule"
    )


class ClassificationModule(LightrainerModule):
    """Cross-entropy classification of any ``nn.Module`` that returns logits.

    Logs loss, top-1 accuracy (``val/acc``) and, with at least 5 classes, top-5 accuracy
    (``val/acc_top5``). Fitness is ``val/acc``. A test also reports precision, recall and F1 per
    class and ``confusion_matrix_test.png`` (:meth:`test_report`); predict writes the predicted
    class, its probability and the top 5 (:meth:`prediction_columns`). Its keys: ``label_smoothing``; ``net`` and
    ``pretrained`` (a timm or torchvision backbone by name, :mod:`lightrainer.modules.backbones`);
    the augmentation keys (:mod:`lightrainer.datamodules.augment`, applied by the datamodule to
    training batches; with ``mixup``/``cutmix`` the training targets are class probabilities).

    Args:
        net: the network; ``net(x)`` returns logits of shape (N, num_classes).
        cfg: the validated config (``label_smoothing`` applies to the loss).
        num_classes: class count; read from ``net.num_classes`` or its last Linear when omitted.

    Raises:
        ConfigError: the YAML names a backbone (``net``) and another network was given.
    """

    task_name = "classification"
    task_keys = WithAugmentKeys({
        "label_smoothing": TaskKey(float, 0.0, unit_interval, "cross-entropy label smoothing"),
        "net": TaskKey(str, None, check_net, "backbone by name: timm/NAME or torchvision/NAME (None: SmallCNN)"),
        "pretrained": TaskKey(bool, False, None, "load the backbone's pretrained weights (local cache only)"),
    })
    metric_modes = {"loss": "min", "acc": "max", "acc_top5": "max"}
    fitness_key = "val/acc"
    fitness_mode = "max"
    default_datamodule = MNIST5kDataModule
    #: Rebuilt from a weights file, a backbone needs no pretrained download: the file holds the weights.
    rebuild_overrides = {"pretrained": False}
    export_spec = ExportSpec(parts=(ExportPart(input_name="images", outputs=(ExportOutput("logits", "argmax"),)),))

    def __init__(self, net: nn.Module | None = None, cfg: Config | None = None, num_classes: int | None = None) -> None:
        super().__init__(net, cfg)
        named = cfg.extra("net")
        if named is not None and getattr(net, "lightrainer_backbone", None) != named:
            raise ConfigError(
                f"net: the config names the backbone {named} but the task was given another network "
                f"({type(net).__name__}): keep one (the net key, or a model: init_args: net: section)"
            )
        if named is not None:
            # The config names the network: a run's record rebuilds it with default_net from the
            # config (a timm or torchvision model's own arguments are not plain data).
            setattr(self, BUILD_SPECS_ATTR, {**(getattr(self, BUILD_SPECS_ATTR, None) or {}), "net": {"default": True}})
        self.num_classes = num_classes or _infer_num_classes(net)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        self.metrics = nn.ModuleDict(
            {stage: self._stage_metrics() for stage in ("val", "test")}
        )
        # The test's confusion matrix, summed over every rank when computed (its states are not
        # saved: checkpoints are unchanged).
        self.test_confusion = MulticlassConfusionMatrix(self.num_classes, validate_args=False)

    @classmethod
    def default_net(cls, cfg: Config, datamodule: Any) -> nn.Module:
        """The network the CLI trains when the YAML names none in a ``model:`` section: the
        backbone of the ``net`` key, else SmallCNN; sized to the data's classes and channels.

        With ``pretrained: True`` the weights come from the local cache, and a datamodule that
        can (``adopt_normalization``) normalises as they expect.

        Raises:
            ConfigError: ``pretrained`` without a backbone, or weights not in the local cache.
        """
        num_classes = getattr(datamodule, "num_classes", None) or 10
        shape = tuple(getattr(datamodule, "input_shape", None) or (1,))
        name, pretrained = cfg.extra("net"), cfg.extra("pretrained")
        if name is None:
            if pretrained:
                raise ConfigError("pretrained: True needs a backbone with pretrained weights: name one "
                                  "(net: timm/resnet18 or net: torchvision/resnet18); the default SmallCNN has none")
            return SmallCNN(num_classes=num_classes, in_channels=shape[0])
        net = build_backbone(name, num_classes, shape[0], shape[1:] if len(shape) == 3 else None, pretrained)
        adopt = getattr(datamodule, "adopt_normalization", None)
        if pretrained and callable(adopt):
            adopt(*backbone_normalization(name))
        return net

    def on_train_start(self) -> None:
        super().on_train_start()
        wanted = sorted(k for k, v in augment_values(self.cfg).items() if v > 0)
        if wanted and getattr(self.trainer.train_dataloader, "transform", None) is None:
            log.warning("augmentation keys %s are set but %s does not apply them to its training batches "
                        "(the lightrainer datamodules of image tensors and folders do)", ", ".join(wanted),
                        type(self.trainer.datamodule).__name__ if self.trainer.datamodule else "the training data")

    def _stage_metrics(self) -> nn.ModuleDict:
        # validate_args=False: the argument checks sync with the host on every update.
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro", validate_args=False)}
        if self.num_classes >= 5:
            metrics["acc_top5"] = MulticlassAccuracy(
                self.num_classes, top_k=5, average="micro", validate_args=False
            )
        return nn.ModuleDict(metrics)

    def step(self, batch: Any, stage: str) -> StepOutput:
        x, y = batch[0], batch[1]
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.extra("label_smoothing"))
        if stage == "train":
            return loss, {}
        metrics = self.metrics[stage]
        for metric in metrics.values():
            metric.update(logits, y)
        if stage == "test":
            self.test_confusion.update(logits.argmax(1), y)
        return loss, dict(metrics.items())

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()  # a second test of the same module starts from zero

    def class_names(self) -> list[str]:
        """The datamodule's class names, else the class indices."""
        names = getattr(getattr(self.attached_trainer(), "datamodule", None), "class_names", None)
        return list(names) if names and len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def test_report(self, run_dir: Path) -> TestReport:
        """Precision, recall, F1 and support per class (and their averages, and the accuracy) from
        the test's confusion matrix over every rank; ``confusion_matrix_test.png`` (``plots``)."""
        counts = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        names = self.class_names()
        pictures = []
        trainer = self.attached_trainer()
        if self.cfg.plots and (trainer is None or trainer.is_global_zero):
            pictures.append(str(plot_confusion(counts, names, Path(run_dir) / "confusion_matrix_test.png", split="test")))
        return TestReport(rows=class_report(counts, names), pictures=pictures)

    def prediction_columns(self, output: Tensor, batch: Any) -> dict[str, Any]:
        """The predicted class (``pred``, ``pred_name``), its probability (``confidence``), the
        top 5 (up to the class count) and, for labeled batches, ``target``/``target_name``/``correct``."""
        names = self.class_names()
        probs = output.float()
        top = probs.topk(min(5, self.num_classes), dim=1).indices.cpu()
        pred = top[:, 0]
        columns: dict[str, Any] = {"pred": pred, "pred_name": [names[i] for i in pred.tolist()],
                                   "confidence": probs.max(dim=1).values.cpu(), f"top{top.shape[1]}": top}
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and batch[1].dim() == 1:
            target = batch[1].cpu()
            columns.update(target=target, target_name=[names[i] for i in target.tolist()],
                           correct=(pred == target).int())
        return columns

    def configure_callbacks(self) -> list:
        """Confusion matrix and worst-classified images at the end of fit, and ``aug_preview.png``
        (the first augmented training batch) at its start (when ``plots``)."""
        return [ClassificationPlots(), AugmentPreview()] if self.cfg.plots else []

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(self.example_input(batch)).softmax(dim=1)
