"""Latency table of an exported model: PyTorch eager, ONNX Runtime FP32 / Q/DQ, TensorRT.

    python benchmarks/export_latency.py                                # SmallCNN on 1x28x28, batch 64
    python benchmarks/export_latency.py --weights runs/train/weights/best.pt  # a trained run
    python benchmarks/export_latency.py --weights runs/mnist/weights/best.pt --config configs/mnist.yaml --int8
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
    parser.add_argument("--int8", action="store_true", help="with --weights: write <stem>_int8.onnx (PTQ when float) and time it")
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
        from lightrainer.export import export_from_weights
        from lightrainer.export.verify import load_report

        start = time.perf_counter()
        onnx_path = export_from_weights(module, datamodule, cfg, args.weights, "onnx", max_batches=None).onnx[0]
        seconds = time.perf_counter() - start
        main_out = load_report(onnx_path).outputs[0]
        agreement = "" if main_out.agreement is None else f", argmax agreement {100 * main_out.agreement:.2f}%"
        print(f"export + verification ({load_report(onnx_path).samples} val samples): {seconds:.2f} s; "
              f"ONNX Runtime FP32 vs PyTorch max abs diff {main_out.max_abs_diff:.2e}{agreement}")
        if args.int8 and not args.qdq:
            start = time.perf_counter()
            qdq = export_from_weights(module, datamodule, cfg, args.weights, "onnx", int8=True, max_batches=None).onnx[-1]
            report = load_report(qdq).outputs[0]
            print(f"Q/DQ {qdq.name} (PTQ {cfg.method}) + verification: {time.perf_counter() - start:.2f} s; ONNX Runtime "
                  f"vs PyTorch fake-quant max abs diff {report.max_abs_diff:.2e}, argmax agreement "
                  f"{100 * (report.agreement or 0):.2f}%")
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
                                    checks=["argmax"])
            print(f"export + verification: {time.perf_counter() - start:.2f} s")
            rows = benchmark_latency(net, onnx_path, batch=args.batch, qdq_path=args.qdq, engine_path=args.engine,
                                     repeats=args.repeats, warmup=args.warmup, threads=args.threads, out_dir=out)
    print(latency_markdown(rows))


if __name__ == "__main__":
    main()
