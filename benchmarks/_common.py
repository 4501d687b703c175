"""Shared helpers of the performance benchmarks (overhead, data_path, scaling, gpu_check).

Every measurement follows the same rules: torch threads pinned (1 by default, 2-thread runs on
this 2-core machine stall at random), warm-up excluded, variants alternated (A B C A B C ...) so
contention from other jobs hits each of them, medians over repeats, tables printed and written
to ``benchmarks/results/<name>.{csv,md}``.

The hand-written loops here are the baselines: plain PyTorch written as a user would write it,
doing the same work as a lightrainer fit (same network, data, four parameter groups, optimizer,
per-iteration warmup, accumulation, clipping, lr schedule, a validation pass per epoch) and
nothing else (no logging, no checkpoints).
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

#: Environment variable carrying the parent's wall-clock time at subprocess launch.
T0_ENV = "LT_BENCH_T0"


# ---------------------------------------------------------------------------------- basics
def pin_threads(threads: int = 1) -> None:
    """Pin torch (and BLAS) to ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set once in this process
        pass


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the values, for the noise column."""
    return f"{min(values):.3g}-{max(values):.3g}" if values else ""


def machine_note(threads: int) -> str:
    """One line on the conditions of the run (load matters on a shared machine)."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {threads} torch thread(s), {os.cpu_count()} CPUs, "
            f"load average at start {load:.2f}")


# ---------------------------------------------------------------------------------- tables
def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (the keys of the first row are the columns)."""
    header = list(rows[0])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(k, "")) for k in header) + " |")
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def portable(text: str) -> str:
    """``text`` naming no folder of this machine: the checkout's path becomes relative to it, the temp
    folder ``$TMPDIR`` and the home folder ``~`` (results/ is committed; tests/test_packaging.py
    checks it)."""
    repo = str(REPO)
    for path, name in ((repo + os.sep, ""), (repo, "."), (tempfile.gettempdir(), "$TMPDIR"), (str(Path.home()), "~")):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def write_results(name: str, rows: list[dict[str, Any]], title: str, notes: Sequence[str] = ()) -> str:
    """Print the table and write ``results/<name>.csv`` and ``results/<name>.md`` (machine paths made
    :func:`portable`); return the markdown."""
    RESULTS.mkdir(exist_ok=True)
    rows = [{k: portable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    notes = [portable(n) for n in notes]
    header = list(rows[0])
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    command = portable("python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]))
    md = "\n".join([f"## {title}", "", f"`{command}`", "", format_table(rows), "", *[f"- {n}" for n in notes], ""])
    (RESULTS / f"{name}.md").write_text(md)
    print(md, flush=True)
    return md


# ---------------------------------------------------------------------------------- subprocesses
def run_child(script: Path, args: Sequence[str], threads: int, timeout: float = 1800,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script --child ...`` in a fresh process; return the JSON it prints last.

    Each variant gets its own process so its peak RSS and start-up time are its own.
    """
    env = {**os.environ, **(extra_env or {}), T0_ENV: repr(time.time()), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def child_result(**values: Any) -> None:
    """Print a child's measurements as the last line of stdout (JSON)."""
    values["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(values), flush=True)


def since_launch() -> float:
    """Seconds since the parent launched this process (NaN when not run by :func:`run_child`)."""
    t0 = os.environ.get(T0_ENV)
    return time.time() - float(t0) if t0 else float("nan")


# ---------------------------------------------------------------------------------- timing
class EpochClock:
    """Wall-clock marks of a fit: first step, each epoch's start, validation start, the end.

    ``epoch_s[e]`` is epoch e from its start to the next epoch's start (training, validation and
    whatever runs between: checkpoints, CSV rows, plots); ``train_s[e]`` its training part only.
    """

    def __init__(self) -> None:
        self.first_step: float | None = None
        self.starts: list[float] = []
        self.val_starts: list[float] = []
        self.end: float | None = None

    def step(self) -> None:
        if self.first_step is None:
            self.first_step = since_launch()

    @staticmethod
    def now() -> float:
        """perf_counter after the GPU's queued work is done (marks only: never per step)."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def epoch_start(self) -> None:
        self.starts.append(self.now())

    def val_start(self) -> None:
        if len(self.val_starts) < len(self.starts):
            self.val_starts.append(self.now())

    def finish(self) -> None:
        self.end = self.now()

    def result(self, warmup: int = 1) -> dict[str, Any]:
        bounds = self.starts + [self.end]
        epoch = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        train = [v - s for s, v in zip(self.starts, self.val_starts)]
        return {"epoch_s": epoch[warmup:], "train_s": train[warmup:], "first_step_s": self.first_step}


def lightning_clock_callback(clock: EpochClock) -> Any:
    """A Lightning callback feeding ``clock`` (sanity-check validation ignored)."""
    import lightning as L

    class _Clock(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            clock.epoch_start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            clock.step()

        def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            if not trainer.sanity_checking:
                clock.val_start()

        def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            clock.finish()

    return _Clock()


# ---------------------------------------------------------------------------------- the work
def mnist_cfg(save_dir: str, **overrides: Any) -> Any:
    """configs/mnist.yaml as shipped (minus the CLI sections), with overrides."""
    import yaml

    import lightrainer as lt

    data = yaml.safe_load((REPO / "configs" / "mnist.yaml").read_text())
    for section in ("model", "data", "trainer"):
        data.pop(section, None)
    data.update(save_dir=save_dir, **overrides)
    return lt.load_config(data)


def vqvae_cfg(save_dir: str, **overrides: Any) -> Any:
    """configs/vqvae.yaml as shipped (minus the CLI sections), with overrides."""
    import yaml

    import lightrainer as lt

    data = yaml.safe_load((REPO / "configs" / "vqvae.yaml").read_text())
    for section in ("model", "data", "trainer"):
        data.pop(section, None)
    data.update(save_dir=save_dir, **overrides)
    return lt.load_config(data)


def four_groups(net: Any, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """The four parameter groups, written out (biases, norm weights, embeddings, other weights)."""
    from torch import nn

    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
    groups: dict[str, list] = {"bias": [], "no_decay": [], "embedding": [], "decay": []}
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                groups["bias"].append(p)
            elif isinstance(module, norms):
                groups["no_decay"].append(p)
            elif isinstance(module, nn.Embedding):
                groups["embedding"].append(p)
            else:
                groups["decay"].append(p)
    decay = {"bias": 0.0, "no_decay": 0.0, "embedding": weight_decay * 0.01, "decay": weight_decay}
    return [{"params": ps, "weight_decay": decay[k], "initial_lr": lr, "name": k} for k, ps in groups.items()]


class HandLoop:
    """A plain PyTorch training loop with lightrainer's semantics (DESIGN.md), and nothing else.

    Four parameter groups, the optimizer, per-iteration warmup of lr/momentum/accumulate, summed
    micro-batch gradients, clipping, the cosine schedule; no logging, no checkpoints.

    Args:
        cfg: the config (epochs, lr0, lrf, momentum, weight decay, warmup keys, nbs, batch, grad_clip).
        net: the network (already on its device).
        nb: batches per epoch.
        loss_fn: (net, batch) -> loss.
        optimizer_cls: torch optimizer class or factory (default: ``torch.optim.<cfg.optimizer>``).
        autocast: a context-manager factory for the forward (amp), or None.
        scaler: a ``torch.amp.GradScaler`` (fp16), or None.
    """

    def __init__(self, cfg: Any, net: Any, nb: int, loss_fn: Callable[[Any, tuple], Any], optimizer_cls: Any = None,
                 autocast: Any = None, scaler: Any = None) -> None:
        import contextlib

        import torch

        self.cfg, self.net, self.nb, self.loss_fn, self.scaler = cfg, net, nb, loss_fn, scaler
        self.autocast = autocast or contextlib.nullcontext
        accumulate = max(round(cfg.nbs / cfg.batch), 1)
        weight_decay = cfg.weight_decay * cfg.batch * accumulate / cfg.nbs
        cls = optimizer_cls or getattr(torch.optim, cfg.optimizer)
        kwargs = ({"momentum": cfg.momentum, "nesterov": True} if cfg.optimizer == "SGD"
                  else {"betas": (cfg.momentum, 0.999)})
        self.opt = cls(four_groups(net, weight_decay, cfg.lr0), lr=cfg.lr0, **kwargs)
        self.nw = max(round(cfg.warmup_epochs * nb), 100) if cfg.warmup_epochs > 0 else -1
        self.last_opt_step = -1
        self.lf = 1.0

    def start_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        self.lf = ((1 - math.cos(epoch * math.pi / cfg.epochs)) / 2) * (cfg.lrf - 1) + 1
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * self.lf
        self.net.train()

    def step(self, batch: tuple, ni: int) -> None:
        """One training batch: warmup, forward, backward, and the optimizer step when due."""
        import numpy as np
        import torch

        cfg = self.cfg
        accumulate = max(round(cfg.nbs / cfg.batch), 1)
        if ni <= self.nw:
            accumulate = max(1, int(np.interp(ni, [0, self.nw], [1, cfg.nbs / cfg.batch]).round()))
            for g in self.opt.param_groups:
                start = cfg.warmup_bias_lr if g["name"] == "bias" else 0.0
                g["lr"] = float(np.interp(ni, [0, self.nw], [start, g["initial_lr"] * self.lf]))
                if "momentum" in g:
                    g["momentum"] = float(np.interp(ni, [0, self.nw], [cfg.warmup_momentum, cfg.momentum]))
        with self.autocast():
            loss = self.loss_fn(self.net, batch)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if ni - self.last_opt_step >= accumulate:
            if self.scaler:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm=cfg.grad_clip)
            if self.scaler:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.last_opt_step = ni

    def validate(self, val_batches: Callable[[], Iterator[tuple]], val_fn: Callable[[Any, tuple], Any]) -> None:
        import torch

        self.net.eval()
        with torch.no_grad(), self.autocast():
            for batch in val_batches():
                val_fn(self.net, batch)


def hand_written_fit(
    cfg: Any,
    net: Any,
    batches: Callable[[int], Iterator[tuple]],
    nb: int,
    loss_fn: Callable[[Any, tuple], Any],
    val_batches: Callable[[], Iterator[tuple]],
    val_fn: Callable[[Any, tuple], Any],
    clock: EpochClock,
    optimizer_cls: Any = None,
    autocast: Any = None,
    scaler: Any = None,
) -> None:
    """The whole fit of :class:`HandLoop`: ``cfg.epochs`` epochs, each a training pass and a validation pass.

    Args:
        batches: epoch -> iterator of training batches.
        val_batches: () -> iterator of validation batches.
        val_fn: (net, batch) -> anything (run under no_grad, in eval mode).
        clock: receives the marks.
        (the others: as :class:`HandLoop`)
    """
    loop = HandLoop(cfg, net, nb, loss_fn, optimizer_cls, autocast, scaler)
    for epoch in range(cfg.epochs):
        clock.epoch_start()
        loop.start_epoch(epoch)
        for i, batch in enumerate(batches(epoch)):
            clock.step()
            loop.step(batch, i + nb * epoch)
        clock.val_start()
        loop.validate(val_batches, val_fn)
    clock.finish()


def paired_steps_callback(loop: HandLoop, batches: Callable[[int], Iterator[tuple]], warmup_epochs: int = 1,
                          val_batches: Callable[[], Iterator[tuple]] | None = None,
                          val_fn: Callable[[Any, tuple], Any] | None = None) -> Any:
    """A Lightning callback that runs one hand-written step after each of the fit's steps.

    Steps alternate L H L H ... in one process, so load from other jobs falls on both alike.
    ``lightrainer[i]`` is the time from one training-batch start to the next minus the hand step
    run in between (all of Lightning's per-step work: data, hooks, logging, progress bar);
    ``hand[i]`` is the hand step (data included). The last step of each epoch (which carries the
    validation and epoch-end work) and epochs before ``warmup_epochs`` are not kept.

    With ``val_batches``/``val_fn`` the hand loop also validates once per epoch (at the fit's
    ``on_train_epoch_end``, after the fit's validation), and whole epochs are paired too:
    ``hand_epochs[e]`` is the hand loop's time in epoch ``e`` (its steps and validation),
    ``lightrainer_epochs[e]`` the fit's epoch (one ``on_train_epoch_start`` to the next) minus that:
    validation, checkpoints, results.csv, plots and bar included. The last epoch is not kept (its
    end is the fit's end, with the one-off work of ``on_train_end``): pair 3 epochs or more.
    """
    import lightning as L

    class _Paired(L.Callback):
        def __init__(self) -> None:
            self.lightrainer: list[float] = []
            self.hand: list[float] = []
            self.lightrainer_epochs: list[float] = []
            self.hand_epochs: list[float] = []
            self._prev: float | None = None
            self._hand_last = 0.0
            self._epoch_start: float | None = None
            self._hand_in_epoch = 0.0

        def _close_epoch(self) -> None:
            if self._epoch_start is not None and self._epoch >= warmup_epochs and val_batches is not None:
                wall = time.perf_counter() - self._epoch_start
                self.lightrainer_epochs.append(wall - self._hand_in_epoch)
                self.hand_epochs.append(self._hand_in_epoch)

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self._close_epoch()
            self._epoch_start = time.perf_counter()
            self._epoch = trainer.current_epoch
            self._it = iter(batches(self._epoch))
            loop.start_epoch(self._epoch)
            self._prev = None
            self._hand_in_epoch = time.perf_counter() - self._epoch_start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            now = time.perf_counter()
            if self._prev is not None and self._epoch >= warmup_epochs:
                self.lightrainer.append(now - self._prev - self._hand_last)
                self.hand.append(self._hand_last)
            self._prev = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            start = time.perf_counter()
            loop.step(next(self._it), batch_idx + loop.nb * self._epoch)
            self._hand_last = time.perf_counter() - start
            self._hand_in_epoch += self._hand_last

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if val_batches is not None:
                start = time.perf_counter()
                loop.validate(val_batches, val_fn)
                self._hand_in_epoch += time.perf_counter() - start

    return _Paired()


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) on log(size)."""
    import numpy as np

    slope, _ = np.polyfit(np.log(sizes), np.log(times), 1)
    return float(slope)
