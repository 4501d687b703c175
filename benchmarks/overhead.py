"""What does lightrainer cost over a hand-written PyTorch loop? (issue 7, "overhead")

Variants, each in its own fresh process (so peak RSS and start-up are its own), alternated
A B C D A B C D ... over ``--repeats`` rounds, torch pinned to ``--threads`` threads:

* ``hand``: plain PyTorch doing the same work as the fit: same network and init, same data
  tensors and +-shift augmentation, the four parameter groups, the optimizer, per-iteration
  warmup, accumulation, gradient clipping, the cosine schedule, a validation pass per epoch; no
  logging, no checkpoints. It takes its data from the task's datamodule, so it imports what
  lightrainer imports (Lightning, torchmetrics, sklearn).
* ``hand-torch`` (MNIST only): the same loop as a user would write it with nothing but torch and
  numpy: reads the packaged digits' npz itself and loads only SmallCNN's and RandomShift's own
  source files (torch-only), never the lightrainer package (which imports Lightning). It takes the
  train/val split's indices from a .npy file the driver writes, so it trains on the same samples
  (sklearn, which makes the split, would add 40 MB to its footprint); after its fit it checks that
  its network's initial weights and its data equal the datamodule's. The baseline of every ratio
  of the MNIST rows.
* ``lightrainer``: the user's path: ``Module(net, cfg)``, the task's datamodule,
  ``lt.build_trainer(cfg)`` with the default callbacks and progress bar, config as shipped
  (configs/mnist.yaml, configs/vqvae.yaml).
* ``lightrainer-lean``: the same without the progress bar and plots (``plots: False``).
* ``lightrainer-bar10`` (MNIST only): the progress bar refreshed every 10 steps instead of every
  step (what a coarser default of LightrainerProgressBar would cost).
* ``lightning`` (MNIST only): a plain LightningModule with automatic optimization (same net,
  groups, AdamW, warmup+cosine as a per-step LambdaLR, clipping), a default DataLoader over a
  TensorDataset, default Trainer (progress bar, logger, checkpointing).

``--mode process``: per variant, median time per epoch (epoch 0 excluded as warm-up), its training
part, time from process launch to the first training step, peak RSS; ratios to ``hand`` of the
same task (results/overhead.{csv,md}). On a shared machine whole epochs swing 2x with other jobs'
load, so ``--mode paired`` also measures the cost robustly: one lightrainer fit in which a
hand-written step (own network, same work) runs after each lightrainer step, L H L H ..., and a
hand-written validation pass after each lightrainer epoch's validation; per step and per whole
epoch (validation, checkpoints, results.csv, plots, bar included) (results/overhead_paired.{csv,md}). ``--task`` other than all adds ``_<task>`` to the file names.

    python benchmarks/overhead.py                      # both modes, MNIST-5k SmallCNN and VQ-VAE
    python benchmarks/overhead.py --task mnist --mode paired --repeats 2
    python benchmarks/overhead.py --task vqvae --mode process --repeats 2 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    EpochClock,
    HandLoop,
    child_result,
    hand_written_fit,
    lightning_clock_callback,
    machine_note,
    median,
    mnist_cfg,
    paired_steps_callback,
    pin_threads,
    run_child,
    spread,
    vqvae_cfg,
    write_results,
)

VARIANTS = {"mnist": ("hand-torch", "hand", "lightrainer", "lightrainer-lean", "lightrainer-bar10", "lightning"),
            "vqvae": ("hand", "lightrainer", "lightrainer-lean")}


def user_trainer(cfg: Any, variant: str, callbacks: list) -> Any:
    """``lt.build_trainer`` as the variant asks: as shipped, lean (no bar), or bar10 (the bar refreshed
    every 10 steps instead of every step: what a coarser LightrainerProgressBar default would cost)."""
    import lightrainer as lt

    lean = variant == "lightrainer-lean"
    trainer = lt.build_trainer(cfg, callbacks=callbacks, **({"enable_progress_bar": False} if lean else {}))
    if variant == "lightrainer-bar10":
        trainer.progress_bar_callback._refresh_rate = 10
    return trainer


# ---------------------------------------------------------------------------------- the hand loops' work
class HandWork(NamedTuple):
    """What :func:`hand_written_fit` (or :class:`HandLoop`) needs for one task."""

    batches: Callable[[int], Iterator[tuple]]  # epoch -> training batches
    nb: int  # training batches per epoch
    loss_fn: Callable[[Any, tuple], Any]
    val_batches: Callable[[], Iterator[tuple]]
    val_fn: Callable[[Any, tuple], Any]


def mnist_hand_work(cfg: Any, train: tuple, val: tuple, shift: Any) -> HandWork:
    """The MNIST fit's work for a hand loop, in torch only (the ``hand-torch`` child uses it too):
    lightrainer's epoch order (randperm seeded ``seed + epoch``) and per-epoch shift draws."""
    import torch
    import torch.nn.functional as F

    (x, y), (vx, vy) = train, val
    B, N = cfg.batch, len(x)
    nb = -(-N // B)

    def batches(epoch: int):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        g = torch.Generator().manual_seed(epoch)
        for i in range(nb):
            idx = order[i * B:(i + 1) * B]
            yield shift(x[idx], g), y[idx]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], label_smoothing=cfg.label_smoothing)

    def val_fn(model, batch):
        logits = model(batch[0])
        return F.cross_entropy(logits, batch[1]), (logits.argmax(1) == batch[1]).sum()

    val_batches = lambda: ((vx[i:i + B], vy[i:i + B]) for i in range(0, len(vx), B))  # noqa: E731
    return HandWork(batches, nb, loss_fn, val_batches, val_fn)


def vqvae_hand_work(cfg: Any, dm: Any) -> HandWork:
    """The VQ-VAE fit's work for a hand loop: the set-up datamodule's training loader, its
    validation tensor in batches, the loss ``vq_weight * vq + recon_weight * mse``."""
    import torch
    import torch.nn.functional as F

    loader, vx, B = dm.train_dataloader(), dm.val_data[0], cfg.batch
    vq_w, recon_w = cfg.extra("vq_weight"), cfg.extra("recon_weight")

    def loss_fn(model, batch):
        recon, vq, _ = model(batch[0])
        return vq_w * vq + recon_w * F.mse_loss(recon, batch[0])

    def val_fn(model, batch):
        recon, vq, _ = model(batch[0])
        return vq, -10 * torch.log10(F.mse_loss(recon.clamp(0, 1), batch[0]))

    val_batches = lambda: ((vx[i:i + B],) for i in range(0, len(vx), B))  # noqa: E731
    return HandWork(lambda epoch: iter(loader), len(loader), loss_fn, val_batches, val_fn)


# ---------------------------------------------------------------------------------- MNIST
#: Environment variable carrying the resolved config values to the ``hand-torch`` child.
CFG_ENV = "LT_BENCH_CFG"
HAND_TORCH_KEYS = ("seed", "batch", "nbs", "epochs", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
                   "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "grad_clip", "label_smoothing", "shift",
                   "val_split")


def hand_torch_env(epochs: int) -> dict[str, str]:
    """The config values and the split the torch-only child needs, made by lightrainer here in the driver."""
    import json

    import numpy as np

    from lightrainer.datamodules.base import stratified_split
    from lightrainer.datamodules.mnist import read_mnist5k

    tmp = tempfile.mkdtemp()
    cfg = mnist_cfg(tmp, epochs=epochs)
    labels = read_mnist5k()[1]
    train, val = stratified_split(len(labels), labels, cfg.val_split, cfg.seed)
    np.save(Path(tmp) / "train_idx.npy", train)
    np.save(Path(tmp) / "val_idx.npy", val)
    values = {k: getattr(cfg, k) for k in HAND_TORCH_KEYS}
    return {CFG_ENV: json.dumps({**values, "split_dir": tmp})}


def mnist_torch_only_child() -> dict[str, Any]:
    """``hand-torch``: the MNIST fit written with torch and numpy only (see the module docstring)."""
    import json
    import os
    import random
    import types

    import numpy as np
    import torch

    from _common import REPO, peak_rss_mb

    cfg = types.SimpleNamespace(**json.loads(os.environ[CFG_ENV]))
    # A bare package, so that importing the two torch-only source files doesn't run
    # lightrainer/__init__.py (which imports Lightning).
    for name in ("lightrainer", "lightrainer.modules", "lightrainer.datamodules"):
        package = types.ModuleType(name)
        package.__path__ = [str(REPO / name.replace(".", "/"))]
        sys.modules[name] = package
    from lightrainer.datamodules.memory import RandomShift
    from lightrainer.modules.nets import SmallCNN

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = SmallCNN(num_classes=10, in_channels=1)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    with np.load(REPO / "lightrainer" / "datamodules" / "data" / "mnist_5k.npz") as data:
        images = (torch.from_numpy(data["images"]).float().reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
        labels = torch.from_numpy(data["labels"]).long()
    train_idx = torch.from_numpy(np.load(Path(cfg.split_dir) / "train_idx.npy"))
    val_idx = torch.from_numpy(np.load(Path(cfg.split_dir) / "val_idx.npy"))
    x, y, vx, vy = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    shift = RandomShift(cfg.shift, fill=(0.0 - 0.1307) / 0.3081)
    clock = EpochClock()
    hand_written_fit(cfg, net, *mnist_hand_work(cfg, (x, y), (vx, vy), shift), clock)
    result = {**clock.result(), "peak_rss_mb": peak_rss_mb()}

    # Same work as the other variants? Checked after the peak RSS is read (this imports Lightning).
    for name in [m for m in sys.modules if m == "lightrainer" or m.startswith("lightrainer.")]:
        del sys.modules[name]
    from lightrainer.datamodules import MNIST5kDataModule
    from lightrainer.modules import SmallCNN as PackagedSmallCNN

    reference = mnist_cfg(tempfile.mkdtemp(), epochs=cfg.epochs)  # seeds torch as the other variants do
    same_init = all(torch.equal(init[k], v) for k, v in PackagedSmallCNN(num_classes=10, in_channels=1)
                    .state_dict().items())
    dm = MNIST5kDataModule(reference)
    dm.setup()
    same_data = all(torch.equal(a, b) for a, b in zip((x, y, vx, vy), (*dm.train_data, *dm.val_data)))
    if not (same_init and same_data):
        raise SystemExit(f"hand-torch does other work: same initial weights {same_init}, same data {same_data}")
    return result


def mnist_child(variant: str, epochs: int) -> dict[str, Any]:
    from lightrainer.datamodules import MNIST5kDataModule
    from lightrainer.datamodules.memory import RandomShift
    from lightrainer.modules import ClassificationModule, SmallCNN

    tmp = tempfile.mkdtemp()
    lean = variant != "lightrainer"
    cfg = mnist_cfg(tmp, epochs=epochs, **({"plots": False} if lean else {}))
    dm = MNIST5kDataModule(cfg)
    clock = EpochClock()
    net = SmallCNN(num_classes=10, in_channels=1)  # load_config seeded torch: same init everywhere
    if variant.startswith("lightrainer"):
        trainer = user_trainer(cfg, variant, [lightning_clock_callback(clock)])
        trainer.fit(ClassificationModule(net, cfg), datamodule=dm)
        return clock.result()

    dm.setup()
    (x, y), (vx, vy) = dm.train_data, dm.val_data
    shift = RandomShift(cfg.shift, fill=dm.fill_value)
    nb = -(-len(x) // cfg.batch)
    if variant == "hand":
        hand_written_fit(cfg, net, *mnist_hand_work(cfg, (x, y), (vx, vy), shift), clock)
        return clock.result()
    if variant == "lightning":
        lightning_fit(cfg, net, (x, y), (vx, vy), shift, nb, tmp, clock)
        return clock.result()
    raise SystemExit(f"unknown variant {variant}")


def lightning_fit(cfg: Any, net: Any, train: tuple, val: tuple, shift: Any, nb: int, tmp: str,
                  clock: EpochClock) -> None:
    """Plain Lightning, automatic optimization, default DataLoader and Trainer."""
    import math

    import lightning as L
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from _common import four_groups

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.gen = torch.Generator().manual_seed(0)

        def training_step(self, batch, batch_idx):  # noqa: ANN001
            x, y = batch
            loss = F.cross_entropy(self.net(shift(x, self.gen)), y, label_smoothing=cfg.label_smoothing)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):  # noqa: ANN001
            x, y = batch
            logits = self.net(x)
            self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):  # noqa: ANN201
            wd = cfg.weight_decay * cfg.batch * max(round(cfg.nbs / cfg.batch), 1) / cfg.nbs
            groups = four_groups(self.net, wd, cfg.lr0)
            opt = torch.optim.AdamW(groups, lr=cfg.lr0, betas=(cfg.momentum, 0.999))
            nw = max(round(cfg.warmup_epochs * nb), 100)

            def factor(step: int) -> float:  # warmup ramp, then the per-epoch cosine
                epoch = step // nb
                lf = ((1 - math.cos(epoch * math.pi / cfg.epochs)) / 2) * (cfg.lrf - 1) + 1
                return float(np.interp(step, [0, nw], [0.0, lf])) if step <= nw else lf

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    loader = DataLoader(TensorDataset(*train), batch_size=cfg.batch, shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=cfg.batch)
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator="cpu", devices=1, gradient_clip_val=cfg.grad_clip,
                        default_root_dir=tmp, callbacks=[lightning_clock_callback(clock)])
    trainer.fit(Plain(), loader, val_loader)


# ---------------------------------------------------------------------------------- VQ-VAE
def vqvae_child(variant: str, epochs: int) -> dict[str, Any]:
    try:
        from lightrainer.datamodules.photos import PhotoPatchesDataModule
        from lightrainer.modules.vqvae import VQVAEModule, build_vqvae
    except ImportError as err:
        return {"skipped": f"VQ-VAE not importable yet: {err}"}

    tmp = tempfile.mkdtemp()
    lean = variant != "lightrainer"
    cfg = vqvae_cfg(tmp, epochs=epochs, **({"plots": False} if lean else {}))
    dm = PhotoPatchesDataModule(cfg)
    clock = EpochClock()
    net = build_vqvae(cfg)
    if variant.startswith("lightrainer"):
        trainer = user_trainer(cfg, variant, [lightning_clock_callback(clock)])
        trainer.fit(VQVAEModule(net, cfg), datamodule=dm)
        return clock.result()

    dm.setup()
    hand_written_fit(cfg, net, *vqvae_hand_work(cfg, dm), clock)
    return clock.result()


# ---------------------------------------------------------------------------------- paired steps
def paired_child(task: str, variant: str, epochs: int) -> dict[str, Any]:
    """One lightrainer fit with a hand-written step run after each of its steps (L H L H ...)."""
    tmp = tempfile.mkdtemp()
    lean = variant != "lightrainer"
    extra = {"plots": False} if lean else {}
    if task == "mnist":
        from lightrainer.datamodules import MNIST5kDataModule
        from lightrainer.datamodules.memory import RandomShift
        from lightrainer.modules import ClassificationModule, SmallCNN

        cfg = mnist_cfg(tmp, epochs=epochs, **extra)
        dm = MNIST5kDataModule(cfg)
        dm.setup()
        module = ClassificationModule(SmallCNN(10, 1), cfg)
        hand_net = SmallCNN(10, 1)
        work = mnist_hand_work(cfg, dm.train_data, dm.val_data, RandomShift(cfg.shift, fill=dm.fill_value))
    else:
        try:
            from lightrainer.datamodules.photos import PhotoPatchesDataModule
            from lightrainer.modules.vqvae import VQVAEModule, build_vqvae
        except ImportError as err:
            return {"skipped": f"VQ-VAE not importable yet: {err}"}
        cfg = vqvae_cfg(tmp, epochs=epochs, **extra)
        dm = PhotoPatchesDataModule(cfg)
        dm.setup()
        module = VQVAEModule(build_vqvae(cfg), cfg)
        hand_net = build_vqvae(cfg)
        work = vqvae_hand_work(cfg, dm)

    paired = paired_steps_callback(HandLoop(cfg, hand_net, work.nb, work.loss_fn), work.batches,
                                   val_batches=work.val_batches, val_fn=work.val_fn)
    trainer = user_trainer(cfg, variant, [paired])
    trainer.fit(module, datamodule=dm)
    return {"lightrainer": paired.lightrainer, "hand": paired.hand,
            "lightrainer_epochs": paired.lightrainer_epochs, "hand_epochs": paired.hand_epochs}


def summarise_paired(task: str, runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    rows = []
    for variant, results in runs.items():
        ours = [t for r in results for t in r["lightrainer"]]
        hand = [t for r in results for t in r["hand"]]
        our_epochs = [t for r in results for t in r["lightrainer_epochs"]]
        hand_epochs = [t for r in results for t in r["hand_epochs"]]
        rows.append({
            "task": task,
            "variant": variant,
            "lightrainer_step_ms": 1e3 * median(ours),
            "hand_step_ms": 1e3 * median(hand),
            "ratio_of_medians": median(ours) / median(hand),
            "ratio_of_sums": sum(ours) / sum(hand),
            "median_of_step_ratios": median(a / b for a, b in zip(ours, hand)),
            "steps": len(ours),
            # Whole epochs: none paired with fewer than 3 epochs a run (the first and last aren't kept).
            "lightrainer_epoch_s": median(our_epochs) if our_epochs else "",
            "hand_epoch_s": median(hand_epochs) if our_epochs else "",
            "epoch_ratio_of_sums": sum(our_epochs) / sum(hand_epochs) if our_epochs else "",
            "median_of_epoch_ratios": median(a / b for a, b in zip(our_epochs, hand_epochs)) if our_epochs else "",
            "epochs": len(our_epochs),
        })
    return rows


# ---------------------------------------------------------------------------------- driver
def summarise(task: str, runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    base = runs.get("hand-torch") or runs["hand"]
    base_epoch = median(e for r in base for e in r["epoch_s"])
    base_train = median(e for r in base for e in r["train_s"])
    base_rss = median(r["peak_rss_mb"] for r in base)
    base_first = median(r["first_step_s"] for r in base)
    rows = []
    for variant, results in runs.items():
        epochs = [e for r in results for e in r["epoch_s"]]
        trains = [e for r in results for e in r["train_s"]]
        rss = median(r["peak_rss_mb"] for r in results)
        rows.append({
            "task": task,
            "variant": variant,
            "epoch_s": median(epochs),
            "epoch_ratio": median(epochs) / base_epoch,
            "train_s": median(trains),
            "train_ratio": median(trains) / base_train,
            "epoch_s_range": spread(epochs),
            "first_step_s": median(r["first_step_s"] for r in results),
            "first_step_ratio": median(r["first_step_s"] for r in results) / base_first,
            "peak_rss_mb": rss,
            "rss_ratio": rss / base_rss,
            "epochs_timed": len(epochs),
        })
    return rows


def rounds(task: str, wanted: list[str], args: argparse.Namespace, paired: bool) -> dict[str, list[dict]] | str:
    """Run every variant ``args.repeats`` times, alternating; the results, or why the task skipped."""
    runs: dict[str, list[dict]] = {v: [] for v in wanted}
    torch_only_env = hand_torch_env(args.epochs) if "hand-torch" in wanted else {}
    for round_ in range(args.repeats):
        for variant in wanted if round_ % 2 == 0 else wanted[::-1]:
            child = ["--child", task, variant, "--epochs", str(args.epochs), "--threads", str(args.threads)]
            out = run_child(Path(__file__), child + (["--paired"] if paired else []), args.threads,
                            extra_env=torch_only_env if variant == "hand-torch" else None)
            if "skipped" in out:
                return out["skipped"]
            runs[variant].append(out)
            if paired:
                print(f"{task} paired {variant} round {round_}: lightrainer {1e3 * median(out['lightrainer']):.1f} ms, "
                      f"hand {1e3 * median(out['hand']):.1f} ms a step; epochs lightrainer "
                      f"{[round(e, 2) for e in out['lightrainer_epochs']]} hand "
                      f"{[round(e, 2) for e in out['hand_epochs']]}", flush=True)
            else:
                print(f"{task} {variant} round {round_}: epochs {[round(e, 2) for e in out['epoch_s']]} "
                      f"rss {out['peak_rss_mb']:.0f} MiB", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("mnist", "vqvae", "all"), default="all")
    parser.add_argument("--mode", choices=("process", "paired", "all"), default="all",
                        help="process: whole fits in fresh processes (epoch time, start-up, RSS); paired: "
                             "lightrainer and hand-written steps alternated in one process (per-step overhead)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants (default 3)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        pin_threads(args.threads)
        task, variant = args.child
        if args.paired:
            result = paired_child(task, variant, args.epochs)
        else:
            result = (mnist_torch_only_child() if variant == "hand-torch"
                      else (mnist_child if task == "mnist" else vqvae_child)(variant, args.epochs))
        child_result(**result)
        return

    tasks = ("mnist", "vqvae") if args.task == "all" else (args.task,)
    rows: list[dict[str, Any]] = []
    paired_rows: list[dict[str, Any]] = []
    notes = [machine_note(args.threads),
             f"{args.repeats} rounds x {args.epochs} epochs per variant, epoch 0 excluded; each run a fresh process; "
             "variants alternated within each round",
             "epoch_s: epoch start to next epoch start (train + val + what runs between); train_s: training part; "
             "first_step_s: process launch (imports, data, set-up) to the first training step",
             "ratios: median of the variant / median of hand-torch (MNIST) or hand (VQ-VAE)"]
    paired_notes = [machine_note(args.threads),
                    "one process per run: after each lightrainer step a hand-written step (same work, own network "
                    "and data order) runs, so steps alternate L H L H and other jobs' load hits both alike",
                    "lightrainer step: batch start to next batch start minus the hand step between (data, hooks, "
                    "logging, progress bar, optimizer); epoch 0 and each epoch's last step excluded",
                    "lightrainer epoch: one epoch start to the next minus the hand loop's steps and validation pass "
                    "run inside it; hand epoch: those; epoch 0 and the last epoch excluded",
                    f"{args.repeats} runs per variant x {args.epochs} epochs"]
    for task in tasks:
        wanted = [v for v in VARIANTS[task] if not args.variants or v in args.variants.split(",")]
        if args.mode in ("process", "all"):
            base = "hand-torch" if task == "mnist" else "hand"
            process_wanted = wanted if base in wanted else [base, *wanted]
            runs = rounds(task, process_wanted, args, paired=False)
            if isinstance(runs, str):
                print(f"{task}: skipped: {runs}", flush=True)
                notes.append(f"{task}: skipped: {runs}")
            else:
                rows += summarise(task, runs)
        if args.mode in ("paired", "all"):
            lt_variants = [v for v in wanted if v.startswith("lightrainer")]
            runs = rounds(task, lt_variants, args, paired=True)
            if isinstance(runs, str):
                paired_notes.append(f"{task}: skipped: {runs}")
            else:
                paired_rows += summarise_paired(task, runs)
    suffix = "" if args.task == "all" else f"_{args.task}"
    if rows:
        write_results(f"overhead{suffix}", rows, "Overhead: lightrainer vs a hand-written loop vs plain Lightning", notes)
    if paired_rows:
        write_results(f"overhead_paired{suffix}", paired_rows, "Overhead per training step and per epoch, lightrainer "
                      "and hand-written steps alternated in one process", paired_notes)


if __name__ == "__main__":
    main()
