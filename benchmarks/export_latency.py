"""Latency table of an exported model: PyTorch eager, ONNX Runtime FP32 / Q/DQ, TensorRT.

    python benchmarks/export_latency.py                                # SmallCNN on 1x28x28, batch 64
    python benchmarks/export_latency.py --weights runs/train/weights/best.pt  # a trained run
    python benchmarks/export_latency.py --qdq runs/train/weights/best_int8.onnx --engine best.engine

Writes latency.csv and latency.md to --out (default: the run folder, or runs/latency) and prints
the markdown table. Threads are pinned (--threads, default 1): on shared CPUs compare rows of one
run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a run's weights/best.pt (default: an untrained SmallCNN)")
    parser.add_argument("--config", help="YAML for --weights (default: the config saved in it)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--qdq", help="a Q/DQ ONNX model to time in ONNX Runtime")
    parser.add_argument("--engine", help="a TensorRT engine to time")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="folder for latency.csv / latency.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from lightrainer.export import benchmark_from_weights, benchmark_latency, export_onnx, latency_markdown

    if args.weights:
        import lightrainer as lt
        from lightrainer.build import build_from_config
        from lightrainer.export import load_weights

        saved = load_weights(args.weights).get("config") or {}
        cfg = lt.load_config(args.config) if args.config else lt.load_config({k: v for k, v in saved.items() if v is not None})
        cfg = cfg.replace(batch=args.batch)
        module, datamodule = build_from_config(cfg)
        rows = benchmark_from_weights(module, datamodule, cfg, args.weights, repeats=args.repeats,
                                      warmup=args.warmup, threads=args.threads, out_dir=args.out,
                                      qdq_path=args.qdq, engine_path=args.engine)
    else:
        from lightrainer.modules.nets import SmallCNN

        net = SmallCNN(num_classes=10).eval()
        out = Path(args.out or "runs/latency")
        with tempfile.TemporaryDirectory() as tmp:
            x = torch.randn(args.batch, 1, 28, 28)
            start = time.perf_counter()
            onnx_path = export_onnx(net, x, Path(tmp) / "smallcnn.onnx", input_names=["images"], verify=[x],
                                    task="classification")
            print(f"export + verification: {time.perf_counter() - start:.2f} s")
            rows = benchmark_latency(net, onnx_path, batch=args.batch, qdq_path=args.qdq, engine_path=args.engine,
                                     repeats=args.repeats, warmup=args.warmup, threads=args.threads, out_dir=out)
    print(latency_markdown(rows))


if __name__ == "__main__":
    main()
