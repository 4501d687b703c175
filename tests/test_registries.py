"""Every registry, tested over its live entries; and entries registered from outside the package
(an optimizer, a calibration method, a backend) work from a config exactly like the built-in ones.

A new built-in entry is covered by these tests by registering it: nothing here lists the names.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightrainer as lt
from lightrainer.datamodules import ArrayDataModule
from lightrainer.errors import ConfigError
from lightrainer.export import ExportError, MissingDependencyError, check_format, register_format
from lightrainer.export.pipeline import ExportFormat
from lightrainer.modules import ClassificationModule
from lightrainer.optim import build_optimizer, register_optimizer, schedule
from lightrainer.quant import (
    CalibMethod,
    QuantBackend,
    calibrate,
    get_backend,
    is_quantized_state_dict,
    iter_quantizers,
    list_backends,
    post_training_quantize,
    quantize_model,
    register_backend,
    register_calib_method,
)
from lightrainer.quant.base import is_weight_quantizer
from lightrainer.registry import (
    CALIBRATION_METHODS,
    EXPORT_FORMATS,
    OPTIMIZERS,
    QUANT_BACKENDS,
    SCHEDULES,
    TASKS,
)
from lightrainer.task import MODES, ExportSpec, TaskKey, export_spec_of, metric_modes_of, resolve_fitness, task_keys_of


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def tiny_batches(n: int = 4, batch: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 2, 8, 8, generator=g) for _ in range(n)]


def installed_backends() -> list[str]:
    found = []
    for name in list_backends():
        try:
            get_backend(name)
        except ConfigError:
            continue
        found.append(name)
    return found


def needs_a_backend() -> str:
    try:
        return get_backend("auto").name
    except ConfigError as err:
        pytest.skip(f"no quantization backend installed: {err}")


@pytest.fixture
def cleanup():
    """Registrations a test makes, undone after it: ``cleanup.append((REGISTRY, name))``."""
    made: list[tuple[Any, str]] = []
    yield made
    for registry, name in made:
        registry.unregister(name)


# ----------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_builds_and_steps(name: str) -> None:
    cfg = lt.load_config({"optimizer": name, "lr0": 0.01, "momentum": 0.9, "weight_decay": 0.0005})
    net = tiny_net()
    optimizer = build_optimizer(net, cfg)
    assert [g["name"] for g in optimizer.param_groups] == ["bias", "no_decay", "embedding", "decay"]
    assert all(g["lr"] == g["initial_lr"] == 0.01 for g in optimizer.param_groups)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = tiny_batches(1)[0], torch.arange(16) % 3
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(net(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- lr schedules
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_starts_at_one_and_decays_to_lrf(name: str) -> None:
    # gamma**epochs ~ 1e-31: the exponential schedule, too, has reached its floor lrf at the end.
    cfg = lt.load_config({"scheduler": name, "epochs": 100, "lrf": 0.05, "gamma": 0.5, "power": 2.0})
    lf = schedule(cfg)
    values = [lf(epoch) for epoch in range(cfg.epochs + 1)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(cfg.lrf, abs=1e-9)
    assert all(cfg.lrf - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))  # never rises


# ----------------------------------------------------------------------------- calibration methods
@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize("method", CALIBRATION_METHODS.names())
def test_every_calibration_method_calibrates_a_tiny_net(method: str, backend: str) -> None:
    if backend not in installed_backends():
        pytest.skip(f"quantization backend {backend} is not installed")
    float_net = tiny_net().eval()
    batches = tiny_batches()
    qnet = quantize_model(copy.deepcopy(float_net), backend)
    result = calibrate(qnet, batches, method, num_batches=3, num_bins=256)  # few bins: entropy is slow at 2048
    assert result.method == method and result.batches == 3 and not result.uncalibrated
    # What each layer saw during calibration, computed on the float network.
    seen = torch.cat(batches[:3])
    layer_inputs = {"0": seen, "3": torch.relu(float_net[0](seen)).flatten(1)}
    quantizers = dict(iter_quantizers(qnet))
    assert len(quantizers) == 4
    with torch.no_grad():
        for name, quantizer in quantizers.items():
            layer = name.rsplit(".", 1)[0]
            amax = quantizer._amax.detach().flatten()
            if is_weight_quantizer(name):  # per output channel: the max |w|
                weight = float_net.get_submodule(layer).weight
                torch.testing.assert_close(amax, weight.abs().flatten(1).amax(1))
            else:  # a clipping range inside what the layer saw
                top = layer_inputs[layer].abs().max().item()
                assert amax.numel() == 1 and 0 < amax.item() <= top * 1.01, (name, amax.item(), top)
        x = batches[3]
        float_out, quant_out = float_net(x), qnet.eval()(x)
    assert (quant_out - float_out).abs().max() <= 0.2 * float_out.abs().max()


def test_a_new_calibration_method_from_a_config_sets_the_quantizers(tmp_path, cleanup) -> None:
    needs_a_backend()

    def half_max(quantizer: nn.Module, percentile: float) -> torch.Tensor:
        return quantizer._calibrator.compute_amax() * 0.5

    register_calib_method("half_max", CalibMethod("max", half_max))
    cleanup.append((CALIBRATION_METHODS, "half_max"))
    cfg = lt.load_config({"method": "half_max", "num_batches": 2, "save_dir": str(tmp_path), "plots": False,
                          "batch": 16, "num_workers": 0})
    assert cfg.method == "half_max"
    net = tiny_net()
    module = ClassificationModule(net, cfg, num_classes=3)
    batches = tiny_batches(4)
    labels = [torch.arange(16) % 3 for _ in batches]
    train = list(zip(batches, labels))
    result = post_training_quantize(module, train, train[:1], cfg, tmp_path, sensitivity=False)
    assert result.method == "half_max" and result.calibration.batches == 2
    saved = torch.load(tmp_path / "weights" / "best_int8.pt", weights_only=True)
    assert saved["quant"]["method"] == "half_max" and is_quantized_state_dict(saved["model"])
    # Independently: half the largest |input| each layer met on the two calibration batches.
    seen = torch.cat(batches[:2])
    with torch.no_grad():
        expected = {"0": 0.5 * seen.abs().max().item(),
                    "3": 0.5 * torch.relu(net[0](seen)).abs().max().item()}
    got = {key.split(".", 1)[0]: value.item() for key, value in saved["model"].items()
           if key.endswith("._amax") and not is_weight_quantizer(key.rsplit(".", 1)[0])}
    assert got == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- quantization backends
class FakeBackend(QuantBackend):
    """A backend whose library is not installed here."""

    name = "fake_int8"
    module = "lightrainer_fake_int8_library"

    def make_quantizer(self, axis: int | None) -> nn.Module:
        raise NotImplementedError

    def make_calibrator(self, kind: str, axis: int | None, num_bins: int) -> Any:
        raise NotImplementedError


def test_a_new_backend_does_not_hide_the_built_in_ones(cleanup) -> None:
    before = list_backends()
    auto_before = installed_backends()[:1]
    register_backend(FakeBackend())
    cleanup.append((QUANT_BACKENDS, FakeBackend.name))
    assert list_backends() == [*before, "fake_int8"]  # built-ins first: "auto" still prefers them
    assert installed_backends()[:1] == auto_before
    if auto_before:
        assert get_backend("auto").name == auto_before[0]
    with pytest.raises(ConfigError, match=r"quant_backend: fake_int8 is not installed .*pip install"):
        get_backend("fake_int8")
    assert lt.load_config({"quant_backend": "fake_int8"}).quant_backend == "fake_int8"
    clash = FakeBackend()
    clash.name = before[0]
    with pytest.raises(ValueError, match="already registered; pass override=True"):
        register_backend(clash)
    assert list_backends() == [*before, "fake_int8"]


# ----------------------------------------------------------------------------- export formats
@pytest.mark.parametrize("name", EXPORT_FORMATS.names())
def test_every_export_format_checks_in_one_line(name: str) -> None:
    fmt = EXPORT_FORMATS.get(name)
    assert isinstance(fmt, ExportFormat)
    assert fmt.check is None or callable(fmt.check)
    assert fmt.build is None or callable(fmt.build)
    assert check_format(name.upper()) == name
    if fmt.check is not None:
        try:
            fmt.check()
        except MissingDependencyError as err:  # absent here: one line saying what to install or get
            assert str(err).strip() and "\n" not in str(err).strip()


def test_an_unknown_format_names_the_choices(cleanup) -> None:
    register_format("fakefmt", ExportFormat())
    cleanup.append((EXPORT_FORMATS, "fakefmt"))
    with pytest.raises(ExportError, match=r"format: 'tflite' is not one of") as info:
        check_format("tflite")
    assert all(name in str(info.value) for name in EXPORT_FORMATS.names()) and "fakefmt" in str(info.value)


# ----------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_declares_itself(name: str) -> None:
    if name not in TASKS:
        pytest.skip(f"task {name} was unregistered by another test")
    cls = TASKS.get(name)
    modes = metric_modes_of(cls)
    assert modes and set(modes.values()) <= set(MODES)
    metric, mode = resolve_fitness(cls, None)
    assert metric.startswith("val/") and modes[metric.split("/", 1)[1]] == mode
    spec = cls.export_spec
    assert isinstance(spec, ExportSpec) and export_spec_of(cls) is spec and spec.parts
    suffixes: list[str] = []
    for part in spec.parts:
        assert part.suffix not in suffixes and part.outputs
        assert part.input_from is None or part.input_from in suffixes  # fed by an earlier part
        assert part.select is None or len(part.select) == len(part.outputs)
        suffixes.append(part.suffix)
    keys = task_keys_of(cls)
    for key, spec_key in keys.items():
        assert isinstance(spec_key, TaskKey)
        numeric = spec_key.type is float and isinstance(spec_key.default, int) and not isinstance(spec_key.default, bool)
        if spec_key.default is None:
            continue  # an optional key (e.g. net: None = the task's default network)
        assert isinstance(spec_key.default, spec_key.type) or numeric, key
        if spec_key.check is not None:
            spec_key.check(key, spec_key.default)
    cfg = lt.load_config(task_class=cls)
    assert {key: cfg.extra(key) for key in keys} == {key: k.default for key, k in keys.items()}


# ----------------------------------------------------------------------------- an optimizer from outside
class PlainSGD(torch.optim.SGD):
    """SGD without Nesterov: an optimizer a user registers from their own module."""


def _plain_sgd(groups: list[dict], lr: float, momentum: float, **kernel: Any) -> torch.optim.Optimizer:
    return PlainSGD(groups, lr=lr, momentum=momentum, nesterov=False, weight_decay=0.0, **kernel)


def test_a_new_optimizer_trains_from_a_config(tmp_path, cleanup) -> None:
    register_optimizer("PlainSGD", _plain_sgd)
    cleanup.append((OPTIMIZERS, "PlainSGD"))

    class TinyTask(lt.LightrainerModule):
        def step(self, batch: Any, stage: str) -> Any:
            x, y = batch
            return F.cross_entropy(self.net(x), y), {}

    cleanup.append((TASKS, "tinytask"))
    cfg = lt.load_config(
        {"optimizer": "plainsgd", "lr0": 0.02, "momentum": 0.8, "epochs": 1, "batch": 16, "nbs": 16,
         "warmup_epochs": 0, "save_dir": str(tmp_path), "num_workers": 0, "plots": False},
        task_class=TinyTask,
    )
    assert cfg.optimizer == "PlainSGD"  # the registered spelling
    x = torch.cat(tiny_batches(4))
    y = torch.arange(len(x)) % 3
    module = TinyTask(tiny_net(), cfg)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = lt.build_trainer(cfg, limit_train_batches=3, limit_val_batches=1, enable_progress_bar=False,
                               enable_model_summary=False, logger=False)
    trainer.fit(module, datamodule=ArrayDataModule(cfg, train=(x, y), val=(x[:16], y[:16])))
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is PlainSGD
    assert optimizer.defaults["nesterov"] is False and optimizer.defaults["momentum"] == 0.8
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.02] * 4
    assert trainer.global_step == 3
    assert all(not torch.equal(a, b.detach().cpu()) for a, b in zip(before, module.net.parameters()))
    assert [p.name for p in tmp_path.rglob("best.pt")] == ["best.pt"]
