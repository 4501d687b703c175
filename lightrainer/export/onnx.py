"""PyTorch -> ONNX: both exporters, dynamic axes, metadata, atomic writes, readable failures."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lightrainer.constraints import apply_constraints_
from lightrainer.export.errors import ExportError
from lightrainer.export.graph import PathLike, companion_path, require_onnx
from lightrainer.export.verify import Tolerance, output_checks, verify_onnx
from lightrainer.export.view import ExportView, as_tensors, cpu_eval, normalise_outputs
from lightrainer.io import atomic_path
from lightrainer.quant.base import iter_quantizers
from lightrainer.quant.qdq import qdq_export_context, qdq_translation_table
from lightrainer.version import __version__

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: Default opset per exporter: 17 for TorchScript (TensorRT 8.6 parses up to 17); the dynamo
#: exporter writes 18 or newer only.
DEFAULT_OPSET = {False: 17, True: 18}
_MAX_BATCH = 1 << 16


def export_onnx(
    net: nn.Module,
    example_input: Tensor,
    path: PathLike,
    *,
    dynamic_batch: bool = True,
    dynamic_spatial: bool | None = False,
    opset: int | None = None,
    dynamo: bool = False,
    metadata: Mapping[str, Any] | None = None,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] | None = None,
    method: str = "forward",
    outputs: int | Sequence[int] | None = None,
    verify: Iterable[Tensor] | None = None,
    checks: Sequence[str] | None = None,
    tolerance: Tolerance | None = None,
) -> Path:
    """Export ``net`` to an ONNX file, check it and (with ``verify``) compare it with PyTorch.

    The model is built in memory, checked with ``onnx.checker``, verified when ``verify`` is
    given, and only then moved under ``path`` (:func:`lightrainer.io.atomic_path`): a failure at any
    step leaves nothing new under ``path``.

    Constrained layers (max-norm: :func:`lightrainer.constraints.apply_constraints_`) are
    projected first, in place, as their next forward pass would do.

    Args:
        net: the network (exported in eval mode, on the CPU; its training flag is restored).
        example_input: one input batch (its batch size is raised to 2 for a dynamic batch axis).
        path: the ONNX file to write.
        dynamic_batch: make axis 0 of the input and of batch-shaped outputs dynamic.
        dynamic_spatial: make the spatial axes of the input dynamic (:func:`spatial_dims`); None =
            only where the network runs at another size (probed in PyTorch at double height and width).
        opset: ONNX opset; None = :data:`DEFAULT_OPSET` of the exporter.
        dynamo: use the ``torch.export`` based exporter instead of the TorchScript one.
        metadata: extra ``metadata_props`` (non-string values are stored as JSON).
        input_names: name of the input.
        output_names: names of the (selected) outputs; default "output" or "output0", "output1", ...
        method: the method of ``net`` to export ("forward", "encode_codes", ...).
        outputs: indices of the outputs to keep when the method returns a tuple (e.g. 0 keeps
            the reconstruction of ``(recon, vq_loss, perplexity)``).
        verify: input batches (real validation data) to compare ONNX Runtime with PyTorch on.
        checks: how the verification compares each output: "tolerance", "argmax" (class
            scores) or "equal" (indices), see :class:`lightrainer.task.ExportOutput`; stored in
            the model's "export_checks" metadata, so a later :func:`verify_onnx` compares the
            same way (default: "tolerance" for each; integer outputs are compared by equality).
        tolerance: verification tolerance (default: by model kind, see :class:`Tolerance`).

    Returns:
        ``path``.

    Raises:
        ExportError: the network cannot be exported (the message names the op and the module
            that calls it), the checker rejects the model, or the verification fails.
    """
    onnx = require_onnx()
    path = Path(path)
    if opset is None:
        opset = DEFAULT_OPSET[dynamo]
    if dynamo and opset < 18:
        raise ExportError(f"opset: the dynamo exporter writes opset 18 or newer, got {opset}: pass opset>=18 or dynamo=False")
    selection = normalise_outputs(outputs)
    started = time.perf_counter()
    with cpu_eval(net) as cpu_net:
        # Tracing skips the max-norm projection of constrained layers: project before, so the file
        # holds the weights the layers compute with.
        apply_constraints_(cpu_net)
        view = ExportView(cpu_net, method, selection)
        x = example_input.detach().cpu()
        if dynamic_batch and x.shape[0] == 1:
            x = x.repeat(2, *([1] * (x.dim() - 1)))  # a batch of 1 would be specialised into the graph
        example_out = as_tensors(view(x), f"{type(net).__name__}.{method}")
        names = list(output_names) if output_names else _default_output_names(len(example_out))
        if len(names) != len(example_out):
            raise ExportError(
                f"output_names: {len(names)} names for {len(example_out)} outputs of {type(net).__name__}.{method}; "
                "pass one name per output or select outputs with outputs=[...]"
            )
        kinds = output_checks(names, checks)
        if dynamic_spatial is None:
            dynamic_spatial = x.dim() > 2 and _runs_at_other_size(view, x)
        axes = _dynamic_axes(x, example_out, input_names[0], names, dynamic_batch, dynamic_spatial)
        model = _run_exporter(view, x, opset, dynamo, list(input_names[:1]), names, axes, dynamic_batch, dynamic_spatial)
        _set_metadata(
            model,
            {
                **_base_metadata(x, axes.get(input_names[0], {}), dynamo, opset, method, selection, names, kinds),
                **(metadata or {}),
            },
        )
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"the exported model fails onnx.checker: {str(err).splitlines()[0]}") from err
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
            if verify is not None:
                verify_onnx(
                    tmp, cpu_net, verify, checks=kinds, tolerance=tolerance,
                    report_path=companion_path(path, ".verify.json"), model_name=path.name,
                )
    log.info("exported %s in %.2f s", path, time.perf_counter() - started)
    return path


def _default_output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def _runs_at_other_size(view: nn.Module, x: Tensor) -> bool:
    """Whether the network accepts the input at twice its spatial size (fully convolutional)."""
    bigger = torch.nn.functional.interpolate(x[:1].float(), scale_factor=2.0) if x.dim() == 4 else None
    if bigger is None:
        return False
    try:
        view(bigger.to(x.dtype))
    except Exception:  # noqa: BLE001 - any failure means "not at another size"
        return False
    return True


def spatial_dims(x: Tensor) -> range:
    """The spatial axes: 2.. of a float tensor (N, C, ...), 1.. of an integer one (N, ...), e.g. code indices."""
    return range(2 if x.is_floating_point() else 1, x.dim())


def _dynamic_axes(
    x: Tensor, outs: list[Tensor], input_name: str, output_names: list[str], batch: bool, spatial: bool
) -> dict[str, dict[int, str]]:
    """TorchScript-style dynamic axes for the input and the batch-shaped outputs."""
    axes: dict[str, dict[int, str]] = {}
    in_axes = {0: "batch"} if batch else {}
    if spatial:
        in_axes.update({d: f"dim{d}" for d in spatial_dims(x)})
    if in_axes:
        axes[input_name] = in_axes
    for name, out in zip(output_names, outs):
        batched = out.dim() > 0 and out.shape[0] == x.shape[0]
        out_axes = {0: "batch"} if batch and batched else {}
        if spatial and batched and out.dim() >= 3:
            out_axes.update({d: f"{name}_dim{d}" for d in spatial_dims(out)})
        if out_axes:
            axes[name] = out_axes
    return axes


def _run_exporter(
    view: nn.Module,
    x: Tensor,
    opset: int,
    dynamo: bool,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    dynamic_batch: bool,
    dynamic_spatial: bool,
) -> onnx.ModelProto:
    """Run one exporter into memory; a failure becomes an ExportError naming the op and module."""
    try:
        with _exportable_quantizers(view, dynamo) as table, _quiet_exporter_logs(), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dynamo:
                program = torch.onnx.export(
                    view, (x,), None, dynamo=True, opset_version=opset, verbose=False,
                    input_names=input_names, output_names=output_names,
                    dynamic_shapes=(_dynamo_shapes(x, dynamic_batch, dynamic_spatial),),
                    custom_translation_table=table,
                )
                model = program.model_proto
            else:
                buffer = io.BytesIO()
                with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole graph on failure
                    torch.onnx.export(
                        view, (x,), buffer, dynamo=False, opset_version=opset,
                        input_names=input_names, output_names=output_names, dynamic_axes=axes or None,
                        do_constant_folding=True,
                    )
                model = require_onnx().load_from_string(buffer.getvalue())
    except Exception as err:  # noqa: BLE001 - every exporter failure gets the same readable message
        raise ExportError(describe_export_failure(err, view, x, opset, dynamo)) from err
    for message in {str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)}:
        log.warning("ONNX export: %s", message)
    return model


def _dynamo_shapes(x: Tensor, batch: bool, spatial: bool) -> dict[int, Any] | None:
    dims: dict[int, Any] = {}
    if batch:
        dims[0] = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    if spatial:
        # AUTO lets torch.export derive the constraints strided layers put on the size.
        dims.update({d: torch.export.Dim.AUTO for d in spatial_dims(x)})
    return dims or None


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The dynamo exporter's passes log dozens of INFO lines per model; keep warnings only."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _exportable_quantizers(net: nn.Module, dynamo: bool) -> Iterator[dict | None]:
    """For a fake-quant network (pytorch-quantization or ModelOpt quantizers), swap the quantizers
    for exportable Q/DQ modules during the export (lightrainer.quant's context) and yield the
    dynamo translation table they need; a float network passes through (yields None)."""
    if next(iter_quantizers(net), None) is None:
        yield None
        return
    with qdq_export_context(net, dynamo=dynamo):
        yield qdq_translation_table() if dynamo else None


_OP_PATTERN = re.compile(r"aten(?:::|\.)([A-Za-z0-9_]+)")


def _error_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def describe_export_failure(err: BaseException, view: nn.Module, x: Tensor, opset: int, dynamo: bool) -> str:
    """One readable paragraph for an exporter failure: the op, the module that calls it, the fix."""
    net = getattr(view, "net", view)
    exporter = "dynamo" if dynamo else "TorchScript"
    chain = _error_chain(err)
    op = None
    for link in reversed(chain):  # the innermost error names the op most precisely
        match = _OP_PATTERN.search(str(link))
        if match:
            op = match.group(1)
            break
    root = next((str(e).strip().splitlines()[0] for e in reversed(chain) if str(e).strip()), type(err).__name__)
    other = "dynamo=True" if not dynamo else "dynamo=False"
    head = f"cannot export {type(net).__name__} to ONNX (opset {opset}, {exporter} exporter)"
    if op is None:
        return f"{head}: {root}. Try {other}, or make that part of the network traceable"
    where = locate_op(view, x, op, names_from=net)
    place = f", called in module {where}" if where else ""
    return (
        f"{head}: operator aten::{op} is not supported{place} ({root}). Replace that operation with "
        f"supported ones, try another opset or {other}"
    )


def _same_op(name: str, op: str) -> bool:
    return name.split(".")[0].lstrip("_") == op.lstrip("_")


def locate_op(net: nn.Module, x: Tensor, op: str, names_from: nn.Module | None = None) -> str | None:
    """The innermost submodule (``'name' (Class)``) whose forward first calls the operator ``op``.

    Runs one forward pass with module hooks and PyTorch's function and dispatch modes watching
    the calls; module names are those within ``names_from`` (default ``net``); None when the
    op is not seen.
    """
    names = {module: name for name, module in (names_from or net).named_modules()}
    stack: list[nn.Module] = []
    found: list[nn.Module] = []

    def seen(name: str) -> None:
        if not found and _same_op(name, op):
            found.append(stack[-1] if stack else net)

    class FunctionSpy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    class DispatchSpy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen(getattr(getattr(func, "_overloadpacket", func), "__name__", ""))
            return func(*args, **(kwargs or {}))

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(module)

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        stack.pop()  # returns None: a forward hook's return value would replace the output

    handles = []
    for module in net.modules():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), FunctionSpy(), DispatchSpy():
            net(x)
    except Exception:  # noqa: BLE001 - a forward that fails after the op still located it
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return None
    module = found[0]
    return f"{names.get(module) or '<root>'!r} ({type(module).__name__})"


def _base_metadata(
    x: Tensor,
    input_axes: Mapping[int, str],
    dynamo: bool,
    opset: int,
    method: str,
    outputs: tuple[int, ...] | None,
    output_names: list[str],
    checks: list[str],
) -> dict[str, Any]:
    shape = [input_axes.get(d, int(size)) for d, size in enumerate(x.shape)]
    return {
        "lightrainer_version": __version__,
        "torch_version": torch.__version__,
        "exporter": "dynamo" if dynamo else "torchscript",
        "opset": opset,
        "input_shape": shape,
        "example_shape": list(x.shape),
        "input_dtype": str(x.dtype).replace("torch.", ""),
        "output_names": output_names,
        "export_method": method,
        "export_outputs": list(outputs) if outputs is not None else None,
        "export_checks": checks,
    }


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        if value is None:
            continue
        entry = model.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)
    model.producer_name = "lightrainer"
    model.producer_version = __version__
