"""Quantization: both backends x every calibration method, QAT, state, Q/DQ ONNX, sensitivity, bad input."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightrainer.config import ConfigError, load_config
from lightrainer.datamodules.mnist import read_mnist5k
from lightrainer.modules.blocks import Conv2dWithConstraint, LinearWithConstraint
from lightrainer.quant import (
    backend_of,
    calibrate,
    check_quant_config,
    get_backend,
    iter_quantizers,
    list_backends,
    list_calib_methods,
    load_quantized_state_dict,
    mse_amax,
    quant_sensitivity,
    quantize_model,
    refresh_weight_amax,
    write_sensitivity,
)

BACKENDS = list_backends()
BINS = 256  # entropy costs ~3 s a quantizer at the default 2048 bins


class TinyCNN(nn.Module):
    """3 quantizable layers (few quantizers keep entropy fast); constrained variants included."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = Conv2dWithConstraint(1, 8, 3, padding=1, max_norm=2.0)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = LinearWithConstraint(16 * 4 * 4, 10, max_norm=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="session")
def trained(digits) -> nn.Module:
    """A TinyCNN trained for a few seconds on sklearn digits (about 95% val accuracy)."""
    (x, y), _ = digits
    torch.manual_seed(0)
    net = TinyCNN()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(8):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def batches(x: torch.Tensor, size: int = 100) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def layer_inputs(net: nn.Module, name: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """|input| of a layer of the float net over the calibration batches, flattened."""
    seen = []
    handle = net.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach().abs().flatten()))
    with torch.no_grad():
        for x in xs:
            net(x)
    handle.remove()
    return torch.cat(seen)


def fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list_calib_methods())
def test_ptq_every_backend_and_method(trained, digits, backend: str, method: str) -> None:
    (x_train, _), (x_val, y_val) = digits
    calib = batches(x_train[:400])
    net = quantize_model(copy.deepcopy(trained), backend)
    result = calibrate(net, calib, method, num_bins=BINS)
    assert result.batches == 4 and not result.uncalibrated

    fp32_acc, int8_acc = accuracy(trained, x_val, y_val), accuracy(net, x_val, y_val)
    assert fp32_acc > 0.9
    assert int8_acc > fp32_acc - 0.03

    data = layer_inputs(trained, "conv2", calib)
    amax = net.conv2.input_quantizer.amax.item()
    true_max = data.max().item()
    width = true_max / BINS
    if method == "max":
        assert amax == pytest.approx(true_max, rel=1e-6)
    elif method == "percentile":
        assert abs(amax - torch.quantile(data[:2_000_000], 0.9999).item()) < 2 * width
    elif method == "mse":
        # brute force over the raw data, not the histogram: the error is within 5% of the best
        candidates = torch.linspace(true_max * 128 / BINS, true_max, 200)
        errors = [((fake_quant(data, a) - data) ** 2).sum().item() for a in candidates]
        ours = ((fake_quant(data, torch.tensor(amax)) - data) ** 2).sum().item()
        assert ours <= 1.05 * min(errors)
    else:
        assert 0 < amax <= true_max + width

    # per-channel weight amax (axis 0) = max |w| of each output channel
    w_amax = net.conv1.weight_quantizer.amax
    assert w_amax.shape == (8, 1, 1, 1)
    torch.testing.assert_close(w_amax.flatten(), trained.conv1.weight.abs().amax(dim=(1, 2, 3)))

    # the layer's output is the float op on fake-quantized input and weight (formula written out)
    x = x_val[:16]
    with torch.no_grad():
        h = F.relu(net.conv1(x))
        expected = F.conv2d(
            fake_quant(h, net.conv2.input_quantizer.amax),
            fake_quant(net.conv2.weight, net.conv2.weight_quantizer.amax),
            net.conv2.bias, padding=1,
        )
        torch.testing.assert_close(net.conv2(h), expected, atol=1e-5, rtol=1e-5)


def test_mse_amax_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    data = np.abs(rng.standard_t(3, 100_000))
    hist, edges = np.histogram(data, bins=512, range=(0, data.max()))
    amax = mse_amax(hist, edges)
    candidates = np.linspace(edges[128], data.max(), 400)
    errors = [((np.clip(np.round(data * 127 / a), 0, 127) * a / 127 - data) ** 2).sum() for a in candidates]
    assert abs(amax - candidates[int(np.argmin(errors))]) < 0.03 * data.max()


def test_constrained_layers_keep_their_renorm(trained, digits) -> None:
    net = quantize_model(copy.deepcopy(trained), BACKENDS[0])
    assert isinstance(net.conv1, Conv2dWithConstraint) and isinstance(net.fc, LinearWithConstraint)
    calibrate(net, batches(digits[0][0][:200]), "max")
    with torch.no_grad():
        net.fc.weight.mul_(100)
    net.train()
    net(digits[0][0][:8])
    assert net.fc.weight.norm(dim=1).max().item() <= 2.0 + 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_qat_gradients_reach_weights_and_loss_falls(trained, digits, backend: str) -> None:
    (x, y), _ = digits
    torch.manual_seed(1)
    float_net = TinyCNN()  # untrained: its loss has room to fall
    net = quantize_model(float_net, backend)
    calibrate(net, batches(x[:200]), "max")
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for step in range(60):
        refresh_weight_amax(net)  # as QATCallback does before every batch
        i = (step * 64) % 1280
        loss = F.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in net.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizer_state_survives_save_and_load(trained, digits, tmp_path, backend: str) -> None:
    (x, _), (x_val, _) = digits
    net = quantize_model(copy.deepcopy(trained), backend, keep_float=("fc",))
    calibrate(net, batches(x[:200]), "percentile", num_bins=BINS)
    torch.save({"model": net.state_dict()}, tmp_path / "q.pt")
    state = torch.load(tmp_path / "q.pt", weights_only=True)["model"]
    assert "conv1.input_quantizer._amax" in state and "fc.input_quantizer._amax" not in state

    fresh = quantize_model(TinyCNN(), backend, keep_float=("fc",))
    fresh.load_state_dict(state)
    rebuilt = load_quantized_state_dict(TinyCNN(), state, backend)  # infers which layers were quantized
    with torch.no_grad():
        reference = net.eval()(x_val)
        torch.testing.assert_close(fresh.eval()(x_val), reference)
        torch.testing.assert_close(rebuilt.eval()(x_val), reference)
    assert not any(True for _ in iter_quantizers(rebuilt.fc))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qdq_onnx_matches_fake_quant_in_onnxruntime(trained, digits, tmp_path, backend: str, dynamo: bool) -> None:
    import onnx
    from onnx import numpy_helper

    import onnxruntime as ort

    from lightrainer.export import export_onnx

    (x, _), (x_val, _) = digits
    net = quantize_model(copy.deepcopy(trained), backend)
    calibrate(net, batches(x[:300]), "entropy", num_bins=BINS)
    val = batches(x_val, 97)  # other batch sizes than exported: dynamic batch
    path = export_onnx(net, x_val[:4], tmp_path / "q.onnx", dynamo=dynamo, verify=val, checks=["argmax"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = torch.cat([net.eval()(v) for v in val])
    theirs = torch.cat([torch.from_numpy(session.run(None, {session.get_inputs()[0].name: v.numpy()})[0]) for v in val])
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean().item() >= 0.995
    assert (ours - theirs).abs().max().item() < 0.05

    model = onnx.load(path)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(quantize) == len(dequantize) == 6  # input and weight of each of 3 layers
    per_channel = 0
    for node in quantize:
        zero_point = consts.get(node.input[2]) if node.input[2] in consts else None
        if zero_point is not None:
            assert zero_point.dtype == np.int8 and not zero_point.any()
        per_channel += any(a.name == "axis" for a in node.attribute) and np.asarray(consts.get(node.input[1], 0)).size > 1
    assert per_channel == 3


def test_sensitivity_ranks_badly_scaled_layer_first(trained, digits, tmp_path) -> None:
    (x, _), (x_val, _) = digits
    bad = copy.deepcopy(trained)
    with torch.no_grad():  # same function, but conv2's input gets one channel 1000x larger
        bad.conv1.weight[0] *= 1000
        bad.conv1.bias[0] *= 1000
        bad.conv2.weight[:, 0] /= 1000
    bad.conv1.max_norm = float("inf")
    net = quantize_model(bad, BACKENDS[0])
    calibrate(net, batches(x[:300]), "max")
    rows = quant_sensitivity(net, batches(x_val[:200]))
    assert [r.layer for r in rows][0] == "conv2"
    assert rows[0].output_sqnr_db < rows[-1].output_sqnr_db - 10
    path = write_sensitivity(rows, tmp_path)
    assert path.read_text().splitlines()[1].startswith("1,conv2,")
    assert (tmp_path / "quant_sensitivity.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- bad input
def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="method: 'kl' is not one of entropy, max, percentile, mse"):
        load_config(method="kl")
    net = quantize_model(TinyCNN(), BACKENDS[0])
    with pytest.raises(ConfigError, match="method: 'kl'"):
        calibrate(net, [torch.zeros(1, 1, 8, 8)], "kl")


def test_ptq_and_qat_both_on_and_num_batches_below_one() -> None:
    with pytest.raises(ConfigError, match="ptq and qat are both True"):
        load_config(ptq=True, qat=True)
    with pytest.raises(ConfigError, match="num_batches: must be >= 1"):
        load_config(ptq=True, num_batches=0)
    net = quantize_model(TinyCNN(), BACKENDS[0])
    with pytest.raises(ConfigError, match="num_batches: must be >= 1"):
        calibrate(net, [torch.zeros(1, 1, 8, 8)], "max", num_batches=0)


def test_nothing_to_quantize() -> None:
    with pytest.raises(ConfigError, match="no layer to quantize"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(ConfigError, match="Sequential has no Conv/Linear layer"):
        check_quant_config(load_config(ptq=True), nn.Sequential(nn.ReLU()))
    with pytest.raises(ConfigError, match="keep_float: 'nope' matches no layer"):
        quantize_model(TinyCNN(), keep_float=("nope",))


def test_no_backend_installed(monkeypatch) -> None:
    for name in ("pytorch_quantization", "modelopt", "modelopt.torch", "modelopt.torch.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail, as when not installed
    monkeypatch.setattr("lightrainer.quant.base.dist_version", lambda dist: None)
    with pytest.raises(ConfigError, match=r'none is installed .*pip install "lightrainer\[quant\]"'):
        get_backend("auto")
    with pytest.raises(ConfigError, match=r'modelopt is not usable .*pip install "lightrainer\[quant\]"'):
        get_backend("modelopt")
    with pytest.raises(ConfigError, match="none is installed"):
        check_quant_config(load_config(qat=True), TinyCNN())


def test_placeholder_pytorch_quantization_2_2(tmp_path, monkeypatch) -> None:
    # A real distribution on sys.path, as `pip install pytorch-quantization` (2.2.x) leaves it.
    info = tmp_path / "pytorch_quantization-2.2.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytorch-quantization\nVersion: 2.2.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"pytorch-quantization 2\.2\.1 is a placeholder.*pytorch-quantization==2\.1\.3"):
        get_backend("pytorch_quantization")
    for name in MODELOPT_MODULES:  # auto reaches pytorch-quantization only without ModelOpt
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match="placeholder"):
        get_backend("auto")


MODELOPT_MODULES = ("modelopt", "modelopt.torch", "modelopt.torch.quantization")


def test_auto_prefers_modelopt_then_pytorch_quantization(monkeypatch) -> None:
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("pytorch_quantization")
    assert list_backends()[:2] == ["modelopt", "pytorch_quantization"]
    assert get_backend("auto").name == "modelopt"
    assert backend_of(quantize_model(TinyCNN())).name == "modelopt"
    for name in MODELOPT_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    assert get_backend("auto").name == "pytorch_quantization"
    assert backend_of(quantize_model(TinyCNN())).name == "pytorch_quantization"


# ----------------------------------------------------------------------------- callbacks in a real fit
@pytest.fixture
def digits_fit(tmp_path):
    import lightrainer as lt
    from lightrainer.datamodules import DigitsDataModule
    from lightrainer.modules import ClassificationModule

    def fit(**keys):
        cfg = lt.load_config(
            dict(epochs=2, batch=64, num_workers=0, save_dir=str(tmp_path), plots=False, warmup_epochs=0,
                 lr0=0.003, optimizer="AdamW", num_batches=3, method="percentile", **keys)
        )
        torch.manual_seed(0)
        module = ClassificationModule(TinyCNN(), cfg)
        trainer = lt.build_trainer(cfg, enable_progress_bar=False, logger=False, limit_train_batches=6)
        trainer.fit(module, datamodule=DigitsDataModule(cfg))
        return cfg, module, trainer

    return fit


def test_ptq_callback_writes_results(digits_fit) -> None:
    from pathlib import Path

    cfg, module, trainer = digits_fit(ptq=True)
    run = Path(cfg.run_dir)
    for name in ("ptq_results.csv", "ptq_results.md", "quant_sensitivity.csv", "weights/best_int8.pt", "weights/best_int8.onnx"):
        assert (run / name).is_file(), name
    table = (run / "ptq_results.md").read_text()
    assert "val/acc" in table and "val/loss" in table
    saved = torch.load(run / "weights" / "best_int8.pt", weights_only=True)
    assert "conv1.input_quantizer._amax" in saved["model"]


def test_qat_callback_trains_at_a_tenth_and_resumes_with_amax(digits_fit) -> None:
    from pathlib import Path

    cfg, module, trainer = digits_fit(qat=True)
    assert module.lr_scale == pytest.approx(0.1)
    assert any(True for _ in iter_quantizers(module.net))
    run = Path(cfg.run_dir)
    assert (run / "weights" / "best_int8.onnx").is_file()
    ckpt = torch.load(run / "weights" / "last.ckpt", map_location="cpu", weights_only=False)
    amax = ckpt["state_dict"]["net.conv2.input_quantizer._amax"]

    import lightrainer as lt
    from lightrainer.datamodules import DigitsDataModule
    from lightrainer.modules import ClassificationModule

    resumed_cfg = cfg.replace(epochs=3, exist_ok=True)
    resumed = ClassificationModule(TinyCNN(), resumed_cfg)
    trainer = lt.build_trainer(resumed_cfg, enable_progress_bar=False, logger=False, limit_train_batches=2)
    trainer.fit(resumed, datamodule=DigitsDataModule(resumed_cfg), ckpt_path=str(run / "weights" / "last.ckpt"))
    assert resumed.net.conv2.input_quantizer.amax.item() == pytest.approx(amax.item())


def test_entropy_keeps_the_range_of_few_level_inputs(digits) -> None:
    # digits pixels take 17 values: KL divergence would pick the first level and clip the rest
    (x, _), _ = digits
    net = quantize_model(TinyCNN(), BACKENDS[0])
    calibrate(net, batches(x[:300]), "entropy", num_bins=BINS)
    assert net.conv1.input_quantizer.amax.item() == pytest.approx(x[:300].max().item(), rel=1e-6)


def test_ptq_of_the_vqvae_task(tmp_path) -> None:
    import json

    import lightrainer as lt
    from lightrainer.datamodules import ArrayDataModule
    from lightrainer.export import qdq_layers
    from lightrainer.modules.vqvae import VQVAEModule
    from lightrainer.modules.vqvae_net import VQVAE
    from lightrainer.export import export_int8
    from lightrainer.quant import post_training_quantize

    cfg = lt.load_config(dict(save_dir=str(tmp_path), batch=4, num_workers=0, plots=False, method="max",
                              num_batches=2, lpips_weight=0))
    torch.manual_seed(0)
    net = VQVAE(in_channels=1, channels=8, num_res_blocks=1, downsample=2, codebook_size=16, code_dim=4)
    images = torch.rand(12, 1, 8, 8)
    net.train()
    net(images)  # codebook initialised from encoder outputs
    module = VQVAEModule(net.eval(), cfg)
    dm = ArrayDataModule(cfg, train=(images[:8],), val=(images[8:],))
    result = post_training_quantize(module, dm.train_dataloader(), dm.val_dataloader(), cfg, tmp_path,
                                    exporter=export_int8)
    assert result.calibration.batches == 2 and set(result.int8) == set(result.fp32)
    assert abs(result.int8["val/psnr"] - result.fp32["val/psnr"]) < 1.0
    onnx_path = tmp_path / "weights" / "best_int8.onnx"
    convs = [l for l in qdq_layers(onnx_path) if l.op_type == "Conv"]  # the codebook's MatMul stays float
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert all(l.quantized and l.per_channel and l.symmetric_int8 for l in convs)
    report = json.loads((tmp_path / "weights" / "best_int8.onnx.verify.json").read_text())
    assert report["passed"] and report["qdq"] and result.onnx["max_abs_diff"] == report["outputs"][0]["max_abs_diff"]


def test_entropy_keeps_the_range_of_spiky_inputs() -> None:
    # Real normalised MNIST pixels: ~80% are the background value -0.4242, a spike that used to
    # make KL divergence clip every stroke (amax 0.424; MNIST accuracy 98.5% -> 24.8%).
    images, _ = read_mnist5k()
    x = (torch.tensor(images[::10], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255 - 0.1307) / 0.3081
    net = quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3)), BACKENDS[0])
    calibrate(net, batches(x, 100), "entropy")
    amax = net[0].input_quantizer.amax.item()
    clipped = (x.abs() > amax).float().mean().item()  # the fraction of pixels int8 would clip
    assert clipped < 0.01 and amax > 0.9 * x.abs().max().item()
