"""Export of a run: the callback at the end of fit, export_from_weights, bad weights files."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lightrainer as lt
from lightrainer.datamodules import ArrayDataModule
from lightrainer.export import (
    FORMATS,
    ExportError,
    ExportFormat,
    MissingDependencyError,
    register_format,
    apply_weights,
    benchmark_from_weights,
    export_from_weights,
    load_weights,
    read_metadata,
)
from lightrainer.modules import ClassificationModule
from lightrainer.modules.nets import SmallCNN
from lightrainer.modules.vqvae_net import VQVAE


def _cfg(tmp_path, **kw) -> lt.Config:
    values = dict(save_dir=str(tmp_path), name="run", batch=16, epochs=1, num_workers=0, patience=0, plots=False,
                  warmup_epochs=0, lr0=0.01)
    values.update(kw)
    return lt.load_config(values)


def _data(n: int = 48) -> tuple:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.2
    for i, label in enumerate(y):  # a visible class pattern: a bright quadrant
        r, c = divmod(int(label), 2)
        x[i, 0, r * 6:(r + 1) * 6, c * 6:(c + 1) * 6] += 0.8
    return x, y


def _module(cfg) -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule(SmallCNN(num_classes=4, width=4), cfg)


def _datamodule(cfg) -> ArrayDataModule:
    x, y = _data()
    return ArrayDataModule(cfg, train=(x[:32], y[:32]), val=(x[32:], y[32:]), class_names=["a", "b", "c", "d"])


def test_callback_exports_best_weights_after_fit(tmp_path):
    cfg = _cfg(tmp_path, export="onnx")
    module, datamodule = _module(cfg), _datamodule(cfg)
    trainer = lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    weights = tmp_path / "run" / "weights"
    onnx_path = weights / "best.onnx"
    assert onnx_path.is_file()
    report = json.loads((weights / "best.onnx.verify.json").read_text())
    assert report["passed"] and report["samples"] == 16
    assert report["outputs"][0]["max_abs_diff"] < 1e-4 and report["outputs"][0]["agreement"] == 1.0
    meta = read_metadata(onnx_path)
    assert meta["task"] == "classification" and json.loads(meta["num_classes"]) == 4
    assert json.loads(meta["class_names"]) == ["a", "b", "c", "d"]
    assert json.loads(meta["mean"]) == [0.0] and json.loads(meta["std"]) == [1.0]
    assert "lr0: 0.01" in meta["config"] and meta["output_names"] == '["logits"]'
    # the file holds the best weights: ORT on the val split against a network loaded from best.pt
    net = SmallCNN(num_classes=4, width=4).eval()
    net.load_state_dict(torch.load(weights / "best.pt", weights_only=True)["model"])
    x, _ = _data()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x[32:].numpy()})
    with torch.no_grad():
        assert np.abs(got - net(x[32:]).numpy()).max() < 1e-4


def test_callback_checks_tensorrt_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    # Refused by build_trainer, before the run folder exists (the format's registered check).
    for name, key in (("run", {"export": "engine"}), ("q", {"trt_quant": True})):
        with pytest.raises(MissingDependencyError, match="needs TensorRT"):
            lt.build_trainer(_cfg(tmp_path, name=name, **key), enable_progress_bar=False)
        assert not (tmp_path / name).exists()
    # trt_quant alone runs PTQ after fit (no ptq/qat needed); what PTQ needs of the network is
    # checked when the fit starts (with an engine format that needs nothing, that check fails).
    engine = FORMATS.get("engine")
    register_format("engine", ExportFormat(check=None, build=engine.build), override=True)
    try:
        cfg = _cfg(tmp_path, name="q2", trt_quant=True)
        no_layers = ClassificationModule(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                                             torch.nn.BatchNorm1d(4)), cfg, num_classes=4)
        trainer = lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises(lt.ConfigError, match="ptq: Sequential has no Conv/Linear layer to quantize"):
            trainer.fit(no_layers, datamodule=_datamodule(cfg))
        assert trainer.global_step == 0 and not (tmp_path / "q2").exists()  # failed before a file: removed
    finally:
        register_format("engine", engine, override=True)


def _saved_weights(tmp_path, module, **extra):
    path = tmp_path / "weights" / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "best_fitness": 0.9, "model": module.net.state_dict(),
                "config": module.cfg.to_dict(), **extra}, path)
    return path


def test_export_from_weights_onnx_and_engine_without_tensorrt(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    source = _module(cfg)
    weights = _saved_weights(tmp_path, source)
    module = ClassificationModule(SmallCNN(num_classes=4, width=4), cfg)  # fresh weights, replaced by the file
    result = export_from_weights(module, _datamodule(cfg), cfg, weights, "ONNX")
    assert result.onnx == [tmp_path / "weights" / "best.onnx"] and result.engine is None
    assert torch.equal(module.net.head.weight, source.net.head.weight)
    assert json.loads(read_metadata(result.onnx[0])["weights_epoch"]) == 3

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    result.onnx[0].unlink()
    with pytest.raises(MissingDependencyError, match='needs TensorRT.*lightrainer\\[trt\\]'):
        export_from_weights(module, _datamodule(cfg), cfg, weights, "engine")
    assert not (tmp_path / "weights" / "best.onnx").exists()  # checked before any work


def test_unknown_format(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ExportError, match="format: 'tflite' is not one of onnx, engine: use --format onnx"):
        export_from_weights(_module(cfg), None, cfg, tmp_path / "best.pt", "tflite")


def test_bad_weights_files(tmp_path):
    with pytest.raises(ExportError, match="weights file not found: .*nope.pt: pass a run's weights/best.pt"):
        load_weights(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(ExportError, match="junk.pt is not a lightrainer weights file \\(torch.load failed"):
        load_weights(junk)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ExportError, match="not a lightrainer checkpoint: .*found Tensor"):
        load_weights(tensor)
    no_model = tmp_path / "no_model.pt"
    torch.save({"epoch": 1, "state_dict": {}}, no_model)
    with pytest.raises(ExportError, match=r"found a dict with keys \['epoch', 'state_dict'\]"):
        load_weights(no_model)


def test_weights_of_another_model_are_listed(tmp_path):
    cfg = _cfg(tmp_path)
    wide = ClassificationModule(SmallCNN(num_classes=4, width=8), cfg)
    weights = _saved_weights(tmp_path, wide)
    narrow = _module(cfg)
    with pytest.raises(ExportError, match=r"saved by a different model than SmallCNN: shape mismatches "
                                          r"\(file vs network\) \(\d+\): features\.0\.conv\.weight: \(8, 1, 3, 3\) vs \(4, 1, 3, 3\)"):
        export_from_weights(narrow, _datamodule(cfg), cfg, weights)
    vq = VQVAE(in_channels=1, channels=8, num_res_blocks=0, downsample=2, codebook_size=4, code_dim=2)
    with pytest.raises(ExportError, match=r"missing keys \(\d+\): encoder\.0\.weight.* \.\.\.; unexpected keys"):
        apply_weights(vq, load_weights(weights)["model"], weights)
    assert not list((tmp_path / "weights").glob("*.onnx"))


def test_benchmark_from_weights_writes_table(tmp_path):
    cfg = _cfg(tmp_path)
    weights = _saved_weights(tmp_path, _module(cfg))
    rows = benchmark_from_weights(_module(cfg), _datamodule(cfg), cfg, weights, repeats=3, warmup=1,
                                  out_dir=tmp_path / "bench")
    assert {(r.backend, r.batch) for r in rows} == {
        (b, n) for b in ("pytorch-eager", "onnxruntime-fp32", "onnxruntime-qdq", "tensorrt") for n in (1, 16)
    }
    assert all(r.median_ms > 0 for r in rows if r.backend in ("pytorch-eager", "onnxruntime-fp32"))
    assert all(r.median_ms is None and r.note for r in rows if r.backend in ("onnxruntime-qdq", "tensorrt"))
    table = (tmp_path / "bench" / "latency.md").read_text()
    assert table.startswith("| backend | batch | median ms |") and "onnxruntime-fp32 | 16 |" in table
    csv_lines = (tmp_path / "bench" / "latency.csv").read_text().splitlines()
    assert csv_lines[0] == "backend,batch,median_ms,ms_per_sample,samples_per_s,note" and len(csv_lines) == 9


def test_vqvae_exports_whole_encoder_and_decoder(tmp_path):
    from lightrainer.modules.vqvae import VQVAEModule

    cfg = _cfg(tmp_path, batch=4)
    torch.manual_seed(0)
    net = VQVAE(in_channels=1, channels=8, num_res_blocks=1, downsample=2, codebook_size=16, code_dim=4)
    images = torch.rand(12, 1, 8, 8)
    net.train()
    net(images)  # codebook initialised from encoder outputs
    module = VQVAEModule(net.eval(), cfg)
    weights = _saved_weights(tmp_path, module)
    datamodule = ArrayDataModule(cfg, train=(images[:8],), val=(images[8:],))
    result = export_from_weights(module, datamodule, cfg, weights)
    names = [p.name for p in result.onnx]
    assert names == ["best.onnx", "best.encoder.onnx", "best.decoder.onnx"]
    for path in result.onnx:
        assert json.loads((path.parent / (path.name + ".verify.json")).read_text())["passed"]
    assert read_metadata(result.onnx[0])["task"] == "vqvae"
    assert read_metadata(result.onnx[0])["output_names"] == '["reconstruction"]'
    assert read_metadata(result.onnx[1])["part"] == "encoder"


def test_int8_of_a_float_network_runs_ptq_first(tmp_path):
    # What trt_quant without ptq/qat does before building the engine: PTQ (the config's method and
    # num_batches on the training batches), then a verified Q/DQ export.
    from lightrainer.export import qdq_layers

    cfg = _cfg(tmp_path, method="max", num_batches=2)
    weights = _saved_weights(tmp_path, _module(cfg))
    module = _module(cfg)
    result = export_from_weights(module, _datamodule(cfg), cfg, weights, "onnx", int8=True)
    assert [p.name for p in result.onnx] == ["best.onnx", "best_int8.onnx"]
    assert not qdq_layers(result.onnx[0])[0].quantized  # the float model stays float
    layers = qdq_layers(result.onnx[1])
    assert len(layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.net.modules())
    assert all(l.quantized and l.per_channel and l.symmetric_int8 for l in layers)
    report = json.loads((tmp_path / "weights" / "best_int8.onnx.verify.json").read_text())
    assert report["passed"] and report["qdq"] and report["samples"] == 16
    assert read_metadata(result.onnx[1])["quantized"] == "int8"
    from lightrainer.quant import iter_quantizers

    assert not any(True for _ in iter_quantizers(module.net))


def test_max_norm_layers_are_projected_before_export(tmp_path):
    from lightrainer.modules.blocks import Conv2dWithConstraint, LinearWithConstraint
    from lightrainer.export import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv2dWithConstraint(1, 4, 3, max_norm=0.5), torch.nn.Flatten(),
                              LinearWithConstraint(4 * 6 * 6, 3, max_norm=0.25))
    with torch.no_grad():  # an optimizer step moved the weights out of the ball
        net[0].weight.mul_(20)
        net[2].weight.mul_(20)
    x = torch.randn(5, 1, 8, 8)
    path = export_onnx(net, x, tmp_path / "c.onnx", verify=[x])
    from onnx import load, numpy_helper

    weights = [numpy_helper.to_array(t) for t in load(str(path)).graph.initializer if len(t.dims) in (2, 4)]
    for w, bound in zip(sorted(weights, key=lambda w: w.ndim, reverse=True), (0.5, 0.25)):
        norms = np.sqrt((w.reshape(w.shape[0], -1).astype(np.float64) ** 2).sum(1))
        assert norms.max() <= bound * (1 + 1e-5)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        w0 = net[0].weight.double()
        w0 = w0 * torch.clamp(0.5 / w0.flatten(1).norm(dim=1), max=1).view(-1, 1, 1, 1)
        h = torch.nn.functional.conv2d(x.double(), w0, net[0].bias.double()).flatten(1)
        w2 = net[2].weight.double()
        w2 = w2 * torch.clamp(0.25 / w2.norm(dim=1), max=1).view(-1, 1)
        ref = h @ w2.T + net[2].bias.double()
    assert np.abs(got - ref.numpy()).max() < 1e-4


class TwoHeads(torch.nn.Module):
    """Returns (scores, features); ``head`` maps features to scores."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 8), torch.nn.ReLU())
        self.cls = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.cls(features), features

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.cls(features)


def _step(self, batch, stage):
    x, y = batch
    return torch.nn.functional.cross_entropy(self.net(x)[0], y), {}


def test_a_tasks_own_export_spec_decides_the_files(tmp_path):
    # Generic export reads the declaration: graphs, names, tuple outputs, a part fed by another, checks.
    from lightrainer.registry import TASKS
    from lightrainer.task import ExportOutput, ExportPart, ExportSpec

    spec = ExportSpec(parts=(
        ExportPart(input_name="pixels", outputs=(ExportOutput("features"), ExportOutput("scores", "argmax")),
                   select=(1, 0)),
        ExportPart(".head", "head", "features", (ExportOutput("scores", "argmax"),), input_from=""),
    ))
    TwoHeadTask = type("TwoHeadTask", (lt.LightrainerModule,), {"export_spec": spec, "step": _step})
    try:
        cfg = lt.load_config(dict(save_dir=str(tmp_path), batch=8, num_workers=0, plots=False), task_class=TwoHeadTask)
        torch.manual_seed(0)
        module = TwoHeadTask(TwoHeads(), cfg)
        weights = _saved_weights(tmp_path, module)
        result = export_from_weights(module, _datamodule(cfg), cfg, weights)
    finally:
        TASKS.unregister("twoheadtask")
    assert [p.name for p in result.onnx] == ["best.onnx", "best.head.onnx"]
    whole, head = (read_metadata(p) for p in result.onnx)
    assert whole["task"] == "twoheadtask" and "part" not in whole and head["part"] == "head"
    assert json.loads(whole["export_checks"]) == ["tolerance", "argmax"] and json.loads(head["export_checks"]) == ["argmax"]
    report = json.loads((tmp_path / "weights" / "best.head.onnx.verify.json").read_text())
    assert report["passed"] and report["outputs"][0]["check"] == "argmax" and report["outputs"][0]["agreement"] == 1.0
    x, _ = _data()
    (features, scores) = ort.InferenceSession(str(result.onnx[0]), providers=["CPUExecutionProvider"]).run(
        None, {"pixels": x[32:].numpy()})
    (head_scores,) = ort.InferenceSession(str(result.onnx[1]), providers=["CPUExecutionProvider"]).run(
        None, {"features": features})
    with torch.no_grad():
        w1, b1 = module.net.body[1].weight.double(), module.net.body[1].bias.double()
        w2, b2 = module.net.cls.weight.double(), module.net.cls.bias.double()
        ref_features = torch.relu(x[32:].flatten(1).double() @ w1.T + b1)
        ref_scores = ref_features @ w2.T + b2
    assert np.abs(features - ref_features.numpy()).max() < 1e-5
    assert np.abs(scores - ref_scores.numpy()).max() < 1e-5 and np.abs(head_scores - ref_scores.numpy()).max() < 1e-5


def test_a_task_declaring_nothing_exports_input_and_output(tmp_path):
    from lightrainer.registry import TASKS

    Plain = type("PlainTask", (lt.LightrainerModule,), {"step": lambda self, batch, stage: (self.net(batch[0]).sum(), {})})
    try:
        cfg = lt.load_config(dict(save_dir=str(tmp_path), batch=8, num_workers=0, plots=False), task_class=Plain)
        module = Plain(SmallCNN(num_classes=4, width=4), cfg)
        result = export_from_weights(module, _datamodule(cfg), cfg, _saved_weights(tmp_path, module))
    finally:
        TASKS.unregister("plaintask")
    (path,) = result.onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    assert json.loads(read_metadata(path)["export_checks"]) == ["tolerance"]


def test_a_part_fed_by_no_earlier_part_is_refused(tmp_path):
    from lightrainer.export import export_parts
    from lightrainer.task import ExportOutput, ExportPart, ExportSpec

    spec = ExportSpec(parts=(ExportPart(".head", "head", "features", (ExportOutput("scores"),), input_from=".body"),))
    with pytest.raises(ExportError, match=r"part '\.head' takes its input from part '\.body', which is not an earlier "
                                          r"part \(earlier: none\)"):
        export_parts(TwoHeads(), spec, [torch.rand(2, 1, 12, 12)], tmp_path / "m.onnx", {})
    assert not list(tmp_path.iterdir())
