"""PTQ per calibration method vs FP32, calibration time, QAT, and Q/DQ ONNX agreement in ONNX Runtime.

    python benchmarks/quant_ptq_qat.py --config configs/mnist.yaml            # the issue's targets
    python benchmarks/quant_ptq_qat.py --config configs/digits.yaml --epochs 3 --qat-epochs 1   # quick

Trains the config's SmallCNN with the engine (FP32), then, on the same weights:
- PTQ with each calibration method on ``--calib-batches`` training batches: val accuracy and
  calibration seconds (targets: int8 within 0.5 points of FP32; max and percentile < 5 s);
- QAT: ``--qat-epochs`` more epochs with ``qat: True`` from the FP32 weights (lr0 * 0.1);
- the Q/DQ ONNX of each in ONNX Runtime vs PyTorch fake-quant on the whole val split
  (argmax agreement >= 99.5%, max abs diff).
Prints a table and writes it to <run>/quant_benchmark.md. One torch thread (timings on 2 shared cores).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import torch

import lightrainer as lt
from lightrainer.datamodules import DigitsDataModule, MNIST5kDataModule
from lightrainer.modules import ClassificationModule
from lightrainer.modules.nets import SmallCNN
from lightrainer.export import export_onnx
from lightrainer.export.verify import load_report
from lightrainer.quant import calibrate, evaluate, list_calib_methods, quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="FP32 epochs (default: the config's)")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=20)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)

    overrides = {"save_dir": args.save_dir or tempfile.mkdtemp(prefix="quant_bench_"), "quant_backend": args.backend}
    if args.epochs:
        overrides["epochs"] = args.epochs
    cfg = lt.load_config(args.config, **overrides)
    data_cls = DigitsDataModule if "digits" in Path(args.config).name else MNIST5kDataModule
    datamodule = data_cls(cfg)

    started = time.perf_counter()
    module = ClassificationModule(SmallCNN(num_classes=10), cfg)
    lt.build_trainer(cfg, enable_progress_bar=False).fit(module, datamodule=datamodule)
    best = torch.load(Path(cfg.run_dir) / "weights" / "best.pt", weights_only=True)["model"]
    module.net.load_state_dict(best)
    fp32 = copy.deepcopy(module.net).eval()
    train_s = time.perf_counter() - started
    val = datamodule.val_dataloader()
    val_inputs = [module.example_input(b) for b in val]
    fp32_acc = evaluate(module, fp32, val)["val/acc"]
    rows = [("FP32", fp32_acc, float("nan"), float("nan"), float("nan"))]

    for method in list_calib_methods():
        qnet = quantize_model(copy.deepcopy(fp32), cfg.quant_backend)
        result = calibrate(qnet, datamodule.train_dataloader(), method, num_batches=args.calib_batches,
                           percentile=cfg.percentile, to_input=module.example_input)
        acc = evaluate(module, qnet, val)["val/acc"]
        parity = _onnx_parity(qnet, val_inputs)
        rows.append((f"PTQ {method}", acc, result.seconds, parity["argmax_agreement"], parity["max_abs_diff"]))

    qat_cfg = lt.load_config(args.config, **{**overrides, "epochs": args.qat_epochs, "qat": True,
                                             "warmup_epochs": 0, "name": "qat"})
    qat_module = ClassificationModule(copy.deepcopy(fp32), qat_cfg)
    lt.build_trainer(qat_cfg, enable_progress_bar=False).fit(qat_module, datamodule=data_cls(qat_cfg))
    qat_best = torch.load(Path(qat_cfg.run_dir) / "weights" / "best.pt", weights_only=True)["model"]
    qat_module.net.load_state_dict(qat_best)
    qat_acc = evaluate(qat_module, qat_module.net, val)["val/acc"]
    parity = _onnx_parity(qat_module.net, val_inputs)
    rows.append((f"QAT {args.qat_epochs} ep", qat_acc, float("nan"), parity["argmax_agreement"], parity["max_abs_diff"]))

    lines = [
        f"{args.config}: FP32 trained {cfg.epochs} epochs in {train_s:.0f} s; backend {cfg.quant_backend}; "
        f"{args.calib_batches} calibration batches of {cfg.batch}; val split {sum(len(x) for x in val_inputs)} images",
        "",
        "| model | val acc % | vs FP32 (points) | calibration s | ORT argmax agreement % | ORT max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, acc, seconds, agree, diff in rows:
        lines.append(
            f"| {name} | {100 * acc:.2f} | {100 * (acc - fp32_acc):+.2f} | {_fmt(seconds, '.2f')} | "
            f"{_fmt(100 * agree, '.2f')} | {_fmt(diff, '.2e')} |"
        )
    text = "\n".join(lines)
    print(text)
    (Path(cfg.run_dir) / "quant_benchmark.md").write_text(text + "\n")


def _onnx_parity(net: torch.nn.Module, inputs: list[torch.Tensor]) -> dict[str, float]:
    """The Q/DQ export every run makes (export_onnx, verified on all of ``inputs``): its report."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, inputs[0], Path(tmp) / "q.onnx", input_names=["images"], verify=inputs,
                           checks=["argmax"])
        main = load_report(path).outputs[0]
        return {"argmax_agreement": main.agreement, "max_abs_diff": main.max_abs_diff}


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


if __name__ == "__main__":
    main()
