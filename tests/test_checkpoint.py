"""Checkpoints through Lightning's public API: the atomic CheckpointIO plugin of every built Trainer,
an interrupted .ckpt write that leaves the previous one loadable, the best-epoch decision, the
best score kept across a resume, and no override of a private Lightning method."""

from __future__ import annotations

import ast
import inspect
import io
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

import lightrainer as lt
import lightrainer.callbacks.checkpoint as checkpoint_module
from lightrainer.errors import WriteError
from lightrainer.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint, improves, with_atomic_checkpoint_io
from lightrainer.datamodules import ArrayDataModule
from lightrainer.modules import ClassificationModule


def tiny_cfg(tmp_path, **kw) -> lt.Config:
    values = dict(save_dir=str(tmp_path), batch=8, nbs=8, epochs=2, warmup_epochs=0.0, num_workers=0, patience=0,
                  plots=False)
    values.update(kw)
    return lt.load_config(values)


def tiny_fit(cfg: lt.Config, ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    module = ClassificationModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), cfg)
    trainer = lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, datamodule=ArrayDataModule(cfg, train=(x[:32], y[:32]), val=(x[32:], y[32:])),
                ckpt_path=ckpt_path)
    return trainer


def test_built_trainer_writes_checkpoints_through_the_atomic_plugin(tmp_path) -> None:
    trainer = lt.build_trainer(tiny_cfg(tmp_path))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_plugins_of_the_user_are_merged_and_their_checkpoint_io_wins(tmp_path) -> None:
    env = LightningEnvironment()
    trainer = lt.build_trainer(tiny_cfg(tmp_path), plugins=[env], strategy="ddp")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.strategy.cluster_environment is env
    own = TorchCheckpointIO()
    assert lt.build_trainer(tiny_cfg(tmp_path), plugins=own).strategy.checkpoint_io is own
    merged = with_atomic_checkpoint_io((env,))
    assert merged[0] is env and isinstance(merged[1], AtomicCheckpointIO) and len(merged) == 2
    assert [type(p) for p in with_atomic_checkpoint_io(None)] == [AtomicCheckpointIO]


def test_interrupted_checkpoint_write_leaves_the_previous_last_ckpt_loadable(tmp_path, monkeypatch) -> None:
    trainer = tiny_fit(tiny_cfg(tmp_path))
    weights = tmp_path / "train" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["best.ckpt", "best.pt", "last.ckpt", "last.pt"]
    before = (weights / "last.ckpt").read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(WriteError, match="No space left"):
        trainer.save_checkpoint(weights / "last.ckpt")
    monkeypatch.undo()
    assert (weights / "last.ckpt").read_bytes() == before
    last = torch.load(weights / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    # The best score travels in the checkpoint, so a resumed run keeps it.
    state = last["callbacks"]["RunCheckpoint"]
    assert state["monitor"] == trainer.lightning_module.fitness_monitor[0]
    best = torch.load(weights / "best.pt", weights_only=True)
    assert state["best_model_score"] == pytest.approx(best["best_fitness"])
    assert sorted(p.name for p in weights.iterdir()) == ["best.ckpt", "best.pt", "last.ckpt", "last.pt"]


class BestAtStart(L.Callback):
    """The checkpoint callback's best score when the (resumed) training starts."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.score = trainer.checkpoint_callback.best_model_score


def test_resumed_fit_starts_from_the_saved_best_score(tmp_path) -> None:
    first = tiny_fit(tiny_cfg(tmp_path))
    saved = first.checkpoint_callback.best_model_score
    assert saved is not None
    probe = BestAtStart()
    weights = tmp_path / "train" / "weights"
    trainer = tiny_fit(tiny_cfg(tmp_path, epochs=3), weights / "last.ckpt", run_dir=tmp_path / "train",
                       callbacks=[probe])
    assert probe.score == saved
    best = torch.load(weights / "best.pt", weights_only=True)["best_fitness"]
    assert best == trainer.checkpoint_callback.best_model_score
    assert not improves(saved, best, trainer.lightning_module.fitness_monitor[1])  # never worse than before


def test_no_checkpoint_under_fast_dev_run(tmp_path) -> None:
    tiny_fit(tiny_cfg(tmp_path), fast_dev_run=True)
    assert list((tmp_path / "train" / "weights").iterdir()) == []


@pytest.mark.parametrize(
    ("current", "best", "mode", "want"),
    [
        (0.5, None, "max", True),
        (math.nan, None, "min", True),  # the first validated epoch is the best so far, whatever it is
        (0.6, 0.5, "max", True),
        (0.5, 0.5, "max", False),  # a tie keeps the earlier epoch
        (0.4, 0.5, "max", False),
        (0.4, 0.5, "min", True),
        (0.6, 0.5, "min", False),
        (math.nan, 0.5, "min", False),
        (0.9, math.nan, "min", True),
        (math.nan, math.nan, "max", False),
    ],
)
def test_improves(current, best, mode, want) -> None:
    assert improves(current, best, mode) is want


def test_best_score_is_restored_only_for_the_same_fitness(tmp_path) -> None:
    saved = RunCheckpoint(tmp_path)
    saved.monitor, saved.mode, saved.best_model_score = "val/acc", "max", 0.75
    same = RunCheckpoint(tmp_path)
    same.monitor, same.mode = "val/acc", "max"
    same.load_state_dict(saved.state_dict())
    assert same.best_model_score == 0.75 and same.best_model_path == str(tmp_path / "best.ckpt")
    other = RunCheckpoint(tmp_path)
    other.monitor, other.mode = "val/loss", "min"
    other.load_state_dict(saved.state_dict())
    assert other.best_model_score is None and other.best_model_path == ""


def lightning_classes(module) -> list[type]:
    return [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if obj.__module__ == module.__name__ and any(b.__module__.startswith("lightning") for b in obj.__mro__[1:])
    ]


def test_checkpoint_module_overrides_no_private_lightning_method() -> None:
    classes = lightning_classes(checkpoint_module)
    assert {c.__name__ for c in classes} >= {"RunCheckpoint", "AtomicCheckpointIO", "RandomState"}
    for cls in classes:
        lightning_bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("lightning")]
        for name, value in vars(cls).items():
            method = inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))
            if method and name.startswith("_") and not name.startswith("__"):
                owners = [b.__qualname__ for b in lightning_bases if name in vars(b)]
                assert not owners, f"{cls.__name__}.{name} overrides private {owners}"


def test_checkpoint_module_reads_no_private_attribute_of_another_object() -> None:
    tree = ast.parse(inspect.getsource(checkpoint_module))
    private = [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []
    lightning_attrs = {name for cls in lightning_classes(checkpoint_module) for base in cls.__mro__[1:]
                       if base.__module__.startswith("lightning") for name in vars(base)}
    own = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr.startswith("_")
           and isinstance(node.value, ast.Name) and node.value.id == "self"}
    assert not own & lightning_attrs
