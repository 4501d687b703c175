"""Image (or any tensor) classification on the shared base."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightrainer.callbacks.classification_plots import ClassificationPlots
from lightrainer.config import Config, TaskKey, unit_interval
from lightrainer.datamodules.mnist import MNIST5kDataModule
from lightrainer.module import LightrainerModule, StepOutput
from lightrainer.modules.nets import SmallCNN
from lightrainer.task import ExportOutput, ExportPart, ExportSpec


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
    (``val/acc_top5``). Fitness is ``val/acc``. Its key: ``label_smoothing``.

    Args:
        net: the network; ``net(x)`` returns logits of shape (N, num_classes).
        cfg: the validated config (``label_smoothing`` applies to the loss).
        num_classes: class count; read from ``net.num_classes`` or its last Linear when omitted.
    """

    task_name = "classification"
    task_keys = {"label_smoothing": TaskKey(float, 0.0, unit_interval, "cross-entropy label smoothing")}
    metric_modes = {"loss": "min", "acc": "max", "acc_top5": "max"}
    fitness_key = "val/acc"
    fitness_mode = "max"
    default_datamodule = MNIST5kDataModule
    export_spec = ExportSpec(parts=(ExportPart(input_name="images", outputs=(ExportOutput("logits", "argmax"),)),))

    def __init__(self, net: nn.Module, cfg: Config, num_classes: int | None = None) -> None:
        super().__init__(net, cfg)
        self.num_classes = num_classes or _infer_num_classes(net)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        self.metrics = nn.ModuleDict(
            {stage: self._stage_metrics() for stage in ("val", "test")}
        )

    @classmethod
    def default_net(cls, cfg: Config, datamodule: Any) -> nn.Module:
        """The network the CLI trains when the YAML names none: SmallCNN sized to the data."""
        num_classes = getattr(datamodule, "num_classes", None) or 10
        in_channels = (getattr(datamodule, "input_shape", None) or (1,))[0]
        return SmallCNN(num_classes=num_classes, in_channels=in_channels)

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
        return loss, dict(metrics.items())

    def configure_callbacks(self) -> list:
        """Confusion matrix and worst-classified images at the end of fit (when ``plots``)."""
        return [ClassificationPlots()] if self.cfg.plots else []

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(self.example_input(batch)).softmax(dim=1)
