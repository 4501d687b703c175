"""The fast paths give the plain paths' results: fused/foreach optimizers, channels_last, compile,
the in-memory loader against a torch DataLoader; no host syncs per step; lazy optional imports."""

from __future__ import annotations

import subprocess
import sys
import traceback
from collections import Counter

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import lightrainer as lt
from lightrainer.datamodules import ArrayDataModule, InMemoryBatchLoader
from lightrainer.modules import ClassificationModule
from lightrainer.optim import OPTIMIZERS, build_optimizer, kernel_options, optimizer_info

# --- lazy imports ------------------------------------------------------------------------------
OPTIONAL = ("wandb", "onnx", "onnxruntime", "onnxscript", "pytorch_quantization", "modelopt", "tensorboard",
            "tensorboardX", "tensorrt", "lpips", "kornia", "skimage", "mlxtend", "sklearn", "pandas")


def test_import_loads_no_optional_backend(repo_path) -> None:
    code = ("import sys, lightrainer, lightrainer.modules, lightrainer.datamodules\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_path, check=True)
    loaded = set(eval(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(OPTIONAL), f"imported at `import lightrainer`: {sorted(loaded & set(OPTIONAL))}"


# --- fused / foreach optimizers ----------------------------------------------------------------
def small_net() -> nn.Module:
    # No conv bias before BatchNorm: its true gradient is 0, and Adam would turn rounding noise
    # into full-size steps, so no two implementations could agree on it.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fast_kernels_match_the_per_parameter_loop(name: str) -> None:
    cfg = lt.load_config({"optimizer": name, "lr0": 0.01, "momentum": 0.9, "weight_decay": 0.01})
    fast_net, plain_net = small_net(), small_net()
    fast = build_optimizer(fast_net, cfg)
    info = optimizer_info(name)
    expected = {"fused": True} if info.fused else {"foreach": True} if info.foreach else {}
    assert kernel_options(name, fast_net) == expected
    assert all(fast.defaults[k] is v for k, v in expected.items())
    # The reference: the same groups, torch's single-tensor (for-loop) implementation.
    plain = build_optimizer(plain_net, cfg)
    for group in plain.param_groups:
        group.update(foreach=False, fused=None)
    plain.defaults.update(foreach=False, fused=None)
    g = torch.Generator().manual_seed(1)
    for step in range(15):
        grads = [torch.randn(p.shape, generator=g) for p in fast_net.parameters()]
        for opt, net in ((fast, fast_net), (plain, plain_net)):
            for p, grad in zip(net.parameters(), grads):
                p.grad = grad.clone()
            for group in opt.param_groups:  # warmup-style per-step lr changes, as the base makes
                group["lr"] = 0.01 * (step + 1) / 15
            opt.step()
    for (k, a), b in zip(fast_net.named_parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_no_fast_kernel_for_integer_or_other_devices() -> None:
    assert kernel_options("Adam", nn.Module()) == {}
    meta = nn.Linear(2, 2, device="meta")
    assert kernel_options("Adam", meta) == {}


# --- a tiny image fit --------------------------------------------------------------------------
def image_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 6, 6, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1, 0, 0] > 0.5).long()
    return (x[:48], y[:48]), (x[48:], y[48:])


def image_fit(tmp_path, name: str, **kw) -> tuple[ClassificationModule, L.Trainer]:
    values = dict(save_dir=str(tmp_path), name=name, batch=8, nbs=16, epochs=2, warmup_epochs=0, lr0=0.02,
                  optimizer="AdamW", num_workers=0, patience=0, plots=False)
    values.update(kw)
    cfg = lt.load_config(values)
    train, val = image_data()
    module = ClassificationModule(small_net(), cfg)
    trainer = lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ArrayDataModule(cfg, train=train, val=val))
    return module, trainer


def assert_same_fit(a: ClassificationModule, b: ClassificationModule, rtol: float, atol: float) -> None:
    for (k, pa), pb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=k)


def test_channels_last_fit_matches_eager(tmp_path) -> None:
    eager, _ = image_fit(tmp_path, "eager")
    cl, _ = image_fit(tmp_path, "cl", channels_last=True)
    assert cl.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_fit(eager, cl, rtol=1e-4, atol=1e-5)
    saved = torch.load(tmp_path / "cl" / "weights" / "last.pt", weights_only=True)["model"]
    assert set(saved) == set(eager.net.state_dict())


@pytest.mark.slow
def test_compile_fit_matches_eager(tmp_path) -> None:
    eager, _ = image_fit(tmp_path, "eager")
    compiled, _ = image_fit(tmp_path, "compiled", compile=True)
    assert compiled.net._compiled_call_impl is not None
    assert_same_fit(eager, compiled, rtol=1e-4, atol=1e-5)
    # Checkpoints and weights files keep the eager key names (no "_orig_mod.").
    saved = torch.load(tmp_path / "compiled" / "weights" / "last.pt", weights_only=True)["model"]
    assert set(saved) == set(eager.net.state_dict())


# --- no host sync per training step ------------------------------------------------------------
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class SyncCounter(L.Callback):
    """Counts tensor -> host conversions made between a training batch's start and its end."""

    def __init__(self) -> None:
        self.active = False
        self.counts: Counter = Counter()

    def on_train_batch_start(self, *args) -> None:
        self.active = True

    def on_train_batch_end(self, *args) -> None:
        self.active = False


def test_training_steps_make_no_host_sync(tmp_path, monkeypatch) -> None:
    counter = SyncCounter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if counter.active:
                counter.counts[(_name, traceback.extract_stack(limit=3)[0].filename)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    cfg = lt.load_config(dict(save_dir=str(tmp_path), batch=8, nbs=16, epochs=1, warmup_epochs=0,
                              optimizer="AdamW", num_workers=0, patience=0, plots=False, ema=True))
    train, val = image_data()
    trainer = lt.build_trainer(cfg, callbacks=[counter], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ClassificationModule(small_net(), cfg), datamodule=ArrayDataModule(cfg, train=train, val=val))
    assert trainer.global_step == 3
    assert not counter.counts, f"host syncs inside training steps: {dict(counter.counts)}"


# --- the in-memory loader against torch's DataLoader -------------------------------------------
def test_in_memory_batches_equal_a_dataloader_with_the_same_order() -> None:
    # A user's DataLoader over a TensorDataset, ordered by torch's DistributedSampler with the same
    # seed (one replica): the same batches, values and dtypes, the short last one included.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 1, 4, 4, generator=g), torch.randint(0, 5, (37,), generator=g)
    loader = InMemoryBatchLoader((x, y), 8, shuffle=True, seed=5)
    sampler = DistributedSampler(range(37), num_replicas=1, rank=0, shuffle=True, seed=5)
    reference = DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ours, theirs = list(loader), list(reference)
        assert len(ours) == len(theirs) == 5
        for (ax, ay), (bx, by) in zip(ours, theirs):
            assert ax.dtype == bx.dtype and ay.dtype == by.dtype
            assert torch.equal(ax, bx) and torch.equal(ay, by)
