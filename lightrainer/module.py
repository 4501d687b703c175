"""LightrainerModule: the base every task subclasses.

A task writes :meth:`LightrainerModule.step` (the seed's ``get_loss`` plus its metrics) and names
its fitness. The base owns what the seed's trainer did by hand: the four parameter groups and the
optimizer, the lr schedule, per-iteration warmup of lr and momentum with the accumulate ramp, the
step rule ``ni - last_opt_step >= accumulate`` with summed micro-batch gradients, gradient
clipping, and epoch means of everything the task returns. The Lightning Trainer owns the loop.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from lightrainer.config import Config
from lightrainer.optim import build_optimizer, schedule

log = logging.getLogger(__name__)

StepOutput = tuple[Tensor, Mapping[str, "Tensor | torchmetrics.Metric"]]

# Substrings of metric names where lower is better, for a fitness named in the config.
_LOWER_IS_BETTER = ("loss", "lpips", "error", "mse", "mae")


class LightrainerModule(L.LightningModule):
    """Base LightningModule: optimizer groups, schedule, warmup, accumulation, fitness.

    Args:
        net: the network; only its parameters are optimised and saved to ``weights/*.pt``.
        cfg: the validated config.

    Subclasses implement :meth:`step` and set :attr:`fitness_key` / :attr:`fitness_mode`.
    """

    #: Metric that selects the best epoch and drives early stopping (``cfg.fitness`` overrides).
    fitness_key: str = "val/loss"
    #: "max" when a larger fitness is better, else "min".
    fitness_mode: str = "min"

    def __init__(self, net: nn.Module, cfg: Config) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(cfg, Config):
            raise TypeError("cfg must be a lightrainer Config: build it with lightrainer.load_config(...)")
        self.net = net
        self.cfg = cfg
        self.automatic_optimization = False
        #: Multiplies lr0 (QAT trains at a tenth, as the seed did).
        self.lr_scale = 1.0
        self._lf = schedule(cfg)
        self._last_opt_step = -1
        self._accumulate = cfg.accumulate
        self._train_sums: dict[str, Tensor] = {}
        self._train_count = 0
        self._train_means: dict[str, float] | None = None
        self._stage_means = nn.ModuleDict()
        self._pending_grads: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ the task's part
    def step(self, batch: Any, stage: str) -> StepOutput:
        """Compute the loss and named metrics of one batch.

        Args:
            batch: a batch from the datamodule.
            stage: "train", "val" or "test".

        Returns:
            (loss, items): the loss to backpropagate, and named scalar tensors (logged as epoch
            means weighted by batch size) or torchmetrics Metrics the step has updated.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def example_input(self, batch: Any) -> Tensor:
        """The network input of a batch (the first element of a tuple/list batch)."""
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def weights_state_dict(self) -> dict[str, Tensor]:
        """What ``weights/best.pt`` and ``weights/last.pt`` hold as "model" (override to save part)."""
        return self.net.state_dict()

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    # ------------------------------------------------------------------ fitness
    @property
    def fitness_monitor(self) -> tuple[str, str]:
        """(metric name, "min" | "max") that selects the best epoch."""
        if self.cfg.fitness:
            key = self.cfg.fitness if "/" in self.cfg.fitness else f"val/{self.cfg.fitness}"
            mode = "min" if any(s in key for s in _LOWER_IS_BETTER) else "max"
            return key, mode
        return self.fitness_key, self.fitness_mode

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.net, self.cfg, lr0=self.cfg.lr0 * self.lr_scale)

    def lr_factor(self, epoch: int) -> float:
        """lf(epoch) of the configured schedule: epoch trains at lr0 * lf(epoch)."""
        return self._lf(epoch)

    def on_train_epoch_start(self) -> None:
        optimizer = self._raw_optimizer()
        factor = self.lr_factor(self.current_epoch)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._train_sums, self._train_count, self._train_means = {}, 0, None

    def _raw_optimizer(self) -> torch.optim.Optimizer:
        optimizer = self.optimizers()
        return getattr(optimizer, "optimizer", optimizer)

    def _warmup(self, optimizer: torch.optim.Optimizer, ni: int, nw: int) -> None:
        """Per-iteration warmup (Ultralytics): ramp accumulate, lr and momentum until ni > nw."""
        if ni > nw:
            self._accumulate = self.cfg.accumulate
            return
        xi = [0, nw]
        self._accumulate = max(1, int(np.interp(ni, xi, [1, self.cfg.nbs / self.cfg.batch]).round()))
        factor = self.lr_factor(self.current_epoch)
        for group in optimizer.param_groups:
            start = self.cfg.warmup_bias_lr * self.lr_scale if group.get("name") == "bias" else 0.0
            group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * factor]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(ni, xi, [self.cfg.warmup_momentum, self.cfg.momentum]))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self._raw_optimizer()
        nb = self.trainer.num_training_batches
        ni = batch_idx + nb * self.current_epoch
        self._warmup(optimizer, ni, self.cfg.warmup_iters(nb))

        loss, items = self.step(batch, "train")
        # Micro-batch gradients are summed (the seed's rule): the loss is not divided by accumulate.
        self.manual_backward(loss)
        if ni - self._last_opt_step >= self._accumulate:
            lightning_optimizer = self.optimizers()
            lightning_optimizer.step()
            lightning_optimizer.zero_grad(set_to_none=True)
            self._last_opt_step = ni
            self.on_optimizer_step_done()

        self._accumulate_train_items(loss, items, self._batch_size(batch))
        self.log("loss", self._train_sums["loss"] / self._train_count, prog_bar=True, logger=False)
        return loss

    def on_optimizer_step_done(self) -> None:
        """Called after each optimizer step (EMA and similar hook in here)."""

    def on_validation_model_zero_grad(self) -> None:
        # Lightning clears gradients before validating; micro-batch gradients not yet stepped
        # carry over into the next epoch instead, as in the seed and Ultralytics.
        pass

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after AMP unscaling, so the norm is of the true gradients.
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm=self.cfg.grad_clip)

    # ------------------------------------------------------------------ epoch means
    def _batch_size(self, batch: Any) -> int:
        return int(self.example_input(batch).shape[0])

    @torch.no_grad()
    def _accumulate_train_items(self, loss: Tensor, items: Mapping[str, Any], n: int) -> None:
        # Sums stay on the device: no host sync in the hot path.
        values = {"loss": loss, **{k: v for k, v in items.items() if isinstance(v, Tensor)}}
        for name, value in values.items():
            value = value.detach().float() * n
            self._train_sums[name] = self._train_sums[name] + value if name in self._train_sums else value
        self._train_count += n

    def train_epoch_means(self) -> dict[str, float]:
        """Means over this epoch's training batches (all ranks), computed once per epoch."""
        if self._train_means is None:
            if not self._train_sums:
                return {}
            names = sorted(self._train_sums)
            totals = torch.stack([self._train_sums[k] for k in names] + [self._train_sums["loss"].new_tensor(self._train_count)])
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum") if self.trainer.world_size > 1 else totals
            values = (totals[:-1] / totals[-1]).tolist()
            self._train_means = dict(zip(names, values))
        return self._train_means

    def current_lrs(self) -> dict[str, float]:
        """lr of each parameter group, by group name."""
        optimizer = self._raw_optimizer()
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def on_train_epoch_end(self) -> None:
        metrics = {f"train/{k}": v for k, v in self.train_epoch_means().items()}
        metrics.update(self.current_lrs())
        self.log_dict(metrics, logger=True, on_epoch=True)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss, items = self.step(batch, stage)
        n = self._batch_size(batch)
        fitness = self.fitness_monitor[0].split("/", 1)[-1]
        for name, value in {"loss": loss, **dict(items)}.items():
            key = f"{stage}/{name}"
            on_bar = name in ("loss", fitness)
            if isinstance(value, torchmetrics.Metric):
                self.log(key, value, on_step=False, on_epoch=True, prog_bar=on_bar)
                continue
            attr = f"{stage}_{name}".replace(".", "_").replace("/", "_")
            if attr not in self._stage_means:
                self._stage_means[attr] = torchmetrics.MeanMetric().to(self.device)
            metric = self._stage_means[attr]
            metric.update(value.detach().float(), n)
            self.log(
                key,
                metric,
                on_step=False,
                on_epoch=True,
                batch_size=n,
                prog_bar=on_bar,
                metric_attribute=f"_stage_means.{attr}",
            )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self(self.example_input(batch))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Micro-batch gradients not yet stepped carry into the next epoch: keep them, so a resumed
        # run continues exactly.
        pending = {n: p.grad.detach().cpu() for n, p in self.net.named_parameters() if p.grad is not None}
        checkpoint["lightrainer"] = {
            "last_opt_step": self._last_opt_step,
            "pending_grads": pending,
            "config": self.cfg.to_dict(),
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lightrainer")
        if state is None:
            raise ValueError(
                "this checkpoint was not written by lightrainer (no 'lightrainer' entry): "
                "resume from <run>/weights/last.ckpt of a lightrainer run"
            )
        self._last_opt_step = int(state["last_opt_step"])
        self._pending_grads = state.get("pending_grads", {})

    def on_train_start(self) -> None:
        # Restored here: Lightning's restore path clears gradients after on_load_checkpoint.
        params = dict(self.net.named_parameters())
        for name, grad in self._pending_grads.items():
            if name in params:
                params[name].grad = grad.to(params[name].device, params[name].dtype)
        self._pending_grads = {}
