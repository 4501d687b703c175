"""The training semantics of DESIGN.md, checked in real Lightning fits against formulas written out here."""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import lightrainer as lt
from lightrainer.config import derived_values
from lightrainer.datamodules import ArrayDataModule
from lightrainer.modules import ClassificationModule
from test_cli import results  # results.csv without its time column

N_TRAIN, N_VAL, BATCH = 96, 32, 8
NB = N_TRAIN // BATCH  # batches per epoch


def make_data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_net(norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16)] + ([nn.LayerNorm(16)] if norm else []) + [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


class Recorder(L.Callback):
    """Records every optimizer step: iteration, lr and momentum of each group, weight decay."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.ni = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ni = batch_idx + trainer.num_training_batches * trainer.current_epoch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = optimizer.param_groups
        self.steps.append(
            {
                "ni": self.ni,
                "lr": [g["lr"] for g in groups],
                "momentum": [g.get("momentum", g.get("betas", (None,))[0]) for g in groups],
                "wd": [g["weight_decay"] for g in groups],
                "type": type(optimizer).__name__,
                "defaults": dict(optimizer.defaults),
            }
        )


def lf_reference(name: str, x: int, cfg: lt.Config) -> float:
    E, lrf = cfg.epochs, cfg.lrf
    if name == "Cosine":
        return ((1 - math.cos(x * math.pi / E)) / 2) * (lrf - 1) + 1
    if name == "Linear":
        return max(1 - x / E, 0) * (1 - lrf) + lrf
    if name == "Exponential":
        return cfg.gamma**x * (1 - lrf) + lrf
    return max(1 - x / E, 0) ** cfg.power * (1 - lrf) + lrf


def expected_steps(cfg: lt.Config, nb: int) -> list[dict]:
    """Ultralytics' loop, written out: warmup per iteration, accumulate ramp, the step rule."""
    nw = max(round(cfg.warmup_epochs * nb), 100) if cfg.warmup_epochs > 0 else -1
    base_accumulate = max(round(cfg.nbs / cfg.batch), 1)
    momentum = cfg.momentum
    last_opt_step, out = -1, []
    for epoch in range(cfg.epochs):
        epoch_lr = cfg.lr0 * lf_reference(cfg.scheduler, epoch, cfg)
        lrs = [epoch_lr] * 4
        for i in range(nb):
            ni = i + nb * epoch
            accumulate = base_accumulate
            if ni <= nw:
                accumulate = max(1, round(float(np.interp(ni, [0, nw], [1, cfg.nbs / cfg.batch]))))
                lrs = [float(np.interp(ni, [0, nw], [cfg.warmup_bias_lr if j == 0 else 0.0, epoch_lr])) for j in range(4)]
                momentum = float(np.interp(ni, [0, nw], [cfg.warmup_momentum, cfg.momentum]))
            if ni - last_opt_step >= accumulate:
                out.append({"ni": ni, "lr": list(lrs), "momentum": momentum})
                last_opt_step = ni
    return out


def fit(cfg: lt.Config, net: nn.Module, tmp_path, **trainer_kwargs) -> tuple[L.Trainer, Recorder, ClassificationModule]:
    train, val = make_data()
    recorder = Recorder()
    module = ClassificationModule(net, cfg)
    trainer = lt.build_trainer(cfg, callbacks=[recorder], enable_progress_bar=False,
                               enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, datamodule=ArrayDataModule(cfg, train=train, val=val))
    return trainer, recorder, module


def base_cfg(tmp_path, **kw) -> lt.Config:
    values = dict(save_dir=str(tmp_path), batch=BATCH, nbs=32, epochs=10, warmup_epochs=3.0, lr0=0.05,
                  lrf=0.1, momentum=0.9, warmup_momentum=0.5, warmup_bias_lr=0.2, weight_decay=0.01,
                  num_workers=0, patience=0, plots=False)
    values.update(kw)
    return lt.load_config(values)


def check_curve(cfg: lt.Config, recorder: Recorder, trainer: L.Trainer) -> None:
    expected = expected_steps(cfg, NB)
    assert trainer.global_step == len(expected)
    assert [s["ni"] for s in recorder.steps] == [e["ni"] for e in expected]
    for got, want in zip(recorder.steps, expected):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9, abs=1e-12), got["ni"]
        if cfg.optimizer in ("SGD", "RMSProp"):
            assert got["momentum"] == pytest.approx([want["momentum"]] * 4, rel=1e-9)
        elif cfg.optimizer != "RMSProp":
            assert got["momentum"] == pytest.approx([cfg.momentum] * 4)  # beta1 stays at momentum
    decay = cfg.weight_decay * cfg.batch * max(round(cfg.nbs / cfg.batch), 1) / cfg.nbs
    assert recorder.steps[0]["wd"] == pytest.approx([0.0, 0.0, decay * 0.01, decay])


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp"])
def test_lr_momentum_steps_per_optimizer(tmp_path, optimizer: str) -> None:
    cfg = base_cfg(tmp_path, optimizer=optimizer, scheduler="Cosine")
    trainer, recorder, _ = fit(cfg, make_net(), tmp_path)
    check_curve(cfg, recorder, trainer)
    step = recorder.steps[0]
    expected_type = {"RMSProp": "RMSprop"}.get(optimizer, optimizer)
    assert step["type"] == expected_type
    if optimizer == "SGD":
        assert step["defaults"]["nesterov"] is True
    if optimizer in ("Adam", "Adamax", "AdamW", "NAdam", "RAdam"):
        assert step["defaults"]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("scheduler", ["Linear", "Exponential", "Polynomial"])
def test_lr_curve_per_schedule(tmp_path, scheduler: str) -> None:
    cfg = base_cfg(tmp_path, optimizer="SGD", scheduler=scheduler, gamma=0.7, power=3.0)
    trainer, recorder, _ = fit(cfg, make_net(), tmp_path)
    check_curve(cfg, recorder, trainer)


def test_no_warmup_and_param_groups(tmp_path) -> None:
    cfg = base_cfg(tmp_path, optimizer="SGD", warmup_epochs=0, epochs=3, batch=8, nbs=8)
    trainer, recorder, module = fit(cfg, make_net(), tmp_path)
    check_curve(cfg, recorder, trainer)
    assert trainer.global_step == 3 * NB  # accumulate 1: a step per batch
    opt = trainer.optimizers[0]
    names = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    net = module.net
    assert names["bias"] == {id(net[0].bias), id(net[1].bias), id(net[3].bias)}
    assert names["no_decay"] == {id(net[1].weight)}  # LayerNorm weight
    assert names["decay"] == {id(net[0].weight), id(net[3].weight)}
    assert names["embedding"] == set()


def test_embedding_weights_decay_at_a_hundredth() -> None:
    from lightrainer.optim import split_parameters

    net = nn.ModuleDict({"emb": nn.Embedding(5, 3), "bn": nn.BatchNorm1d(3), "fc": nn.Linear(3, 2)})
    groups = {k: {id(p) for p in v} for k, v in split_parameters(net).items()}
    assert groups["embedding"] == {id(net["emb"].weight)}
    assert groups["no_decay"] == {id(net["bn"].weight)}
    assert groups["bias"] == {id(net["bn"].bias), id(net["fc"].bias)}
    assert groups["decay"] == {id(net["fc"].weight)}


def test_fit_matches_a_hand_written_loop(tmp_path) -> None:
    """Parameters after a fit equal an independent plain-PyTorch loop: same order, warmup,
    accumulation by summed gradients, clipping, Nesterov SGD with the four groups."""
    cfg = base_cfg(tmp_path, optimizer="SGD", epochs=4, grad_clip=1.0, warmup_epochs=3.0)
    net = make_net(norm=False)
    reference = copy.deepcopy(net)
    fit(cfg, net, tmp_path)

    (x, y), _ = make_data()
    decay = cfg.weight_decay * cfg.batch * 4 / cfg.nbs
    biases = [p for n, p in reference.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in reference.named_parameters() if n.endswith("weight")]
    opt = torch.optim.SGD(
        [{"params": biases, "weight_decay": 0.0}, {"params": weights, "weight_decay": decay}],
        lr=cfg.lr0, momentum=cfg.momentum, nesterov=True,
    )
    steps = {s["ni"]: s for s in expected_steps(cfg, NB)}
    for epoch in range(cfg.epochs):
        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i in range(NB):
            ni = i + NB * epoch
            idx = order[i * BATCH:(i + 1) * BATCH]
            F.cross_entropy(reference(x[idx]), y[idx]).backward()  # summed across micro-batches
            if ni in steps:
                for group, lr in zip(opt.param_groups, (steps[ni]["lr"][0], steps[ni]["lr"][3])):
                    group["lr"], group["momentum"] = lr, steps[ni]["momentum"]
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
    for (name, got), want in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_run_folder_contents(tmp_path) -> None:
    cfg = base_cfg(tmp_path, epochs=3, plots=True, name="exp")
    trainer, _, module = fit(cfg, make_net(), tmp_path)
    run = tmp_path / "exp"
    assert cfg.run_dir == str(run) and trainer.default_root_dir == str(run)
    for name in ("args.yaml", "results.csv", "results.png", "weights/best.pt", "weights/last.pt",
                 "weights/last.ckpt", "weights/best.ckpt"):
        assert (run / name).is_file(), name
    derived = derived_values((run / "args.yaml").read_text())
    assert derived["accumulate"] == 4 and derived["batches_per_epoch"] == NB
    assert derived["warmup_iters"] == 100 and derived["fitness"] == "val/acc"
    last = torch.load(run / "weights/last.pt", weights_only=True)
    assert set(last) >= {"epoch", "best_fitness", "model", "optimizer", "date"}
    assert last["epoch"] == 2
    for key, value in module.net.state_dict().items():
        torch.testing.assert_close(last["model"][key], value)
    best = torch.load(run / "weights/best.pt", weights_only=True)
    rows = (run / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4 and header[0] == "epoch"
    assert {"train/loss", "val/loss", "val/acc", "lr/bias", "lr/decay"} <= set(header)
    accs = [float(r.split(",")[header.index("val/acc")]) for r in rows[1:]]
    assert best["best_fitness"] == pytest.approx(max(accs), abs=1e-6)
    assert best["epoch"] == accs.index(max(accs))


def test_runs_never_overwrite(tmp_path) -> None:
    for expected in ("train", "train2", "train3"):
        cfg = base_cfg(tmp_path, epochs=1)
        lt.build_trainer(cfg)
        assert cfg.run_dir == str(tmp_path / expected)
    cfg = base_cfg(tmp_path, epochs=1, exist_ok=True)
    lt.build_trainer(cfg)
    assert cfg.run_dir == str(tmp_path / "train")


def test_early_stopping_on_fitness(tmp_path) -> None:
    # lr0 tiny: the accuracy cannot improve after the first epoch, so patience 2 stops at epoch 3.
    cfg = base_cfg(tmp_path, epochs=20, patience=2, lr0=1e-12, warmup_epochs=0, warmup_bias_lr=0.0)
    trainer, _, _ = fit(cfg, make_net(), tmp_path)
    assert trainer.current_epoch == 3


def test_resume_continues_epochs_and_lr_curve(tmp_path) -> None:
    full_cfg = base_cfg(tmp_path, optimizer="SGD", epochs=4, name="full")
    trainer_full, rec_full, module_full = fit(full_cfg, make_net(), tmp_path)

    cut_cfg = base_cfg(tmp_path, optimizer="SGD", epochs=4, name="cut")
    fit(cut_cfg, make_net(), tmp_path, max_epochs=2)
    ckpt = tmp_path / "cut" / "weights" / "last.ckpt"
    resumed_cfg = base_cfg(tmp_path, optimizer="SGD", epochs=4, name="cut")
    train, val = make_data()
    recorder = Recorder()
    module = ClassificationModule(make_net(), resumed_cfg)
    trainer = lt.build_trainer(resumed_cfg, run_dir=tmp_path / "cut", callbacks=[recorder],
                               enable_progress_bar=False)
    trainer.fit(module, datamodule=ArrayDataModule(resumed_cfg, train=train, val=val), ckpt_path=ckpt)

    assert trainer.current_epoch == 4 and trainer.global_step == trainer_full.global_step
    resumed_steps = [s for s in rec_full.steps if s["ni"] >= 2 * NB]
    assert [s["ni"] for s in recorder.steps] == [s["ni"] for s in resumed_steps]
    for got, want in zip(recorder.steps, resumed_steps):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    for got, want in zip(module.net.parameters(), module_full.net.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cut_rows, full_rows = results(tmp_path / "cut"), results(tmp_path / "full")
    assert [r["epoch"] for r in cut_rows] == ["1", "2", "3", "4"]
    assert cut_rows == full_rows  # every column but the wall-clock time
    # Lightning's CSV log of the first part survives the resume (the resumed part goes to logs2/).
    assert (tmp_path / "cut" / "logs" / "metrics.csv").is_file()
    assert (tmp_path / "cut" / "logs2" / "metrics.csv").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallbacks")
def test_gpu_and_amp_requests_fall_back_to_the_cpu_with_a_warning(tmp_path) -> None:
    cfg = base_cfg(tmp_path, device="0", amp=True)
    with pytest.warns(UserWarning) as caught:
        trainer = lt.build_trainer(cfg)
    messages = " ".join(str(w.message) for w in caught)
    assert "device=[0] asks for CUDA GPUs but none is available" in messages
    assert "amp=True needs a CUDA device" in messages
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert trainer.precision == "32-true"


def test_fitness_from_the_config_selects_best(tmp_path) -> None:
    cfg = base_cfg(tmp_path, epochs=3, fitness="loss")
    trainer, _, module = fit(cfg, make_net(), tmp_path)
    assert module.fitness_monitor == ("val/loss", "min")
    rows = (tmp_path / "train" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("val/loss")]) for r in rows[1:]]
    best = torch.load(tmp_path / "train" / "weights" / "best.pt", weights_only=True)
    assert best["best_fitness"] == pytest.approx(min(losses), rel=1e-5)
