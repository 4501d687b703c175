"""Weights file -> verified ONNX (and TensorRT engine): what the callback and ``lightrainer export`` run."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml
from torch import Tensor, nn

from lightrainer.registry import EXPORT_FORMATS
from lightrainer.export.errors import ExportError
from lightrainer.export.graph import PathLike, count_qdq_nodes
from lightrainer.export.latency import LatencyRow, benchmark_latency
from lightrainer.export.onnx import export_onnx
from lightrainer.export.tensorrt import build_engine, check_tensorrt
from lightrainer.export.view import cpu_eval

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExportFormat:
    """A registered export format (``export: NAME`` / ``--format NAME``).

    Args:
        check: raises MissingDependencyError when what the format needs is missing; called
            before any work.
        build: ``build(onnx_path, stem, batch, fp16, int8) -> Path`` makes the format's file from
            the verified ONNX model (None: the ONNX model is the result).
    """

    check: Callable[[], None] | None = None
    build: Callable[..., Path] | None = None


def register_format(name: str, fmt: ExportFormat, *, override: bool = False) -> ExportFormat:
    """Register an export format a YAML (``export: NAME``) and ``--format`` can name."""
    return EXPORT_FORMATS.register(name, fmt, override=override)


def _build_engine(onnx_path: Path, stem: Path, batch: int, fp16: bool, int8: bool) -> Path:
    return build_engine(onnx_path, stem.with_suffix(".engine"), batch=batch, fp16=fp16, int8=int8)


register_format("onnx", ExportFormat())
register_format("engine", ExportFormat(check=check_tensorrt, build=_build_engine))

#: Export formats: what ``--format`` / the ``export`` key accept (the registry's names).
FORMATS = EXPORT_FORMATS

#: ``quantize(module, datamodule) -> fake-quant network``: PTQ for an int8 engine of a float model.
QuantizeFn = Callable[[Any, Any], nn.Module]


@dataclass
class ExportResult:
    """The files an export wrote (reports sit next to each ONNX file as ``<name>.verify.json``)."""

    onnx: list[Path] = field(default_factory=list)
    engine: Path | None = None


def check_format(fmt: str) -> str:
    """The registered spelling of ``fmt``, or an ExportError naming the choices."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(
            f"format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}: use --format onnx or another registered format"
        )
    return EXPORT_FORMATS.canonical(fmt)


def load_weights(path: PathLike) -> dict[str, Any]:
    """Read a lightrainer weights file (``weights/best.pt``) safely (``weights_only=True``).

    Raises:
        ExportError: the file is missing, unreadable, or not a dict holding a "model" state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"weights file not found: {path}: pass a run's weights/best.pt (e.g. runs/train/weights/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors all mean "not ours"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"{path} is not a lightrainer weights file (torch.load failed: {reason[:200]}): "
            "pass the weights/best.pt a lightrainer run wrote"
        ) from None
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, Mapping) or not all(isinstance(v, Tensor) for v in model.values()):
        held = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:6]}"
        raise ExportError(
            f"{path} is not a lightrainer checkpoint: expected a dict whose 'model' entry is a state_dict, "
            f"found {held}; pass the weights/best.pt a lightrainer run wrote"
        )
    return ckpt


def apply_weights(net: nn.Module, state: Mapping[str, Tensor], source: PathLike = "the weights file") -> None:
    """Load ``state`` into ``net`` exactly (same keys, same shapes), or explain the mismatch.

    Raises:
        ExportError: missing/unexpected keys or shape mismatches (the first few of each).
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches (file vs network)", shapes)) if items]
        raise ExportError(
            f"{source} was saved by a different model than {type(net).__name__}: " + "; ".join(parts)
            + ". Build the network with the config the run used (its args.yaml) or pass that run's weights"
        )
    net.load_state_dict(state, strict=True)


def task_name(module: Any) -> str:
    """"classification" for ClassificationModule, "vqvae" for VQVAEModule, ... (or ``module.task``)."""
    name = getattr(module, "task", None)
    if isinstance(name, str):
        return name
    cls = type(module).__name__
    return (cls[: -len("Module")] if cls.endswith("Module") and cls != "Module" else cls).lower()


def run_metadata(module: Any, datamodule: Any, config: Mapping[str, Any] | None, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX metadata of a run: task, classes, normalisation, the config and where the weights came from."""
    meta: dict[str, Any] = {"task": task_name(module)}
    for key, owner in (("num_classes", module), ("num_classes", datamodule), ("class_names", datamodule),
                       ("mean", datamodule), ("std", datamodule), ("pixel_scale", datamodule)):
        value = getattr(owner, key, None)
        if value is not None and key not in meta:
            meta[key] = list(value) if isinstance(value, tuple) else value
    if config is not None:
        meta["config"] = yaml.safe_dump(dict(config), sort_keys=False)
    for key in ("epoch", "best_fitness", "date"):
        if ckpt.get(key) is not None:
            meta[f"weights_{key}"] = ckpt[key]
    return meta


def _val_inputs(module: Any, datamodule: Any, max_batches: int | None) -> list[Tensor]:
    loader = datamodule.val_dataloader()
    batches = itertools.islice(loader, max_batches) if max_batches else loader
    return [module.example_input(batch).detach().cpu() for batch in batches]


def _is_vqvae(net: nn.Module) -> bool:
    return callable(getattr(net, "encode_codes", None)) and callable(getattr(net, "decode_codes", None))


def export_model(
    net: nn.Module, inputs: list[Tensor], path: PathLike, meta: Mapping[str, Any], task: str, dynamo: bool = False
) -> Path:
    """Export a task's whole network to ``path``, verified on ``inputs`` (float, or Q/DQ when quantized).

    The input is called "images"; a classifier's output "logits"; a network returning a tuple (the
    VQ-VAE's reconstruction, loss, perplexity) exports its first element as "reconstruction".
    Spatial axes are dynamic where the network runs at another size.
    """
    return export_onnx(net, inputs[0], path, metadata=meta, dynamo=dynamo, input_names=("images",),
                       dynamic_spatial=None, verify=inputs, task=task, **_selection(net, inputs[0], task))


def _export_net(net: nn.Module, inputs: list[Tensor], path: Path, meta: dict[str, Any], task: str, dynamo: bool) -> list[Path]:
    """Export ``net`` to ``path`` (and a VQ-VAE's encoder and decoder beside it), each verified."""
    whole = export_model(net, inputs, path, meta, task, dynamo)
    if not _is_vqvae(net):
        return [whole]
    # VQ-VAE: also images -> codes and codes -> images.
    common = dict(dynamo=dynamo, input_names=("images",), dynamic_spatial=None, verify=inputs, task=task)
    stem = path.with_suffix("")
    encoder = export_onnx(net, inputs[0], stem.with_name(stem.name + ".encoder.onnx"), method="encode_codes",
                          metadata={**meta, "part": "encoder"}, output_names=("codes",), **common)
    with cpu_eval(net) as cpu_net:
        codes = [cpu_net.encode_codes(x) for x in inputs]
    decoder = export_onnx(net, codes[0], stem.with_name(stem.name + ".decoder.onnx"), method="decode_codes",
                          metadata={**meta, "part": "decoder"}, output_names=("reconstruction",),
                          **{**common, "input_names": ("codes",), "verify": codes})
    return [whole, encoder, decoder]


def export_from_weights(
    module: Any,
    datamodule: Any,
    cfg: Any,
    weights: PathLike,
    fmt: str = "onnx",
    *,
    out_dir: PathLike | None = None,
    dynamo: bool = False,
    int8: bool = False,
    fp16: bool = False,
    quantize: QuantizeFn | None = None,
    max_batches: int | None = 32,
    val_inputs: Iterable[Tensor] | None = None,
) -> ExportResult:
    """Load a run's weights into ``module.net``, export verified ONNX and optionally an engine.

    Writes ``<stem>.onnx`` (a VQ-VAE also ``<stem>.encoder.onnx`` and ``<stem>.decoder.onnx``),
    each with ``<name>.verify.json``; with ``fmt="engine"`` also ``<stem>.engine``. Weights of a
    quantized network (QAT) make ``<stem>.onnx`` a Q/DQ model. With ``int8`` a Q/DQ model is
    also made sure of, and an engine built from it: ``<stem>.onnx`` itself when the network is
    quantized, else ``<stem>_int8.onnx`` written by the PTQ callback, else PTQ runs here
    (``quantize``) and writes it. Nothing is left under a final name when a step fails.

    Args:
        module: the task module (a LightrainerModule) whose ``net`` receives the weights.
        datamodule: gives the validation batches for verification and the metadata.
        cfg: the run's Config (engine batch size; None = ``module.cfg``).
        weights: the weights file (``weights/best.pt``: a dict with "model" = the net's state_dict).
        fmt: "onnx" or "engine".
        out_dir: where to write (default: the weights file's folder).
        dynamo: use the dynamo exporter.
        int8: make sure of a Q/DQ model (running PTQ on a float network) and build the engine from it.
        fp16: allow fp16 kernels in the engine.
        quantize: ``quantize(module, datamodule) -> fake-quant net``, used when ``int8`` and the
            network is not quantized yet (default: PTQ with ``cfg``'s method and num_batches).
        max_batches: validation batches to verify on (None = all).
        val_inputs: input tensors to verify on instead of the datamodule's validation batches.

    Returns:
        The files written.

    Raises:
        ExportError: a bad format, weights file or network; a failed export or verification.
        MissingDependencyError: an engine without TensorRT or a GPU (checked before any work).
    """
    fmt = check_format(fmt)
    entry = EXPORT_FORMATS.get(fmt)
    if entry.check is not None:
        entry.check()  # before any work: no half-made outputs when e.g. TensorRT is missing
    weights = Path(weights)
    ckpt = load_weights(weights)
    cfg = cfg if cfg is not None else getattr(module, "cfg", None)
    module.net = load_net_weights(module.net, ckpt["model"], weights, getattr(cfg, "quant_backend", "auto"))
    net: nn.Module = module.net
    out = Path(out_dir) if out_dir is not None else weights.parent
    stem = out / weights.stem
    inputs = list(val_inputs) if val_inputs is not None else _val_inputs(module, datamodule, max_batches)
    if not inputs:
        raise ExportError("no validation batches to verify the export on: the datamodule needs a val split")
    config = ckpt.get("config") or (cfg.to_dict() if cfg is not None else None)
    meta = run_metadata(module, datamodule, config, ckpt)
    if _is_quantized(net):
        meta["quantized"] = "int8"
    task = meta["task"]
    result = ExportResult(onnx=_export_net(net, inputs, stem.with_suffix(".onnx"), meta, task, dynamo))
    qdq_source = None
    if int8:
        qdq_source = _qdq_model(module, datamodule, cfg, result.onnx[0], stem, inputs, meta, quantize)
        if qdq_source not in result.onnx:
            result.onnx.append(qdq_source)
    if entry.build is None:
        return result
    batch = int(cfg.batch) if cfg is not None else int(inputs[0].shape[0])
    result.engine = entry.build(qdq_source or result.onnx[0], stem, batch=batch, fp16=fp16, int8=int8)
    return result


def load_net_weights(net: nn.Module, state: Mapping[str, Tensor], source: PathLike, backend: str = "auto") -> nn.Module:
    """``net`` with ``state`` loaded exactly; weights of a quantized network (a QAT run's
    ``best.pt``, PTQ's ``best_int8.pt``: they hold quantizer amax) first quantize ``net`` to match.

    Returns:
        ``net``, or its quantized form.

    Raises:
        ExportError: the weights were saved by a different model (see :func:`apply_weights`).
    """
    from lightrainer.quant.replace import is_quantized_state_dict

    if is_quantized_state_dict(state):
        from lightrainer.quant.replace import quantize_like

        net = quantize_like(net, state, backend)
    apply_weights(net, state, source)
    return net


def _is_quantized(net: nn.Module) -> bool:
    from lightrainer.quant.base import iter_quantizers

    return next(iter_quantizers(net), None) is not None


def _qdq_model(
    module: Any, datamodule: Any, cfg: Any, exported: Path, stem: Path, inputs: list[Tensor],
    meta: dict[str, Any], quantize: QuantizeFn | None,
) -> Path:
    """The Q/DQ ONNX model an int8 engine is built from.

    ``exported`` itself when the network is quantized (QAT weights); else ``<stem>_int8.onnx``
    when the PTQ callback wrote it; else PTQ now (``quantize``, default
    :func:`lightrainer.quant.workflow.ptq_network` with the config's method and num_batches) and
    a verified export of the result to ``<stem>_int8.onnx``.
    """
    if sum(count_qdq_nodes(exported).values()):
        return exported
    int8_onnx = stem.with_name(stem.name + "_int8.onnx")
    if int8_onnx.is_file():
        return int8_onnx
    if quantize is None:
        if cfg is None:
            raise ExportError("int8 of a float network needs PTQ and a config (method, num_batches) to run it")
        from lightrainer.quant.workflow import ptq_network

        def quantize(module: Any, datamodule: Any) -> nn.Module:
            return ptq_network(module, datamodule.train_dataloader(), cfg)

    log.info("int8: the network is float: post-training quantization first")
    qnet = quantize(module, datamodule)
    return export_model(qnet, inputs, int8_onnx, {**meta, "quantized": "int8"}, meta["task"])


def _selection(net: nn.Module, x: Tensor, task: str) -> dict[str, Any]:
    """Output choice and names: a tuple output (the VQ-VAE's) exports its first element."""
    with cpu_eval(net) as cpu_net:
        tuple_out = isinstance(cpu_net(x[:1]), (tuple, list))
    names = ("logits",) if task == "classification" else ("reconstruction",) if tuple_out else ("output",)
    return {"outputs": 0 if tuple_out else None, "output_names": names}


def benchmark_from_weights(
    module: Any,
    datamodule: Any,
    cfg: Any,
    weights: PathLike,
    *,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = 1,
    out_dir: PathLike | None = None,
    qdq_path: PathLike | None = None,
    engine_path: PathLike | None = None,
) -> list[LatencyRow]:
    """Latency table of a run's exported models (``lightrainer benchmark``).

    Uses ``<stem>.onnx`` next to the weights (exported and verified first when missing),
    ``<stem>_int8.onnx`` and ``<stem>.engine`` when present; writes ``latency.csv`` and
    ``latency.md`` to ``out_dir`` (default: the run folder). ``qdq_path``/``engine_path`` name
    other files to time instead.
    """
    weights = Path(weights)
    cfg = cfg if cfg is not None else getattr(module, "cfg", None)
    onnx_path = weights.with_suffix(".onnx")
    if onnx_path.is_file():
        module.net = load_net_weights(module.net, load_weights(weights)["model"], weights,
                                      getattr(cfg, "quant_backend", "auto"))
    else:
        export_from_weights(module, datamodule, cfg, weights, "onnx")
    qdq = Path(qdq_path) if qdq_path else weights.with_name(weights.stem + "_int8.onnx")
    engine = Path(engine_path) if engine_path else weights.with_suffix(".engine")
    run_dir = getattr(cfg, "run_dir", None) or weights.parent.parent
    return benchmark_latency(
        module.net, onnx_path, batch=int(cfg.batch) if cfg is not None else 32,
        qdq_path=qdq if qdq.is_file() else None, engine_path=engine if engine.is_file() else None,
        repeats=repeats, warmup=warmup, threads=threads, out_dir=out_dir or run_dir,
    )
