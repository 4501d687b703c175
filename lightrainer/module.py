"""LightrainerModule: the base every task subclasses.

A task writes :meth:`LightrainerModule.step` (the seed's ``get_loss`` plus its metrics) and names
its fitness. The base owns what the seed's trainer did by hand: the four parameter groups and the
optimizer, the lr schedule, per-iteration warmup of lr and momentum with the accumulate ramp, the
step rule ``ni - last_opt_step >= accumulate`` with summed micro-batch gradients, gradient
clipping, and epoch means of everything the task returns. The Lightning Trainer owns the loop.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from lightrainer.config import Config, ConfigError
from lightrainer.ema import ModelEMA
from lightrainer.optim import build_optimizer, schedule
from lightrainer.record import class_path_of, run_record
from lightrainer.registry import TASKS
from lightrainer.task import ExportSpec, TaskKey, resolve_fitness, task_name_of

log = logging.getLogger(__name__)

StepOutput = tuple[Tensor, Mapping[str, "Tensor | torchmetrics.Metric"]]


class LightrainerModule(L.LightningModule):
    """Base LightningModule: optimizer groups, schedule, warmup, accumulation, fitness.

    A task subclasses it, writes :meth:`step`, and declares itself on its class (see
    :mod:`lightrainer.task`): ``task_keys``, ``metric_modes``, ``fitness_key``/``fitness_mode``,
    ``default_net``, ``default_datamodule`` and ``export_spec``. Defining the subclass registers
    it as a task under ``task_name``, so a YAML can name it (``task: NAME``) and every command
    treats it as it treats the built-in tasks.

    Args:
        net: the network; only its parameters are optimised and saved to ``weights/*.pt``.
        cfg: the validated config.
    """

    #: Name in the task registry and value of the ``task`` key (default: from the class name).
    task_name: str | None = None
    #: YAML keys the task adds: name -> TaskKey(type, default, check, doc).
    task_keys: Mapping[str, TaskKey] = {}
    #: Direction ("min"/"max") of each metric the task logs, named without the stage prefix.
    metric_modes: Mapping[str, str] = {"loss": "min"}
    #: Metric that selects the best epoch and drives early stopping (``cfg.fitness`` overrides).
    fitness_key: str = "val/loss"
    #: "max" when a larger fitness is better, else "min".
    fitness_mode: str = "min"
    #: The datamodule class a YAML without a ``data:`` section trains on (None: one is required).
    default_datamodule: type | None = None
    #: How the network exports (graphs, input and output names, how each output verifies).
    export_spec: ExportSpec = ExportSpec()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A task registers when its class is defined: by its module's import, by the CLI's import
        # of a class_path, or in a notebook cell. The latest definition of a name wins (a
        # notebook re-runs its cells).
        TASKS.register(task_name_of(cls), cls, override=True)

    @classmethod
    def default_net(cls, cfg: Config, datamodule: Any) -> nn.Module:
        """The network trained when the YAML names none (``model: init_args: net:``).

        Called before Lightning sets the datamodule up (``datamodule.setup`` has not run): a task
        whose network depends on the data (its classes, a graph) may call ``datamodule.setup("fit")``
        itself; the built-in datamodules know their shapes from their arguments.

        Raises:
            ConfigError: the task has none (override to give one).
        """
        raise ConfigError(
            f"{cls.__name__} has no default network: name one in the YAML "
            "(model: init_args: net: class_path: ...) or override default_net"
        )

    def __init__(self, net: nn.Module | None = None, cfg: Config | None = None) -> None:
        # net defaults to None only so that a YAML may leave it out: lightrainer.build then gives
        # the task's default_net. A module is never built without one.
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(
                f"net must be a torch.nn.Module, got {type(net).__name__}: pass the network, or build the "
                "task with lightrainer.build.build_from_config(cfg) to get its default_net"
            )
        if not isinstance(cfg, Config):
            raise TypeError("cfg must be a lightrainer Config: build it with lightrainer.load_config(...)")
        cfg.bind_task(type(self))
        self.net = net
        self.cfg = cfg
        self.automatic_optimization = False
        #: Multiplies lr0 (QAT trains at a tenth, as the seed did).
        self.lr_scale = 1.0
        self._lf = schedule(cfg)
        self._last_opt_step = -1
        self._accumulate = cfg.accumulate
        self._train_sums: dict[str, Tensor] = {}
        self._train_counts: dict[str, int] = {}
        self._train_means: dict[str, float] | None = None
        self._stage_means = nn.ModuleDict()
        self._pending_grads: dict[str, Tensor] = {}
        #: The weights' moving average (``ema: True``), made when the fit starts.
        self.ema: ModelEMA | None = None
        self._ema_state: dict[str, Any] | None = None
        self._net_prepared = False

    # ------------------------------------------------------------------ the task's part
    def step(self, batch: Any, stage: str) -> StepOutput:
        """Compute the loss and named metrics of one batch.

        Args:
            batch: a batch from the datamodule.
            stage: "train", "val" or "test".

        Returns:
            (loss, items): the loss to backpropagate, and named scalar tensors (logged as epoch
            means weighted by batch size) or torchmetrics Metrics the step has updated. A costly
            training metric may be returned on some batches only: its epoch mean is over the
            batches that returned it. Under DDP every rank must return the same names in an epoch
            (decide by the batch's position, as the VQ-VAE's ``train_ssim_every`` does, not by its data).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def example_input(self, batch: Any) -> Tensor:
        """The network input of a batch (the first element of a tuple/list batch).

        Export traces the network on it and verifies on it: axis 0 must be the batch axis (it is
        made dynamic). A network that takes a whole graph (N nodes, F features) exports with a
        leading graph axis, (1, N, F)."""
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def weights_state_dict(self) -> dict[str, Tensor]:
        """What ``weights/best.pt`` and ``weights/last.pt`` hold as "model": the EMA weights when
        ``ema`` is on (those validated, and exported), else the network's (override to save part)."""
        return (self.ema.module if self.ema is not None else self.net).state_dict()

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or None when it is used outside one."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    # ------------------------------------------------------------------ fitness
    @property
    def fitness_monitor(self) -> tuple[str, str]:
        """(metric name, "min" | "max") that selects the best epoch: the ``fitness`` key, with the
        direction the task declares for that metric (``metric_modes``), or the task's default."""
        return resolve_fitness(type(self), self.cfg.fitness)

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
        self._train_sums, self._train_counts, self._train_means = {}, {}, None

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

        batch = _to_channels_last(batch) if self.cfg.channels_last else batch
        loss, items = self.step(batch, "train")
        steps_now = ni - self._last_opt_step >= self._accumulate
        # Micro-batch gradients are summed (the seed's rule): the loss is not divided by accumulate.
        # Under DDP only the micro-batch that steps all-reduces; the others accumulate locally.
        with self._gradient_sync(steps_now):
            self.manual_backward(self._shard_weighted(loss, batch_idx, self._batch_size(batch)))
        if steps_now:
            lightning_optimizer = self.optimizers()
            lightning_optimizer.step()
            lightning_optimizer.zero_grad(set_to_none=True)
            self._last_opt_step = ni
            if self.ema is not None:
                self.ema.update(self.net)
            self.on_optimizer_step_done()

        self._accumulate_train_items(loss, items, self._batch_size(batch))
        self.log("loss", self._train_sums["loss"] / self._train_counts["loss"], prog_bar=True, logger=False)
        return loss

    def on_optimizer_step_done(self) -> None:
        """Called after each optimizer step (EMA and similar hook in here)."""

    # ------------------------------------------------------------------ several processes
    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return contextlib.nullcontext() if sync or block is None or self.trainer.world_size == 1 else block()

    def _mean_over_ranks(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        # One all-reduce of the flattened tensors; every rank must call this (checkpoint saving does).
        flat = torch.cat([t.flatten() for t in tensors.values()])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        parts = flat.split([t.numel() for t in tensors.values()])
        return {name: part.view_as(t) for (name, t), part in zip(tensors.items(), parts)}

    def _shard_weighted(self, loss: Tensor, batch_idx: int, n: int) -> Tensor:
        """``loss * W * n_r / N`` for a global batch of N split unevenly over W ranks.

        DDP averages the ranks' gradients; each rank's loss is a mean over its n_r samples, so
        only this weight makes the average the gradient of the mean over the global batch (equal
        shards: weight 1). A loader that splits a global batch unevenly (the in-memory loader's
        last one) says so by a method ``global_batch_samples(batch_idx) -> N``; a loader without
        it (a DistributedSampler pads every rank to the same size) has equal shards.
        """
        world = self.trainer.world_size
        global_batch_samples = getattr(self.trainer.train_dataloader, "global_batch_samples", None)
        if world == 1 or not callable(global_batch_samples):
            return loss
        weight = world * n / global_batch_samples(batch_idx)
        return loss if weight == 1 else loss * weight

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
            self._train_counts[name] = self._train_counts.get(name, 0) + n

    def train_epoch_means(self) -> dict[str, float]:
        """Means over this epoch's training batches (all ranks), computed once per epoch."""
        if self._train_means is None:
            if not self._train_sums:
                return {}
            names = sorted(self._train_sums)
            sums = torch.stack([self._train_sums[k] for k in names])
            totals = torch.cat([sums, sums.new_tensor([float(self._train_counts[k]) for k in names])])
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum") if self.trainer.world_size > 1 else totals
            values = (totals[:len(names)] / totals[len(names):]).tolist()
            self._train_means = dict(zip(names, values))
        return self._train_means

    def current_lrs(self) -> dict[str, float]:
        """lr of each parameter group, by group name."""
        optimizer = self._raw_optimizer()
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def on_train_epoch_end(self) -> None:
        metrics = {f"train/{k}": v for k, v in self.train_epoch_means().items()}
        metrics.update(self.current_lrs())
        # Already reduced over ranks; sync_dist only tells Lightning so (a mean of equal values).
        self.log_dict(metrics, logger=True, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        batch = _to_channels_last(batch) if self.cfg.channels_last else batch
        with self._ema_swapped_in():
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
        pending = {n: p.grad.detach() for n, p in self.net.named_parameters() if p.grad is not None}
        if pending and self.trainer.world_size > 1:
            # Gradients accumulated without all-reduce differ by rank; a resumed run must start
            # from their mean (what the next synchronised backward would have averaged).
            pending = self._mean_over_ranks(pending)
        pending = {n: g.cpu() for n, g in pending.items()}
        checkpoint["lightrainer"] = {
            "last_opt_step": self._last_opt_step,
            "pending_grads": pending,
            "config": self.cfg.to_dict(),
            "task": class_path_of(type(self)),
            "run": run_record(self, getattr(self.attached_trainer(), "datamodule", None),
                              self.cfg.to_dict()),
            "ema": self.ema.state_dict() if self.ema is not None else None,
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
        self._ema_state = state.get("ema")

    def on_train_start(self) -> None:
        # Restored here: Lightning's restore path clears gradients after on_load_checkpoint.
        params = dict(self.net.named_parameters())
        for name, grad in self._pending_grads.items():
            if name in params:
                params[name].grad = grad.to(params[name].device, params[name].dtype)
        self._pending_grads = {}

    # ------------------------------------------------------------------ speed options
    def configure_model(self) -> None:
        """``channels_last`` and ``compile`` of the network, once (after QAT swapped its layers)."""
        if self._net_prepared:
            return
        self._net_prepared = True
        if self.cfg.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            # In place: the state_dict keys (checkpoints, weights/*.pt) stay those of the eager net.
            self.net.compile()

    def on_fit_start(self) -> None:
        if self.cfg.ema and self.ema is None:
            self.ema = ModelEMA(self.net, self.cfg.ema_decay, self.cfg.ema_tau).to(self.device)
        if self.ema is not None and self._ema_state is not None:
            self.ema.load_state_dict(self._ema_state)
        self._ema_state = None

    @contextlib.contextmanager
    def _ema_swapped_in(self) -> Any:
        # Validation and test run the moving average (Ultralytics validates the EMA).
        if self.ema is None:
            yield
            return
        net, self.net = self.net, self.ema.module
        try:
            yield
        finally:
            self.net = net


def _to_channels_last(batch: Any) -> Any:
    """4-D floating tensors of a batch (tuple/list/tensor) in channels-last memory format."""
    if isinstance(batch, Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 and batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_channels_last(b) for b in batch)
    return batch
