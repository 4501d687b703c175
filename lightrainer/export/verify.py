"""Verification of an exported model: ONNX Runtime against PyTorch on real batches."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightrainer.export.errors import ExportError, MissingDependencyError
from lightrainer.export.graph import PathLike, companion_path, count_qdq_nodes, load_graph, read_metadata
from lightrainer.export.view import ExportView, as_tensors, cpu_eval
from lightrainer.io import atomic_write
from lightrainer.task import ExportOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """When ONNX Runtime's output counts as equal to PyTorch's.

    A float output passes when ``max|ort - torch| <= atol + rtol * max|torch|`` (the relative
    part scales the bound to the output's magnitude); the argmax agreement of an output declared
    "argmax" (class scores) must reach ``min_agreement``; the fraction of equal values of an
    output declared "equal", and of any integer output (VQ code indices), must reach
    ``min_index_agreement``, lower because a vector equidistant from two codes to within float
    rounding may pick either.
    """

    atol: float = 1e-4
    rtol: float = 1e-5
    min_agreement: float = 0.999
    min_index_agreement: float = 0.99

    @classmethod
    def fp32(cls) -> Tolerance:
        """Float model: both sides compute in float32 (measured diffs are ~1e-6)."""
        return cls()

    @classmethod
    def qdq(cls) -> Tolerance:
        """Q/DQ model against PyTorch fake-quant: a value on a rounding boundary may land one int8
        step apart and move its neighbours; the argmax must still agree on 99.5%."""
        return cls(atol=1e-3, rtol=0.05, min_agreement=0.995)


@dataclass
class OutputCheck:
    """The comparison of one output."""

    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_ref: float
    bound: float | None  # None for outputs checked by index agreement
    agreement: float | None  # fraction of equal values ("equal") or of equal argmax ("argmax")
    passed: bool
    check: str = "tolerance"  # the declared check: "tolerance", "argmax" or "equal"


@dataclass
class VerifyReport:
    """What :func:`verify_onnx` found (also written as JSON next to the model)."""

    model: str
    passed: bool
    qdq: bool
    samples: int
    batches: int
    tolerance: dict[str, float]
    outputs: list[OutputCheck] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    onnxruntime: str = ""

    def summary(self) -> str:
        """One line: verdict, sample count and each output's max abs diff / agreement."""
        parts = []
        for out in self.outputs:
            text = f"{out.name}: max|diff| {out.max_abs_diff:.2e}"
            if out.bound is not None:
                text += f" (bound {out.bound:.1e})"
            if out.agreement is not None:
                text += f", agreement {100 * out.agreement:.2f}%"
            parts.append(text)
        verdict = "passed" if self.passed else "FAILED"
        kind = "Q/DQ" if self.qdq else "fp32"
        return f"ONNX verification {verdict} ({self.model}, {kind}, {self.samples} samples): " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_report(model_path: PathLike) -> VerifyReport:
    """The verification report written next to an ONNX model (``<model>.verify.json``)."""
    data = json.loads(companion_path(model_path, ".verify.json").read_text())
    data["outputs"] = [OutputCheck(**out) for out in data["outputs"]]
    return VerifyReport(**data)


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a one-line error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError('ONNX verification needs onnxruntime: pip install "lightrainer[onnx]"') from None
    return onnxruntime


def ort_session(path: PathLike) -> Any:
    """An ONNX Runtime CPU session with as many threads as PyTorch uses."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def output_checks(names: Sequence[str], checks: Sequence[str] | None) -> list[str]:
    """One check per output (:class:`lightrainer.task.ExportOutput`): ``checks`` validated, or
    "tolerance" for every output when None.

    Raises:
        ExportError: not one check per output, or a check that is not tolerance, argmax or equal.
    """
    if checks is None:
        return ["tolerance"] * len(names)
    if len(checks) != len(names):
        raise ExportError(
            f"checks: {len(checks)} checks for the {len(names)} outputs ({', '.join(names)}): give one per output"
        )
    try:
        return [ExportOutput(name, str(check)).check for name, check in zip(names, checks)]
    except ValueError as err:
        raise ExportError(f"checks: {err}") from None


def _inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class _Stats:
    """Running comparison of one output over batches, by its declared check."""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.max_diff = 0.0
        self.sum_diff = 0.0
        self.count = 0
        self.max_ref = 0.0
        self.equal = 0
        self.items = 0
        self.by_index = kind == "equal"

    def update(self, got: np.ndarray, ref: np.ndarray) -> None:
        floating = np.issubdtype(ref.dtype, np.floating)
        # Integer outputs (code indices) have no tolerance: their values must agree, whatever was declared.
        self.by_index = self.by_index or not floating
        if floating:
            both_nan = np.isnan(got) & np.isnan(ref)
            diff = np.where(both_nan, 0.0, np.abs(got.astype(np.float64) - ref.astype(np.float64)))
        else:
            diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
        if self.by_index:
            self.equal += int((got == ref).sum())
            self.items += ref.size
        elif self.kind == "argmax" and ref.ndim and ref.shape[-1]:
            self.equal += int((got.argmax(-1) == ref.argmax(-1)).sum())
            self.items += ref.size // ref.shape[-1]
        if diff.size:
            self.max_diff = max(self.max_diff, float(diff.max()))
            self.max_ref = max(self.max_ref, float(np.abs(ref).max()))
        self.sum_diff += float(diff.sum())
        self.count += diff.size

    def check(self, tol: Tolerance) -> OutputCheck:
        agreement = self.equal / self.items if self.items else None
        bound = None if self.by_index else tol.atol + tol.rtol * self.max_ref
        needed = tol.min_index_agreement if self.by_index else tol.min_agreement
        passed = (bound is None or self.max_diff <= bound) and (agreement is None or agreement >= needed)
        return OutputCheck(
            self.name, self.max_diff, self.sum_diff / max(self.count, 1), self.max_ref, bound, agreement, passed,
            "equal" if self.by_index else self.kind,
        )


def verify_onnx(
    path: PathLike,
    net: nn.Module,
    batches: Iterable[Any],
    *,
    checks: Sequence[str] | None = None,
    tolerance: Tolerance | None = None,
    max_batches: int | None = None,
    report_path: PathLike | None = None,
    model_name: str | None = None,
    remove_on_fail: bool = False,
) -> VerifyReport:
    """Run the ONNX model in ONNX Runtime (CPU) and PyTorch on the same batches and compare.

    The exported method and output selection are read from the model's metadata (written by
    :func:`~lightrainer.export.export_onnx`), so ``net`` is the whole network.

    Args:
        path: the ONNX file.
        net: the PyTorch network it was exported from (for a Q/DQ model: the fake-quant network).
        batches: input tensors, or batches whose first element is the input.
        checks: how each output is compared, "tolerance", "argmax" or "equal" (see
            :class:`lightrainer.task.ExportOutput`); default: the model's "export_checks"
            metadata, else "tolerance" for every output.
        tolerance: default :meth:`Tolerance.qdq` for a model with Q/DQ nodes, else :meth:`Tolerance.fp32`.
        max_batches: compare on at most this many batches (None = all).
        report_path: where to write the JSON report (default ``<path>.verify.json``).
        model_name: name shown in the report (default the file name).
        remove_on_fail: delete ``path`` when the check fails.

    Returns:
        The report (also logged and written to ``report_path``).

    Raises:
        ExportError: a difference over the tolerance, an agreement under it, no batches, or
            ONNX Runtime failing on a batch.
    """
    started = time.perf_counter()
    path = Path(path)
    graph = load_graph(path)
    meta = read_metadata(graph)
    qdq = sum(count_qdq_nodes(graph).values()) > 0
    tol = tolerance or (Tolerance.qdq() if qdq else Tolerance.fp32())
    if checks is None and meta.get("export_checks"):
        checks = json.loads(meta["export_checks"])
    outputs = json.loads(meta["export_outputs"]) if meta.get("export_outputs", "null") != "null" else None
    session = ort_session(path)
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    stats = [_Stats(name, kind) for name, kind in zip(output_names, output_checks(output_names, checks))]
    samples = used = 0
    with cpu_eval(net) as cpu_net:
        view = ExportView(cpu_net, meta.get("export_method", "forward"), outputs)
        for used, batch in enumerate(batches, start=1):
            if max_batches is not None and used > max_batches:
                used -= 1
                break
            x = _inputs(batch).detach().cpu()
            ref = [t.detach().cpu().numpy() for t in as_tensors(view(x))]
            try:
                got = session.run(None, {input_name: x.numpy()})
            except Exception as err:  # noqa: BLE001 - ORT raises its own types
                raise ExportError(
                    f"ONNX Runtime failed on {path.name} with an input of shape {tuple(x.shape)}: "
                    f"{str(err).splitlines()[0]}"
                ) from err
            if len(got) != len(ref):
                raise ExportError(f"{path.name} has {len(got)} outputs, PyTorch returns {len(ref)}")
            for stat, g, r in zip(stats, got, ref):
                if g.shape != r.shape:
                    raise ExportError(f"{path.name}: output {stat.name} has shape {g.shape}, PyTorch {r.shape}")
                stat.update(g, r)
            samples += int(x.shape[0]) if x.dim() else 1
    if samples == 0:
        raise ExportError(f"no batches to verify {path.name} on: pass real validation batches")
    checks = [s.check(tol) for s in stats]
    failures = [_failure(c, tol) for c in checks if not c.passed]
    report = VerifyReport(
        model=model_name or path.name,
        passed=not failures,
        qdq=qdq,
        samples=samples,
        batches=used,
        tolerance=asdict(tol),
        outputs=checks,
        failures=failures,
        seconds=round(time.perf_counter() - started, 3),
        onnxruntime=require_onnxruntime().__version__,
    )
    target = Path(report_path) if report_path is not None else companion_path(path, ".verify.json")
    atomic_write(target, json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.passed:
        log.error("%s", report.summary())
        if remove_on_fail:
            path.unlink(missing_ok=True)
        raise ExportError(f"{report.summary()}: " + "; ".join(failures) + f" (report: {target})")
    log.info("%s", report.summary())
    return report


def _failure(check: OutputCheck, tol: Tolerance) -> str:
    if check.bound is not None and not check.max_abs_diff <= check.bound:
        return (
            f"{check.name} differs from PyTorch by {check.max_abs_diff:.3e} > {check.bound:.3e} "
            f"(atol {tol.atol:g} + rtol {tol.rtol:g} x max|output| {check.max_abs_ref:.3g})"
        )
    needed = tol.min_agreement if check.bound is not None else tol.min_index_agreement
    return f"{check.name} agrees with PyTorch on {100 * (check.agreement or 0):.2f}% < {100 * needed:.2f}%"
