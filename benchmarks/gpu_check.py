"""One prepared check for a lent GPU machine (issue 7, "GPU check"); skips, saying why, on a CPU.

    python benchmarks/gpu_check.py            # about 5-8 minutes on one H100
    python benchmarks/gpu_check.py --quick    # fewer epochs, for a first look

On the GPU, for MNIST-5k SmallCNN (batch 64 as configs/mnist.yaml, and 256) and the VQ-VAE of
configs/vqvae.yaml, each with its data held on the GPU (the datamodules' default):

* the hand-written loop (plain PyTorch, same work) and lightrainer, in fp32, amp fp16 and amp bf16;
* lightrainer with channels_last, with compile, and with the progress bar on (one host sync per
  step for its running loss);
* images/s of the training part of an epoch (epoch 1 is warm-up: cuDNN autotune, compile),
  ratio to the hand-written loop with the same precision, peak GPU memory.

Whatever the machine lacks (the packaged MNIST-5k, the photos of skimage, kornia) is replaced or the
part is skipped with the reason printed; the table says which data each row used. Writes
benchmarks/results/gpu_check.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    EpochClock,
    format_table,
    hand_written_fit,
    lightning_clock_callback,
    median,
    write_results,
)

BUDGET_S = 540  # stop starting new measurements after this (the lent machine allows 10 minutes a command)
#: "cuda"; "cpu" only for --cpu-dry-run (checks this script's logic without a GPU: fp32 rows, tiny data).
DEVICE = "cuda"


def cuda_reason() -> str | None:
    """None when a CUDA GPU is usable, else why not."""
    try:
        import torch
    except ImportError as err:
        return f"torch does not import: {err}"
    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (CUDA build {torch.version.cuda})"
    return None


# ---------------------------------------------------------------------------------- data
def mnist_tensors() -> tuple[tuple[Any, Any], tuple[Any, Any], str]:
    """MNIST-5k normalised and split 4000/1000, or same-shaped synthetic digits where it does not load."""
    import torch

    try:
        from lightrainer.datamodules.mnist import read_mnist5k

        images, labels = read_mnist5k()
        x = (torch.from_numpy(images).float().reshape(-1, 1, 28, 28) / 255 - 0.1307) / 0.3081
        y = torch.from_numpy(labels).long()
        source = "MNIST-5k"
    except ImportError:
        g = torch.Generator().manual_seed(0)
        y = torch.arange(5000) % 10
        x = torch.randn(5000, 1, 28, 28, generator=g) * 0.5 + y.float().view(-1, 1, 1, 1) / 10
        source = "synthetic 5000x1x28x28 (MNIST-5k missing)"
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:4000], y[:4000]), (x[4000:], y[4000:]), source


def photo_patches() -> tuple[Any, Any, str]:
    """32x32 RGB crops in [0, 1]: the VQ-VAE's photos when they load, else smooth synthetic images."""
    import torch
    import torch.nn.functional as F

    try:
        from lightrainer.datamodules.photos import DEFAULT_TRAIN_PHOTOS, DEFAULT_VAL_PHOTOS, grid_patches, load_photo

        train = torch.cat([grid_patches(load_photo(n, 3, 512), 32, 16) for n in DEFAULT_TRAIN_PHOTOS])
        val = torch.cat([grid_patches(load_photo(n, 3, 512), 32) for n in DEFAULT_VAL_PHOTOS])
        return train.float() / 255, val.float() / 255, "photo crops (stride 16)"
    except Exception as err:  # noqa: BLE001 - any missing package or photo: fall back, say so
        g = torch.Generator().manual_seed(0)
        low = torch.rand(7000, 3, 8, 8, generator=g)
        x = F.interpolate(low, size=32, mode="bilinear", align_corners=False)
        return x[:6400], x[6400:], f"synthetic smooth 32x32 ({type(err).__name__}: {err})"


# ---------------------------------------------------------------------------------- runs
def precision_of(amp: str) -> str:
    return {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[amp]


def autocast_of(amp: str) -> tuple[Callable | None, Any]:
    import torch

    if amp == "fp32":
        return None, None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(DEVICE) if amp == "fp16" else None
    return (lambda: torch.autocast(DEVICE, dtype=dtype)), scaler


def run_lightrainer(task: str, cfg: Any, train: Any, val: Any, amp: str, bar: bool) -> tuple[EpochClock, Any]:
    import torch

    import lightrainer as lt
    from lightrainer.datamodules import ArrayDataModule

    if task == "mnist":
        from lightrainer.modules import ClassificationModule, SmallCNN

        module = ClassificationModule(SmallCNN(10, 1), cfg)
    else:
        from lightrainer.modules.vqvae import VQVAEModule

        module = VQVAEModule.from_config(cfg)
    clock = EpochClock()
    trainer = lt.build_trainer(cfg, callbacks=[lightning_clock_callback(clock)], enable_progress_bar=bar,
                               enable_model_summary=False, precision=precision_of(amp), logger=False)
    dm = ArrayDataModule(cfg, train=train, val=val)
    trainer.fit(module, datamodule=dm)
    batch = next(iter(trainer.train_dataloader))
    assert batch[0].device.type == DEVICE, f"in-memory data should sit on the {DEVICE}"
    return clock, module


def run_hand(task: str, cfg: Any, train: Any, val: Any, amp: str, compile_: bool) -> EpochClock:
    import torch
    import torch.nn.functional as F

    device = torch.device(DEVICE)
    x, y = (t.to(device) if t is not None else None for t in train)
    vx, vy = (t.to(device) if t is not None else None for t in val)
    if task == "mnist":
        from lightrainer.modules import SmallCNN

        net = SmallCNN(10, 1).to(device)

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1], label_smoothing=cfg.label_smoothing)
    else:
        from lightrainer.modules.vqvae import build_vqvae

        net = build_vqvae(cfg).to(device)
        vq_w, recon_w = cfg.extra("vq_weight"), cfg.extra("recon_weight")

        def loss_fn(m, b):
            recon, vq, _ = m(b[0])
            return vq_w * vq + recon_w * F.mse_loss(recon.float(), b[0])
    if compile_:
        net.compile()
    n, batch = len(x), cfg.batch
    nb = -(-n // batch)

    def batches(epoch: int):
        order = torch.randperm(n, device=device)
        for i in range(nb):
            idx = order[i * batch:(i + 1) * batch]
            yield (x[idx], y[idx]) if y is not None else (x[idx],)

    def val_batches():
        for i in range(0, len(vx), batch):
            yield (vx[i:i + batch], vy[i:i + batch]) if vy is not None else (vx[i:i + batch],)

    autocast, scaler = autocast_of(amp)
    clock = EpochClock()
    fused = {"fused": True} if cfg.optimizer in ("Adam", "AdamW", "SGD") else {}
    cls = getattr(torch.optim, cfg.optimizer)
    hand_written_fit(cfg, net, batches, nb, loss_fn, val_batches, lambda m, b: m(b[0]), clock,
                     optimizer_cls=lambda *a, **k: cls(*a, **k, **fused), autocast=autocast, scaler=scaler)
    return clock


def measure(label: str, fn: Callable[[], EpochClock], n_train: int) -> dict[str, Any]:
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    clock = fn()
    wall = time.perf_counter() - start
    result = clock.result(warmup=1)
    train = median(result["train_s"])
    bounds = clock.starts[:1] + clock.val_starts[:1]
    return {"variant": label, "images_per_s": n_train / train, "train_epoch_s": train,
            "warmup_epoch_s": bounds[1] - bounds[0] if len(bounds) == 2 else float("nan"),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else float("nan"),
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 epochs per run instead of 6")
    parser.add_argument("--task", choices=("mnist", "vqvae", "all"), default="all")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reason = cuda_reason()
    if args.cpu_dry_run:
        global DEVICE
        DEVICE, reason = "cpu", None
    if reason:
        print(f"gpu_check: skipped: {reason}. Run it on a machine with a CUDA GPU.")
        return

    import logging
    import warnings

    import torch

    import lightrainer as lt

    if DEVICE == "cpu":
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.backends.cudnn.benchmark = True
    t_begin = time.perf_counter()
    epochs = 2 if args.cpu_dry_run else 3 if args.quick else 6
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run: logic only, numbers meaningless)"
    rows: list[dict[str, Any]] = []
    notes = [f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}",
             f"{epochs} epochs per run, epoch 1 excluded (cuDNN autotune, compile); median of the rest; "
             "ratio: images/s over the hand-written loop's with the same precision and batch"]

    (mx, my), (mvx, mvy), msource = mnist_tensors()
    px, pvx, psource = photo_patches()
    if args.cpu_dry_run:
        mx, my, mvx, mvy, px, pvx = mx[:256], my[:256], mvx[:64], mvy[:64], px[:128], pvx[:32]
    notes += [f"mnist data: {msource}", f"vqvae data: {psource}"]
    try:
        import kornia  # noqa: F401

        import lightrainer.modules.vqvae  # noqa: F401  (declares the VQ-VAE's config keys)
        vqvae_ok = None
    except ImportError as err:
        vqvae_ok = f"VQ-VAE needs {err.name or err} (pip install kornia, or carry its wheel)"

    plans: list[tuple[str, dict, list[tuple[str, str, dict]]]] = []
    for batch in (64, 256):
        cfg_kw = dict(batch=batch, nbs=batch, optimizer="AdamW", lr0=0.002, momentum=0.937, warmup_epochs=1.0,
                      label_smoothing=0.1, shift=0, num_workers=0, patience=0, plots=False, epochs=epochs)
        variants = [("hand", "fp32", {}), ("lightrainer", "fp32", {}),
                    ("hand", "fp16", {}), ("lightrainer", "fp16", {}), ("lightrainer+bar", "fp16", {}),
                    ("hand", "bf16", {}), ("lightrainer", "bf16", {}),
                    ("lightrainer+channels_last", "fp16", {"channels_last": True})]
        if batch == 256:
            variants += [("hand+compile", "fp16", {}), ("lightrainer+compile", "fp16", {"compile": True})]
        plans.append((f"mnist b{batch}", cfg_kw, variants))
    plans.append(("vqvae b32", dict(batch=32, nbs=32, optimizer="Adam", lr0=0.003, momentum=0.9, warmup_epochs=0.5,
                                    num_workers=0, patience=0, plots=False, epochs=epochs, channels=32, res_blocks=1,
                                    downsample=2, codebook_size=2048, code_dim=16, codebook_ema=True, lpips_weight=0.0),
                  [("hand", "fp32", {}), ("lightrainer", "fp32", {}), ("hand", "fp16", {}), ("lightrainer", "fp16", {}),
                   ("hand", "bf16", {}), ("lightrainer", "bf16", {}),
                   ("lightrainer+channels_last", "fp16", {"channels_last": True})]))

    for task_label, cfg_kw, variants in plans:
        task = task_label.split()[0]
        if args.task not in ("all", task):
            continue
        if task == "vqvae" and vqvae_ok:
            print(f"{task_label}: skipped: {vqvae_ok}", flush=True)
            notes.append(f"{task_label}: skipped: {vqvae_ok}")
            continue
        train, val = ((mx, my), (mvx, mvy)) if task == "mnist" else ((px, None), (pvx, None))
        if args.cpu_dry_run:
            variants = [(lab, "fp32", ex) for lab, amp, ex in variants if amp == "fp32" or "channels_last" in lab]
        base: dict[str, float] = {}
        for label, amp, extra in variants:
            if time.perf_counter() - t_begin > BUDGET_S:
                notes.append(f"time budget reached: {task_label} {label} {amp} and later runs not measured")
                break
            cfg = lt.load_config(dict(save_dir=tempfile.mkdtemp(), **cfg_kw, **extra))
            try:
                if label.startswith("hand"):
                    row = measure(label, lambda: run_hand(task, cfg, train, val, amp, "compile" in label), len(train[0]))
                else:
                    row = measure(label, lambda: run_lightrainer(task, cfg, train, val, amp, "bar" in label)[0],
                                  len(train[0]))
            except Exception as err:  # noqa: BLE001 - report and go on with the next measurement
                traceback.print_exc()
                row = {"variant": label, "error": f"{type(err).__name__}: {err}"[:200]}
            row = {"task": task_label, "amp": amp, **row}
            if label == "hand" and "images_per_s" in row:
                base[amp] = row["images_per_s"]
            if "images_per_s" in row:
                row["ratio_vs_hand"] = row["images_per_s"] / base.get(amp, float("nan"))
            print(row, flush=True)
            rows.append(row)
    columns = ["task", "variant", "amp", "images_per_s", "ratio_vs_hand", "train_epoch_s", "warmup_epoch_s",
               "peak_gpu_mb", "wall_s", "error"]
    rows = [{c: r.get(c, "") for c in columns} for r in rows]
    notes.append(f"total {time.perf_counter() - t_begin:.0f} s")
    if args.cpu_dry_run:  # logic check only: never overwrite a GPU's results
        print(format_table(rows), *notes, sep="\n")
        return
    write_results("gpu_check", rows, f"GPU check on {name}", notes)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
