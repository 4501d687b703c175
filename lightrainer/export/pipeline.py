"""Weights file -> verified ONNX (and TensorRT engine, and int8 Q/DQ): what the callbacks,
``lightrainer export`` and ``lightrainer ptq`` run.

What a network exports is the task's declaration (:func:`lightrainer.task.export_spec_of`): one
ONNX file per :class:`~lightrainer.task.ExportPart`, each verified by its outputs' declared checks.
Nothing here names a task.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from torch import Tensor, nn

from lightrainer.config import Config
from lightrainer.export.errors import ExportError
from lightrainer.export.graph import PathLike, count_qdq_nodes
from lightrainer.export.latency import LatencyRow, benchmark_latency
from lightrainer.export.onnx import export_onnx
from lightrainer.export.tensorrt import build_engine, check_tensorrt
from lightrainer.export.verify import load_report
from lightrainer.export.view import ExportView, as_tensors, cpu_eval
from lightrainer.quant.base import get_backend, iter_quantizers
from lightrainer.quant.replace import is_quantized_state_dict, quantize_like
from lightrainer.quant.workflow import PTQResult, check_quant_config, post_training_quantize, ptq_network
from lightrainer.registry import EXPORT_FORMATS
from lightrainer.task import ExportPart, ExportSpec, export_spec_of, task_name_of
from lightrainer.weights import apply_weights, load_weights

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


def run_metadata(module: Any, datamodule: Any, config: Mapping[str, Any] | None, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX metadata of a run: the task's name (information only), classes, normalisation, the
    config, where the weights came from, and the ``extra`` entries of the task's ExportSpec."""
    meta: dict[str, Any] = {"task": task_name_of(type(module)), **export_spec_of(module).extra}
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


def part_path(path: PathLike, part: ExportPart) -> Path:
    """Where ``part`` of a model exported as ``path`` goes: ``best.onnx`` + ".encoder" -> ``best.encoder.onnx``."""
    stem = Path(path).with_suffix("")
    return stem.with_name(stem.name + part.suffix + ".onnx")


def export_part(
    net: nn.Module, part: ExportPart, inputs: list[Tensor], path: PathLike, meta: Mapping[str, Any], dynamo: bool = False
) -> Path:
    """Export one declared part of ``net`` to ``path``, verified on ``inputs`` (float, or Q/DQ when quantized).

    The part names the method, the input and output names, the tuple outputs kept and each
    output's check. Spatial axes are dynamic where the network runs at another size.
    """
    return export_onnx(
        net, inputs[0], path, metadata=meta, dynamo=dynamo, method=part.method, input_names=(part.input_name,),
        output_names=[out.name for out in part.outputs], outputs=part.select,
        checks=[out.check for out in part.outputs], dynamic_spatial=None, verify=inputs,
    )


def export_parts(
    net: nn.Module, spec: ExportSpec, inputs: list[Tensor], path: PathLike, meta: Mapping[str, Any], dynamo: bool = False
) -> list[Path]:
    """Export every part of ``spec`` beside ``path`` (:func:`part_path`), each verified.

    A part whose input comes from an earlier part (``input_from``: a decoder fed by the encoder's
    codes) is exported and verified on that part's first output, computed in PyTorch.

    Returns:
        The files, in the spec's order (the first is the whole network).

    Raises:
        ExportError: a part fed by no earlier part, two parts with the same suffix, or a failed
            export or verification.
    """
    written: list[Path] = []
    fed: dict[str, tuple[ExportPart, list[Tensor]]] = {}
    for part in spec.parts:
        if part.suffix in fed:
            raise ExportError(f"export_spec: two parts have the suffix {part.suffix!r}: give each part its own file")
        part_inputs = inputs if part.input_from is None else _outputs_of(net, part, fed)
        part_meta = {**meta, "part": part.suffix.lstrip(".") or None}
        written.append(export_part(net, part, part_inputs, part_path(path, part), part_meta, dynamo))
        fed[part.suffix] = (part, part_inputs)
    return written


def _outputs_of(net: nn.Module, part: ExportPart, fed: Mapping[str, tuple[ExportPart, list[Tensor]]]) -> list[Tensor]:
    """The inputs of ``part``: the first output of its ``input_from`` part on that part's inputs."""
    if part.input_from not in fed:
        earlier = ", ".join(repr(s) for s in fed) or "none"
        raise ExportError(
            f"export_spec: part {part.suffix!r} takes its input from part {part.input_from!r}, which is not an "
            f"earlier part (earlier: {earlier}); list the parts in the order they feed each other"
        )
    source, source_inputs = fed[part.input_from]
    with cpu_eval(net) as cpu_net:
        view = ExportView(cpu_net, source.method, source.select)
        return [as_tensors(view(x.cpu()))[0] for x in source_inputs]


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

    Writes one ONNX file per part of the task's export spec (:func:`export_parts`: ``<stem>.onnx``,
    and e.g. a VQ-VAE's ``<stem>.encoder.onnx`` and ``<stem>.decoder.onnx``), each with
    ``<name>.verify.json``; with ``fmt="engine"`` also ``<stem>.engine``. Weights of a
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
    spec = export_spec_of(module)
    result = ExportResult(onnx=export_parts(net, spec, inputs, stem.with_suffix(".onnx"), meta, dynamo))
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
        WeightsError: the weights were saved by a different model (see :func:`apply_weights`).
    """
    if is_quantized_state_dict(state):
        net = quantize_like(net, state, backend)
    apply_weights(net, state, source)
    return net


def _is_quantized(net: nn.Module) -> bool:
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

        def quantize(module: Any, datamodule: Any) -> nn.Module:
            return ptq_network(module, datamodule.train_dataloader(), cfg)

    log.info("int8: the network is float: post-training quantization first")
    qnet = quantize(module, datamodule)
    return export_part(qnet, export_spec_of(module).parts[0], inputs, int8_onnx, int8_metadata(meta, cfg))


def int8_metadata(meta: Mapping[str, Any], cfg: Config | None) -> dict[str, Any]:
    """``meta`` for a Q/DQ model: marked int8, with the backend and method that calibrated it."""
    marked = {**meta, "quantized": "int8"}
    if cfg is not None:
        marked.update(quant_backend=get_backend(cfg.quant_backend).name, quant_method=cfg.method)
    return marked


def export_int8(
    module: Any, net: nn.Module, inputs: list[Tensor], run_dir: PathLike, cfg: Config, dynamo: bool = False
) -> tuple[Path, dict[str, float]]:
    """Write ``weights/best_int8.onnx`` (Q/DQ) of the fake-quant ``net``, verified in ONNX Runtime.

    What PTQ (:func:`run_ptq`, the PTQ callback) and QAT export after calibrating or training:
    the first part of the task's export spec (the whole network), verified against PyTorch
    fake-quant on ``inputs`` with the Q/DQ tolerance, the file promoted only when it passes.
    Its signature is :data:`lightrainer.quant.workflow.Int8Exporter`.

    Returns:
        The path and its parity: ``max_abs_diff`` and, where the first output is checked by
        agreement, ``argmax_agreement`` ("argmax") or ``index_agreement`` ("equal"), 0..1.

    Raises:
        ExportError: the export fails or the Q/DQ model disagrees with PyTorch beyond the tolerance.
    """
    meta = int8_metadata(run_metadata(module, None, cfg.to_dict(), {}), cfg)
    path = Path(run_dir) / "weights" / "best_int8.onnx"
    export_part(net, export_spec_of(module).parts[0], inputs, path, meta, dynamo)
    main = load_report(path).outputs[0]
    parity = {"max_abs_diff": main.max_abs_diff}
    if main.agreement is not None:
        parity["argmax_agreement" if main.check == "argmax" else "index_agreement"] = main.agreement
    log.info("Q/DQ ONNX %s vs PyTorch fake-quant: %s", path, ", ".join(f"{k}={v:.4g}" for k, v in parity.items()))
    return path, parity


def run_ptq(module: Any, datamodule: Any, cfg: Config, weights_path: PathLike) -> PTQResult:
    """``lightrainer ptq --config X --weights RUN/weights/best.pt``: PTQ of trained weights.

    Calibrates, compares FP32 with INT8 and writes what :func:`~lightrainer.quant.post_training_quantize`
    writes, plus the verified Q/DQ ``weights/best_int8.onnx`` (:func:`export_int8`). Results go to
    the weights' run folder (``RUN/``) unless ``cfg.run_dir`` is set.

    Raises:
        ConfigError: a bad quantization setting, a missing backend, quantized weights.
        WeightsError: a weights file that does not exist, is not a lightrainer weights file, or was
            saved by a different model (all before any work is done).
    """
    check_quant_config(cfg.replace(ptq=True, qat=False), module.net)
    weights_path = Path(weights_path)
    ckpt = load_weights(weights_path)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else weights_path.parent.parent
    return post_training_quantize(
        module, datamodule.train_dataloader(), datamodule.val_dataloader(), cfg, run_dir,
        state_dict=ckpt["model"], exporter=export_int8,
    )


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
