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
import weakref
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from lightrainer.config import Config, ConfigError
from lightrainer.ema import ModelEMA
from lightrainer.errors import TrainingDiverged
from lightrainer.optim import build_optimizer, schedule
from lightrainer.record import class_path_of, run_record
from lightrainer.registry import TASKS
from lightrainer.task import ExportSpec, TaskKey, TestReport, resolve_fitness, task_name_of

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
    #: Keys a run rebuilt from its weights file takes instead of the recorded ones.
    rebuild_overrides: Mapping[str, Any] = {}

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
        self._train_counts: dict[str, Tensor] = {}
        self._train_means: dict[str, float] | None = None
        self._stage_means = nn.ModuleDict()
        self._pending_grads: dict[str, Tensor] = {}
        # Non-finite steps, tracked on the device (no host sync per step): whether a loss since the
        # last optimizer step was NaN/inf, and [skipped steps in a row, in all, the iteration at
        # which the streak passed nan_patience (-1: none)].
        self._loss_not_finite: Tensor | None = None
        self._grad_norm: Tensor | None = None
        self._non_finite: Tensor | None = None
        self._restored_non_finite: list[int] | None = None
        self._reported_non_finite = 0
        self._restored_train_sums: dict[str, Any] = {}
        self._pending_not_finite = False
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
        finite = torch.isfinite(loss.detach()).all()
        self._loss_not_finite = ~finite if self._loss_not_finite is None else self._loss_not_finite | ~finite
        # Micro-batch gradients are summed (the seed's rule): the loss is not divided by accumulate.
        # Under DDP only the micro-batch that steps all-reduces; the others accumulate locally.
        with self._gradient_sync(steps_now):
            self.manual_backward(self._shard_weighted(loss, batch_idx, self._batch_size(batch)))
        if steps_now:
            # A step that would apply a NaN/inf loss or gradient is skipped and its accumulated
            # gradients dropped; the accumulation rule goes on as if it had stepped.
            stepped = self._optimizer_step_unless_non_finite(ni)
            self.optimizers().zero_grad(set_to_none=True)
            self._last_opt_step = ni
            if stepped:
                if self.ema is not None:
                    self.ema.update(self.net)
                self.on_optimizer_step_done()

        self._accumulate_train_items(loss, items, self._batch_size(batch))
        self.log("loss", self._train_sums["loss"] / self._train_counts["loss"], prog_bar=True, logger=False)
        return loss

    def on_optimizer_step_done(self) -> None:
        """Called after each optimizer step (EMA and similar hook in here); also after a step the
        fused optimizer skipped on the device for a non-finite gradient."""

    # ------------------------------------------------------------------ non-finite steps
    def _optimizer_step_unless_non_finite(self, ni: int) -> bool:
        """Step the optimizer unless a loss since the last step or a gradient is NaN/inf.

        No host sync in the common case: a fused optimizer (Adam, AdamW, SGD with the fused
        kernel) skips on the device, as it does for AMP's GradScaler (``found_inf``); under fp16
        AMP the GradScaler itself skips steps with non-finite gradients (an overflow at the start
        of training is normal there) and only losses are counted. Any other optimizer costs one
        host sync per optimizer step to decide. Skipped steps are counted on the device; the
        streak rule (``nan_patience``) is applied at the epoch's end (:meth:`_stop_if_diverged`),
        or at once where the host already knows.

        Returns:
            False when the step was skipped on the host (EMA and step hooks then skip it too; a
            step skipped on the device still reaches them, with the weights unchanged).
        """
        optimizer = self._raw_optimizer()
        amp = str(self.trainer.precision) == "16-mixed"
        bad = self._non_finite_now(check_grads=not amp)
        self._count_non_finite(bad, ni)
        lightning_optimizer = self.optimizers()
        if amp:
            lightning_optimizer.step()
            return True
        if _skips_on_device(optimizer):
            _zero_missing_momentum(optimizer)
            optimizer.found_inf = bad.to(torch.float32)
            try:
                lightning_optimizer.step()
            finally:
                del optimizer.found_inf
            return True
        if bool(bad):  # this optimizer cannot skip on the device: decide on the host
            self._stop_if_diverged(skipped_at=ni)
            return False
        lightning_optimizer.step()
        return True

    def _non_finite_now(self, check_grads: bool) -> Tensor:
        """A device flag: a loss since the last step, or (``check_grads``) a gradient about to be
        applied, is NaN/inf, on any rank."""
        bad = self._loss_not_finite
        self._loss_not_finite = None
        self._grad_norm = None
        if bad is None:
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if check_grads:
            grads = [p.grad.detach() for p in self.net.parameters() if p.grad is not None]
            if grads:
                self._grad_norm = _total_norm(grads)  # the clip in on_before_optimizer_step reuses it
                bad = bad | ~torch.isfinite(self._grad_norm).to(bad.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        return bad

    def _count_non_finite(self, bad: Tensor, ni: int) -> None:
        """Update the device counters: skipped steps in a row, in all, and where the streak
        passed ``nan_patience``."""
        if self._non_finite is None:
            self._non_finite = torch.tensor([0, 0, -1], dtype=torch.int64, device=bad.device)
        in_a_row, total, stop_at = self._non_finite.unbind()
        flag = bad.to(torch.int64)
        in_a_row = (in_a_row + 1) * flag
        passed = (in_a_row > self.cfg.nan_patience) & (stop_at < 0)
        stop_at = torch.where(passed, torch.full_like(stop_at, ni), stop_at)
        self._non_finite = torch.stack([in_a_row, total + flag, stop_at])

    @property
    def non_finite_steps(self) -> int:
        """Optimizer steps skipped because their loss or gradient was not finite."""
        return 0 if self._non_finite is None else int(self._non_finite[1])

    def _stop_if_diverged(self, skipped_at: int | None = None) -> None:
        """Apply the ``nan_patience`` rule to the counters: a host read, at an epoch's end
        (``skipped_at`` None: the epoch's skipped steps are summarised) or at the iteration
        ``skipped_at`` of a step the host already knows it skipped (warned about).

        Raises:
            TrainingDiverged: the streak passed ``nan_patience``; names the epoch and batch.
        """
        if self._non_finite is None:
            return
        in_a_row, total, stop_at = self._non_finite.tolist()
        nb = self.trainer.num_training_batches
        if stop_at >= 0:
            in_a_row = self.cfg.nan_patience + 1
        ni = stop_at if stop_at >= 0 else skipped_at
        epoch, batch = (ni // nb + 1, ni % nb + 1) if ni is not None else (self.current_epoch + 1, nb)
        stop, message = non_finite_verdict(in_a_row, total, self.cfg.nan_patience, epoch=epoch, batch=batch,
                                           batches=nb, run_dir=self.cfg.run_dir)
        if stop:
            raise TrainingDiverged(message)
        if total > self._reported_non_finite and self.trainer.is_global_zero:
            log.warning(message if skipped_at is not None else
                        f"epoch {epoch}: {total - self._reported_non_finite} optimizer step(s) skipped for a NaN/inf "
                        f"loss or gradient ({total} in all; the run stops after {self.cfg.nan_patience + 1} in a "
                        "row: nan_patience)")
        self._reported_non_finite = total

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
        # Lightning calls this after AMP unscaling, so the norm is of the true gradients. Without
        # AMP it is the norm the non-finite check just computed: not computed twice.
        norm, self._grad_norm = self._grad_norm, None
        if self.cfg.grad_clip <= 0:
            return
        clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
        if norm is not None and clip_with_norm is not None:
            clip_with_norm(self.net.parameters(), self.cfg.grad_clip, norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm=self.cfg.grad_clip)

    # ------------------------------------------------------------------ epoch means
    def _batch_size(self, batch: Any) -> int:
        return int(self.example_input(batch).shape[0])

    @torch.no_grad()
    def _accumulate_train_items(self, loss: Tensor, items: Mapping[str, Any], n: int) -> None:
        # Sums and counts stay on the device: no host sync in the hot path. A NaN/inf value (its
        # step is skipped) is left out of the epoch mean, so no NaN reaches results or checkpoints.
        values = {"loss": loss, **{k: v for k, v in items.items() if isinstance(v, Tensor)}}
        for name, value in values.items():
            value = value.detach().float()
            finite = torch.isfinite(value)
            total, count = torch.where(finite, value, torch.zeros_like(value)) * n, finite.float() * n
            if name in self._train_sums:
                total, count = self._train_sums[name] + total, self._train_counts[name] + count
            self._train_sums[name], self._train_counts[name] = total, count

    def train_epoch_means(self) -> dict[str, float]:
        """Means over this epoch's training batches (all ranks), computed once per epoch."""
        if self._train_means is None:
            if not self._train_sums:
                return {}
            names = sorted(self._train_sums)
            sums = torch.stack([self._train_sums[k] for k in names])
            totals = torch.cat([sums, torch.stack([self._train_counts[k] for k in names]).to(sums)])
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum") if self.trainer.world_size > 1 else totals
            values = (totals[:len(names)] / totals[len(names):]).tolist()
            self._train_means = dict(zip(names, values))
        return self._train_means

    def current_lrs(self) -> dict[str, float]:
        """lr of each parameter group, by group name."""
        optimizer = self._raw_optimizer()
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def on_train_epoch_end(self) -> None:
        # Before the epoch's checkpoint is written: a diverged epoch is not saved.
        self._stop_if_diverged()
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

    # ------------------------------------------------------------------ reports
    def test_report(self, run_dir: Path) -> TestReport:
        """The task's own table and pictures for ``test_results.csv``/``.md``, after the test epoch.

        Called on every rank (a metric's ``compute`` syncs over ranks); only rank 0 writes
        pictures into ``run_dir``. Default: none (the table is the logged test metrics).
        """
        return TestReport()

    def prediction_columns(self, output: Any, batch: Any) -> dict[str, Any]:
        """``predictions.csv`` columns of one predict batch: name -> a value per sample.

        Default: a (N, F) tensor output of at most 16 values per sample, as ``out0``, ``out1``, ...
        """
        if isinstance(output, Tensor) and output.dim() <= 2 and output[0].numel() <= 16:
            values = output.detach().float().reshape(len(output), -1).cpu()
            return {f"out{i}": values[:, i] for i in range(values.shape[1])}
        return {}

    def prediction_images(self, output: Any, batch: Any) -> Tensor | None:
        """(N, C, H, W) images in [0, 1] that ``lightrainer predict`` saves as PNGs (None: none)."""
        return None

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
        # A window with a NaN/inf loss or gradient is skipped when it steps: the file says so
        # instead of holding the non-finite gradients (nothing non-finite is ever saved).
        not_finite = self._window_not_finite(pending)
        checkpoint["lightrainer"] = {
            "last_opt_step": self._last_opt_step,
            "pending_grads": {} if not_finite else pending,
            "pending_not_finite": not_finite,
            "config": self.cfg.to_dict(),
            "task": class_path_of(type(self)),
            "run": run_record(self, getattr(self.attached_trainer(), "datamodule", None),
                              self.cfg.to_dict()),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "non_finite": None if self._non_finite is None else self._non_finite.tolist(),
            # The epoch's running training sums: a run saved mid-epoch reports the same epoch means.
            "train_sums": self._train_sums_over_ranks(),
        }

    def _window_not_finite(self, pending: dict[str, Tensor]) -> bool:
        """Whether the micro-batches since the last optimizer step had a non-finite loss or left
        non-finite gradients, on any rank (every rank calls this)."""
        bad = any(not bool(torch.isfinite(g).all()) for g in pending.values())
        if self._loss_not_finite is not None:
            bad = bad or bool(self._loss_not_finite)
        if self.trainer.world_size > 1:
            flag = torch.tensor(float(bad), device=self.device)
            bad = bool(self.trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        return bad

    def _train_sums_over_ranks(self) -> dict[str, Any]:
        """This epoch's training sums and counts, summed over ranks (every rank calls this)."""
        names = sorted(self._train_sums)
        if not names:
            return {}
        sums = torch.stack([self._train_sums[k].float() for k in names])
        counts = torch.stack([self._train_counts[k] for k in names]).to(sums)
        if self.trainer.world_size > 1:
            sums, counts = self._mean_over_ranks({"sums": sums, "counts": counts}).values()
            sums, counts = sums * self.trainer.world_size, counts * self.trainer.world_size
        return {name: (sums[i].cpu(), counts[i].cpu()) for i, name in enumerate(names)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lightrainer")
        if state is None:
            raise ValueError(
                "this checkpoint was not written by lightrainer (no 'lightrainer' entry): "
                "resume from <run>/weights/last.ckpt of a lightrainer run"
            )
        self._last_opt_step = int(state["last_opt_step"])
        self._pending_grads = state.get("pending_grads", {})
        self._pending_not_finite = bool(state.get("pending_not_finite", False))
        self._ema_state = state.get("ema")
        self._restored_non_finite = state.get("non_finite")
        self._restored_train_sums = state.get("train_sums") or {}

    def on_train_start(self) -> None:
        # Restored here: Lightning's restore path clears gradients after on_load_checkpoint.
        params = dict(self.net.named_parameters())
        for name, grad in self._pending_grads.items():
            if name in params:
                params[name].grad = grad.to(params[name].device, params[name].dtype)
        self._pending_grads = {}
        if self._pending_not_finite:  # the interrupted window's step is skipped, as it would have been
            self._loss_not_finite = torch.ones((), dtype=torch.bool, device=self.device)
            self._pending_not_finite = False
        if self._restored_non_finite is not None:
            self._non_finite = torch.tensor(self._restored_non_finite, dtype=torch.int64, device=self.device)
            self._reported_non_finite = self._restored_non_finite[1]
            self._restored_non_finite = None
        # A run resumed mid-epoch continues the epoch's sums (a new epoch's start resets them).
        # They are totals over ranks: rank 0 carries them, the others start from zero.
        restored, self._restored_train_sums = self._restored_train_sums, {}
        first = self.global_rank == 0
        self._train_sums = {k: v.to(self.device) * float(first) for k, (v, _) in restored.items()}
        self._train_counts = {k: n.to(self.device) * float(first) for k, (_, n) in restored.items()}

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


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``found_inf`` flag on the optimizer skips its step on the device: torch's fused
    kernels (Adam, AdamW, SGD, ...) read it, as AMP's GradScaler relies on. SGD only without
    dampening (see :func:`_zero_missing_momentum`)."""
    if not optimizer.defaults.get("fused"):
        return False
    return not isinstance(optimizer, torch.optim.SGD) or all(g.get("dampening", 0) == 0 for g in optimizer.param_groups)


def _zero_missing_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give a fused SGD zero momentum buffers before its first step: its kernel fills them only on
    a step it takes, so a first step skipped by ``found_inf`` would leave them uninitialised. With
    no dampening, a zero buffer gives exactly the first step's ``buf = grad``."""
    if not isinstance(optimizer, torch.optim.SGD) or optimizer in _MOMENTUM_READY:
        return
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                if optimizer.state[p].get("momentum_buffer") is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    _MOMENTUM_READY.add(optimizer)


#: Optimizers whose momentum buffers :func:`_zero_missing_momentum` has made.
_MOMENTUM_READY: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def _total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` together (NaN or inf when any element is), on one device."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: fused kernels
    if get_total_norm is not None:
        return get_total_norm(tensors, error_if_nonfinite=False)
    device = tensors[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).to(device) for t in tensors]))


def non_finite_verdict(
    in_a_row: int, total: int, patience: int, *, epoch: int, batch: int, batches: Any, run_dir: str | None
) -> tuple[bool, str]:
    """Whether a run stops after a skipped non-finite step, and what to say.

    The run stops when more than ``patience`` (``nan_patience``) steps in a row were skipped:
    stopping, rather than restoring the last checkpoint and retrying at a lower lr as
    Ultralytics does, keeps a run's result the result of its config.

    Args:
        in_a_row: skipped steps in a row, this one included.
        total: skipped steps in the whole run.
        patience: steps in a row tolerated (0: stop at the first).
        epoch: the epoch (1-based), batch: the batch in it (1-based), batches: batches an epoch.
        run_dir: the run folder, for the message.

    Returns:
        ``(stop, message)``.
    """
    where = f"epoch {epoch}, batch {batch}/{batches}"
    if in_a_row > patience:
        weights = f"{run_dir}/weights" if run_dir else "the run's weights folder"
        return True, (
            f"training diverged: {in_a_row} optimizer step(s) in a row had a NaN/inf loss or gradient, the last at "
            f"{where}; each was skipped, so nothing non-finite was trained or saved, and the checkpoints in "
            f"{weights} hold the last finite state. Lower lr0 (or raise warmup_epochs), look for NaN/inf in the "
            f"data, or raise nan_patience (now {patience})"
        )
    return False, (
        f"non-finite loss or gradient at {where}: optimizer step skipped ({in_a_row} in a row, {total} in all; "
        f"the run stops after {patience + 1} in a row: nan_patience)"
    )


def _to_channels_last(batch: Any) -> Any:
    """4-D floating tensors of a batch (tuple/list/tensor) in channels-last memory format."""
    if isinstance(batch, Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 and batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_channels_last(b) for b in batch)
    return batch
