"""Deployment, end to end on a CPU: train, PTQ, QAT, verified ONNX, (TensorRT where present), latency.

    python examples/deploy.py

1. Train the SmallCNN on scikit-learn's digits with `ptq: True` and `export: onnx`: after fit the
   best weights are calibrated (int8 fake-quant, FP32 vs INT8 table in ptq_results.md, per-layer
   sensitivity in quant_sensitivity.png, Q/DQ model weights/best_int8.onnx) and exported to
   weights/best.onnx, each checked against PyTorch in ONNX Runtime (*.verify.json).
2. Fine-tune the trained weights with QAT (`qat: True`, lr0 * 0.1) and export its Q/DQ ONNX.
3. Build a TensorRT engine when TensorRT and a GPU are present (skipped, with the reason, here).
4. Print the latency table: PyTorch eager, ONNX Runtime FP32 and Q/DQ (TensorRT where built).
"""

from __future__ import annotations

from pathlib import Path

import torch

import lightrainer as lt
from lightrainer.build import build_from_config
from lightrainer.export import benchmark_from_weights, export_from_weights

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def main(save_dir: str = "runs", epochs: int = 10, qat_epochs: int = 2, **trainer_kwargs) -> dict:
    # 1. train + PTQ + verified ONNX
    cfg = lt.load_config(CONFIG, save_dir=save_dir, name="deploy", epochs=epochs, ptq=True,
                         method="max", num_batches=20, export="onnx")
    module, data = build_from_config(cfg)
    lt.build_trainer(cfg, **trainer_kwargs).fit(module, datamodule=data)
    run = Path(cfg.run_dir)
    print((run / "ptq_results.md").read_text())

    # 2. QAT, starting from the trained weights
    qcfg = lt.load_config(CONFIG, save_dir=save_dir, name="deploy_qat", epochs=qat_epochs, qat=True,
                          method="max", num_batches=20)
    qat_module, qat_data = build_from_config(qcfg)
    qat_module.net.load_state_dict(torch.load(run / "weights" / "best.pt", weights_only=True)["model"])
    lt.build_trainer(qcfg, **trainer_kwargs).fit(qat_module, datamodule=qat_data)
    qat_run = Path(qcfg.run_dir)

    # 3. TensorRT where present: fails with one line saying what is missing otherwise
    engine = None
    try:
        engine = export_from_weights(module, data, cfg, run / "weights" / "best.pt", fmt="engine", int8=True)
    except ImportError as missing:
        print(f"TensorRT engine skipped: {missing}")

    # 4. latency table (written to RUN/latency.md)
    rows = benchmark_from_weights(module, data, cfg, run / "weights" / "best.pt",
                                  qdq_path=run / "weights" / "best_int8.onnx", repeats=20, warmup=5)
    print((run / "latency.md").read_text())
    return {"run": run, "qat_run": qat_run, "engine": engine, "latency": rows}


if __name__ == "__main__":
    main()
