"""EMA of the weights (``ema: True``): the update rule, in a fit, in checkpoints and on resume."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightrainer as lt
from lightrainer.datamodules import ArrayDataModule
from lightrainer.ema import ModelEMA
from lightrainer.modules import ClassificationModule

N_TRAIN, N_VAL, BATCH = 48, 16, 8


def make_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))


def cfg_for(tmp_path, **kw) -> lt.Config:
    values = dict(save_dir=str(tmp_path), batch=BATCH, nbs=BATCH, epochs=3, warmup_epochs=0, lr0=0.05,
                  optimizer="SGD", num_workers=0, patience=0, plots=False, ema=True, ema_decay=0.9, ema_tau=4.0)
    values.update(kw)
    return lt.load_config(values)


def reference_ema(snapshots: list[dict[str, torch.Tensor]], initial: dict[str, torch.Tensor], decay: float,
                  tau: float) -> dict[str, torch.Tensor]:
    """The Ultralytics rule written out in float64: d_n = decay * (1 - exp(-n / tau))."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in initial.items()}
    for n, state in enumerate(snapshots, start=1):
        d = decay * (1 - math.exp(-n / tau))
        for k, v in state.items():
            ema[k] = d * ema[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    return ema


def test_update_rule_matches_the_formula() -> None:
    net = make_net()
    initial = copy.deepcopy(net.state_dict())
    ema = ModelEMA(net, decay=0.99, tau=3.0)
    snapshots = []
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(5, 6))  # moves BatchNorm's running stats and counter
        snapshots.append(copy.deepcopy(net.state_dict()))
        ema.update(net)
    want = reference_ema(snapshots, initial, 0.99, 3.0)
    got = ema.module.state_dict()
    assert ema.updates == 6
    for k, v in want.items():
        torch.testing.assert_close(got[k].double() if got[k].is_floating_point() else got[k], v, rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_bad_decay_and_tau() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(make_net(), decay=1.0)
    with pytest.raises(ValueError, match="ema_tau"):
        ModelEMA(make_net(), tau=0)
    with pytest.raises(lt.ConfigError, match="ema_decay"):
        lt.load_config({"ema_decay": 1.5})


def test_copy_of_a_compiled_net_runs_its_own_weights() -> None:
    net = make_net()
    net.compile()  # compiles lazily: nothing runs here
    ema = ModelEMA(net)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in ema.module.modules())


class StepSnapshots(L.Callback):
    """The network's state after every optimizer step (accumulate 1: after every batch)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def fit(cfg: lt.Config, callbacks=(), **kw) -> tuple[L.Trainer, ClassificationModule]:
    train, val = make_data()
    module = ClassificationModule(make_net(), cfg)
    trainer = lt.build_trainer(cfg, callbacks=list(callbacks), enable_progress_bar=False,
                               enable_model_summary=False, **kw)
    trainer.fit(module, datamodule=ArrayDataModule(cfg, train=train, val=val))
    return trainer, module


def test_fit_averages_validates_and_saves_the_ema(tmp_path) -> None:
    cfg = cfg_for(tmp_path)
    snaps = StepSnapshots()
    initial = make_net().state_dict()
    trainer, module = fit(cfg, [snaps])
    assert trainer.global_step == len(snaps.states) == cfg.epochs * N_TRAIN // BATCH
    want = reference_ema(snaps.states, initial, cfg.ema_decay, cfg.ema_tau)
    got = module.ema.module.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k].double() if got[k].is_floating_point() else got[k], v, rtol=1e-5, atol=1e-6)
    # weights/last.pt holds the EMA (what was validated), not the raw weights.
    last = torch.load(tmp_path / "train" / "weights" / "last.pt", weights_only=True)
    for k, v in got.items():
        torch.testing.assert_close(last["model"][k], v.cpu())
    assert not torch.equal(last["model"]["0.weight"], module.net.state_dict()["0.weight"])
    # The last epoch's val/loss is the EMA network's loss on the validation data.
    _, (vx, vy) = make_data()
    ema_net = make_net()
    ema_net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in want.items()})
    with torch.no_grad():
        expected = F.cross_entropy(ema_net.eval()(vx), vy).item()
    rows = (tmp_path / "train" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert float(rows[-1].split(",")[header.index("val/loss")]) == pytest.approx(expected, rel=1e-4)


def test_resume_continues_the_ema(tmp_path) -> None:
    _, full = fit(cfg_for(tmp_path, name="full", epochs=4))
    fit(cfg_for(tmp_path, name="cut", epochs=4), max_epochs=2)
    ckpt = tmp_path / "cut" / "weights" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["lightrainer"]["ema"]["updates"] == 2 * N_TRAIN // BATCH
    train, val = make_data()
    cfg = cfg_for(tmp_path, name="cut", epochs=4)
    module = ClassificationModule(make_net(), cfg)
    trainer = lt.build_trainer(cfg, run_dir=tmp_path / "cut", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ArrayDataModule(cfg, train=train, val=val), ckpt_path=ckpt)
    assert module.ema.updates == full.ema.updates
    for (k, got), want in zip(module.ema.module.state_dict().items(), full.ema.module.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=k)


def test_ema_off_saves_the_raw_weights(tmp_path) -> None:
    _, module = fit(cfg_for(tmp_path, ema=False, epochs=1))
    assert module.ema is None
    last = torch.load(tmp_path / "train" / "weights" / "last.pt", weights_only=True)
    for k, v in module.net.state_dict().items():
        torch.testing.assert_close(last["model"][k], v)
