"""Equivalence of two ONNX models, checked by running both in onnxruntime, layer by layer.

Both models run with graph optimizations DISABLED: onnxruntime's own fusions (Conv+BN, MatMul+BN,
...) would otherwise rewrite the reference into something close to the candidate and hide what
the files contain, and its optimizer removes Dropout. They get the same inputs: random, drawn
from a seeded `numpy.random.Generator` according to the graph's input shapes and dtypes
(symbolic or unknown dimensions take the size ``batch``), or the user's own arrays; many samples
stream through one session per model in batches (`bnfold.feeds`).

What is compared: by default every tensor both models compute under the same name, in the
reference's topological order (`bnfold.layerwise`): a folded node keeps the output name of the BN
it absorbed, so each fold is checked where it happens. A network whose outputs barely depend on
a middle layer would otherwise pass with that layer wrong. ``outputs_only=True`` compares the
graph outputs alone.

Before any verdict, each model runs twice on the same input: a model whose two runs differ
(Dropout or random ops exported in training mode) cannot serve as a reference, and verification
refuses it (`BnfoldError`).

Verdict, per tensor shared by name (reference ``a``, candidate ``b``)::

    ok  <=>  max|a - b| <= atol + rtol * max|a|

The bound is scale-aware: a network whose outputs are around 1e5 is judged relative to that
scale. For outputs, the JSON report also counts the elements with ``|a - b| > atol + rtol * |a|``.
NaN in both at the same place is equal; NaN in only one is a failure; equal infinities are equal.
Integer and bool tensors must match exactly.

Default tolerances by the reference tensor's dtype (``atol`` is ``rtol / 100``, so that it scales
with the precision of the dtype the same way ``rtol`` does):

=================  ========  ========
dtype              rtol      atol
=================  ========  ========
float64            1e-9      1e-11
float32            1e-4      1e-6
float16, bfloat16  1e-2      1e-4
integer, bool      0         0
=================  ========  ========
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.feeds import FeedPlan, input_bytes, plan_feeds, unify_inputs
from bnfold.io.files import serialized_size
from bnfold.layerwise import (
    TensorComparison,
    TensorStats,
    plan_runs,
    producers,
    tensor_bytes,
)
from bnfold.runtime import (
    ModelLike,
    check_deterministic,
    computed_tensors,
    default_tolerances,
    expose,
    feed_inputs,
    np_dtype,
    random_inputs,
)
from bnfold.runtime import load_for_session as _load_for_session
from bnfold.runtime import run as _run
from bnfold.runtime import session as _session

__all__ = [
    "DEFAULT_MAX_BYTES",
    "OutputComparison",
    "TensorComparison",
    "VerifyReport",
    "default_tolerances",
    "compare_arrays",
    "feed_inputs",
    "random_inputs",
    "verify",
    "find_culprits",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3
"""Default cap on the memory that verification may allocate for inputs and compared tensors (2 GiB)."""


@dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference's.

    ``max_abs`` is ``max|a - b|``; ``max_rel`` is ``max |a - b| / |a|`` over the elements where
    ``a != 0`` (elements with ``a == 0`` are judged by ``max_abs``); ``scale`` is ``max|a|`` over
    finite ``a``; ``tol = atol + rtol * scale``; ``n_exceed`` counts elements with
    ``|a - b| > atol + rtol * |a|`` plus NaN mismatches, out of ``size``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    scale: float
    rtol: float
    atol: float
    tol: float
    n_exceed: int
    size: int
    nan_mismatch: int
    ok: bool
    reason: str | None = None

    @property
    def rel(self) -> float:
        """``max_abs / scale``: the error relative to the output's scale, which the verdict bounds by rtol."""
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    def line(self) -> str:
        """One human-readable line: ``output 'y' (float32, 1x10): max abs error 2.4e-07 <= tol ...: ok``.

        The elementwise count (``n_exceed``) is in the JSON report only: the verdict does not use it.
        """
        shape = "x".join(str(d) for d in self.shape) or "scalar"
        head = f"output '{self.name}' ({self.dtype}, {shape}): "
        if self.reason is not None:
            return head + f"FAILED: {self.reason}"
        verdict = "ok" if self.ok else "FAILED"
        relation = "<=" if self.max_abs <= self.tol else ">"
        text = (
            f"max abs error {self.max_abs:.3g} {relation} tol {self.tol:.3g}"
            f" (atol {self.atol:.3g} + rtol {self.rtol:.3g} * max|ref| {self.scale:.3g}),"
            f" relative error {self.rel:.3g}"
        )
        if self.nan_mismatch:
            text += f", {self.nan_mismatch} NaN in only one model"
        return head + text + f": {verdict}"


def merge_comparisons(parts: Sequence[OutputComparison], rows: int | None = None) -> OutputComparison:
    """One `OutputComparison` from those of successive batches of the same output.

    Maxima and counts combine; the tolerance is recomputed from the overall scale. ``rows`` (the
    total number of samples) replaces axis 0 of the shape when every batch had its rows there.
    """
    first = parts[0]
    if len(parts) == 1:
        return first
    scale = max(part.scale for part in parts)
    max_abs = max(part.max_abs for part in parts)
    tol = first.atol + first.rtol * scale
    nan_mismatch = sum(part.nan_mismatch for part in parts)
    reason = next((part.reason for part in parts if part.reason is not None), None)
    shape = first.shape
    if rows is not None and shape:
        shape = (rows, *shape[1:])
    ok = reason is None and nan_mismatch == 0 and max_abs <= tol
    return OutputComparison(name=first.name, dtype=first.dtype, shape=shape, max_abs=max_abs,
                            max_rel=max(part.max_rel for part in parts), scale=scale, rtol=first.rtol,
                            atol=first.atol, tol=tol, n_exceed=sum(part.n_exceed for part in parts),
                            size=sum(part.size for part in parts), nan_mismatch=nan_mismatch, ok=ok, reason=reason)


@dataclass
class VerifyReport:
    """Result of `verify`.

    ``outputs`` has one `OutputComparison` per graph output both models share; ``layers`` one
    `TensorComparison` per tensor compared (intermediate tensors and outputs, in topological
    order; outputs only with ``mode == "outputs"``). ``ok`` needs every one within tolerance.
    """

    reference: str
    candidate: str
    outputs: list[OutputComparison]
    inputs: dict[str, dict[str, Any]]
    input_source: str
    seed: int | None
    batch: int
    only_in_reference: list[str] = field(default_factory=list)
    only_in_candidate: list[str] = field(default_factory=list)
    layers: list[TensorComparison] = field(default_factory=list)
    mode: str = "layers"
    samples: int = 0
    batches: int = 1
    batch_rows: int = 0
    groups: int = 1
    random_inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    deterministic_checked: bool = True

    @property
    def ok(self) -> bool:
        """True when every shared output and every compared tensor is within tolerance."""
        return all(item.ok for item in self.outputs) and all(item.ok for item in self.layers)

    @property
    def max_abs(self) -> float:
        """Largest absolute error over all compared outputs."""
        return max((item.max_abs for item in self.outputs), default=0.0)

    def failed(self) -> list[OutputComparison]:
        """The outputs that are not within tolerance."""
        return [item for item in self.outputs if not item.ok]

    def failed_tensors(self) -> list[TensorComparison]:
        """The compared tensors that are not within tolerance, in topological order."""
        return [item for item in self.layers if not item.ok]

    @property
    def first_failure(self) -> TensorComparison | None:
        """The first tensor, in topological order, that exceeds its bound (None when all pass)."""
        return next((item for item in self.layers if not item.ok), None)

    def worst(self) -> TensorComparison | None:
        """The compared tensor that uses the largest share of its tolerance."""
        def share(item: TensorComparison) -> float:
            if item.reason is not None or item.nan_mismatch:
                return math.inf
            return item.max_abs / item.tol if item.tol > 0 else (math.inf if item.max_abs > 0 else 0.0)

        return max(self.layers, key=share, default=None)

    def _inputs_line(self) -> str:
        described = ", ".join(
            f"'{name}' ({info['dtype']}, {'x'.join(str(d) for d in info['shape']) or 'scalar'})"
            for name, info in self.inputs.items())
        if self.input_source == "random":
            return f"inputs: random values (seed {self.seed}, floats ~ N(0, 1)) for every input: {described}"
        return f"inputs: from {self.input_source}: {described}"

    def counts_line(self) -> str:
        n_out = sum(1 for item in self.layers if item.output)
        if self.mode == "layers":
            what = f"{_plural(len(self.layers), 'tensor')} layer by layer ({_plural(n_out, 'output')})"
        else:
            what = f"{_plural(n_out, 'output')} only (--outputs-only)"
        batches = f"{_plural(self.batches, 'batch', 'batches')} of up to {self.batch_rows}"
        groups = f", {self.groups} groups of tensors per batch" if self.groups > 1 else ""
        return f"compared {what} on {_plural(self.samples, 'sample')} ({batches}{groups})"

    def lines(self) -> list[str]:
        """Human-readable report: models, inputs, outputs, counts, the first failing tensor, verdict."""
        how = "layer by layer" if self.mode == "layers" else "outputs only"
        out = [f"verified '{self.candidate}' against '{self.reference}' with onnxruntime"
               f" (graph optimizations disabled), {how}", self._inputs_line()]
        out += [f"note: {note}" for note in self.notes]
        out += [f"warning: {warning}" for warning in self.warnings]
        out += [item.line() for item in self.outputs]
        for name in self.only_in_reference:
            out.append(f"output '{name}' only in the reference: not compared")
        for name in self.only_in_candidate:
            out.append(f"output '{name}' only in the candidate: not compared")
        out.append(self.counts_line())
        first = self.first_failure
        if first is None:
            out.append(self.summary())
        else:
            out.append(f"first {first.line()}")
            out.append(f"NOT equivalent: {self._failed_counts()}; the first is '{first.name}'")
        return out

    def _failed_counts(self) -> str:
        return (f"{len(self.failed_tensors())} of {_plural(len(self.layers), 'tensor')} exceed"
                f" ({len(self.failed())} of {_plural(len(self.outputs), 'output')})")

    def summary(self) -> str:
        """One line: the verdict, the first failing tensor or the worst one, with relative error and tolerance."""
        total = len(self.layers)
        first = self.first_failure
        if first is None:
            worst = self.worst()
            if worst is None:
                return "equivalent"
            return (f"equivalent: {_plural(total, 'tensor')} within tolerance; closest to its bound"
                    f" '{worst.name}': {_error_text(worst)}")
        return (f"NOT equivalent: {self._failed_counts()}; first '{first.name}' ({first.reference_node} in the"
                f" reference, {first.candidate_node} in the candidate): {_error_text(first)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (floats that are inf/NaN become strings)."""
        outputs = []
        for item in self.outputs:
            entry = asdict(item)
            entry["shape"] = list(item.shape)
            entry["rel"] = item.rel
            for key in ("max_abs", "max_rel", "scale", "tol", "rel"):
                entry[key] = _json_float(entry[key])
            outputs.append(entry)
        first = self.first_failure
        return {
            "ok": self.ok,
            "reference": self.reference,
            "candidate": self.candidate,
            "runtime": "onnxruntime",
            "graph_optimizations": "disabled",
            "mode": self.mode,
            "deterministic_checked": self.deterministic_checked,
            "input_source": self.input_source,
            "seed": self.seed,
            "batch": self.batch,
            "samples": self.samples,
            "batches": self.batches,
            "batch_rows": self.batch_rows,
            "tensor_groups": self.groups,
            "inputs": self.inputs,
            "random_inputs": list(self.random_inputs),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "outputs": outputs,
            "tensors_compared": len(self.layers),
            "first_failing_tensor": None if first is None else first.name,
            "tensors": [item.to_dict() for item in self.layers],
            "only_in_reference": list(self.only_in_reference),
            "only_in_candidate": list(self.only_in_candidate),
        }


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


def _error_text(item: TensorComparison) -> str:
    if item.reason is not None:
        return item.reason
    relation = "<=" if item.max_abs <= item.tol else ">"
    text = (f"max abs error {item.max_abs:.3g} (relative {item.rel:.3g} of max|ref| {item.scale:.3g})"
            f" {relation} tol {item.tol:.3g} (rtol {item.rtol:.3g}, atol {item.atol:.3g})")
    if item.nan_mismatch:
        text += f", {item.nan_mismatch} NaN in only one model"
    return text


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


# ----------------------------------------------------------------------------- comparison


def compare_arrays(name: str, a: np.ndarray, b: np.ndarray, *, rtol: float | None = None,
                   atol: float | None = None) -> OutputComparison:
    """Compare reference ``a`` with candidate ``b`` under the rules of the module docstring."""
    a = np.asarray(a)
    b = np.asarray(b)
    default_rtol, default_atol = default_tolerances(a.dtype)
    floating = default_rtol > 0.0
    rtol = default_rtol if rtol is None or not floating else float(rtol)
    atol = default_atol if atol is None or not floating else float(atol)

    def result(**values: Any) -> OutputComparison:
        base = dict(name=name, dtype=a.dtype.name, shape=tuple(int(d) for d in a.shape), rtol=rtol,
                    atol=atol, size=int(a.size), max_abs=0.0, max_rel=0.0, scale=0.0, tol=atol,
                    n_exceed=0, nan_mismatch=0, ok=True)
        base.update(values)
        return OutputComparison(**base)

    if a.shape != b.shape:
        return result(ok=False, n_exceed=int(a.size), max_abs=math.inf, max_rel=math.inf,
                      reason=f"shape {b.shape} differs from the reference's {a.shape}")
    if a.dtype != b.dtype:
        return result(ok=False, n_exceed=int(a.size), max_abs=math.inf, max_rel=math.inf,
                      reason=f"dtype {b.dtype.name} differs from the reference's {a.dtype.name}")
    if not floating:
        return _compare_exact(a, b, result)
    return _compare_float(a.astype(np.float64), b.astype(np.float64), rtol, atol, result)


def _compare_exact(a: np.ndarray, b: np.ndarray, result: Callable[..., OutputComparison]) -> OutputComparison:
    differ = a != b
    n_exceed = int(np.count_nonzero(differ))
    max_abs = 0.0
    if n_exceed and a.dtype.kind in "iub":
        wide_a = a.astype(np.float64)
        wide_b = b.astype(np.float64)
        max_abs = float(np.max(np.abs(wide_a - wide_b)))
    elif n_exceed:
        max_abs = math.inf
    return result(ok=n_exceed == 0, n_exceed=n_exceed, max_abs=max_abs, max_rel=math.inf if n_exceed else 0.0)


def _compare_float(a: np.ndarray, b: np.ndarray, rtol: float, atol: float,
                   result: Callable[..., OutputComparison]) -> OutputComparison:
    nan_a = np.isnan(a)
    nan_b = np.isnan(b)
    nan_mismatch = int(np.count_nonzero(nan_a != nan_b))
    comparable = ~(nan_a | nan_b)
    with np.errstate(invalid="ignore", over="ignore"):
        # Equal values (including equal infinities, whose difference would be NaN) differ by 0.
        diff = np.where(comparable & (a != b), np.abs(a - b), 0.0)
    abs_a = np.abs(a)
    finite_a = np.isfinite(a)
    scale = float(np.max(abs_a[finite_a])) if finite_a.any() else 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    nonzero = comparable & (a != 0) & finite_a
    with np.errstate(divide="ignore", invalid="ignore"):
        max_rel = float(np.max(diff[nonzero] / abs_a[nonzero])) if nonzero.any() else 0.0
    # An infinite reference matched by anything else: the bound atol + rtol * inf would admit any
    # value, so such elements count as exceeding, with an infinite relative error.
    inf_mismatch = int(np.count_nonzero(comparable & ~finite_a & (a != b)))
    if inf_mismatch:
        max_rel = math.inf
    with np.errstate(invalid="ignore"):
        n_exceed = int(np.count_nonzero(finite_a & (diff > atol + rtol * abs_a))) + nan_mismatch + inf_mismatch
    tol = atol + rtol * scale
    ok = nan_mismatch == 0 and max_abs <= tol
    return result(ok=ok, n_exceed=n_exceed, max_abs=max_abs, max_rel=max_rel, scale=scale, tol=tol,
                  nan_mismatch=nan_mismatch)


# ----------------------------------------------------------------------------- memory


def _output_bytes(model: onnx.ModelProto, names: Sequence[str], batch: int) -> int:
    """Bytes of the outputs ``names`` when every symbolic dimension is ``batch`` (0 if unknown)."""
    total = 0
    by_name = {value.name: value for value in model.graph.output}
    for name in names:
        tensor_type = by_name[name].type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        try:
            itemsize = np_dtype(tensor_type.elem_type, name).itemsize
        except BnfoldError:
            continue
        count = 1
        for dim in tensor_type.shape.dim:
            count *= dim.dim_value if dim.HasField("dim_value") else batch
        total += count * itemsize
    return total


def _check_memory(input_bytes: int, output_bytes: int, max_bytes: int, batch: int, label: str,
                  shapes: Mapping[str, tuple[int, ...]]) -> None:
    # Inputs are held once; each shared output once per model, plus float64 copies of both for
    # the comparison: about 4x the outputs' bytes for float32.
    need = input_bytes + 4 * output_bytes
    if need > max_bytes:
        described = ", ".join(f"'{name}' {list(shape)}" for name, shape in list(shapes.items())[:3])
        raise BnfoldError(
            f"{label}: verification would need about {_human(need)} for inputs ({described}) and"
            f" outputs at batch {batch} (limit {_human(max_bytes)}); lower --batch or raise --max-memory"
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ----------------------------------------------------------------------------- running


def _check_options(batch: int, threads: int, rtol: float | None, atol: float | None, max_bytes: int) -> None:
    if int(batch) < 1:
        raise BnfoldError(f"batch must be at least 1, got {batch}")
    if int(threads) < 1:
        raise BnfoldError(f"threads must be at least 1, got {threads}")
    if int(max_bytes) < 1:
        raise BnfoldError(f"max memory must be positive, got {max_bytes}")
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BnfoldError(f"{label} must be a finite number >= 0, got {value}")


# Samples run twice to check determinism: two, so that a BN in training mode sees a batch with
# a spread (one sample would make it output beta alone) while the check stays a small share of
# the time.
_DETERMINISM_ROWS = 2


# Models larger than this are not copied to expose their tensors (a second copy of several GB of
# weights): the outputs are added to the model for the time it takes to create the session.
_COPY_LIMIT = 256 * 1024**2


def _exposed_in_place(model: onnx.ModelProto, names: Sequence[str], label: str, threads: int) -> Any:
    """A session of ``model`` also outputting ``names``; ``model`` is left as it was."""
    before = len(model.graph.output)
    present = {value.name for value in model.graph.output}
    try:
        for name in names:
            if name not in present:
                present.add(name)
                model.graph.output.add().name = name
        return _session(model, label, threads)
    finally:
        del model.graph.output[before:]


@dataclass
class _Model:
    """One side of the comparison: its model, label, session and the tensors the session outputs."""

    model: onnx.ModelProto
    label: str
    file: Path | None = None  # the file holding the model's external data (`runtime.load_for_session`)
    sess: Any = None
    order: list[str] = field(default_factory=list)  # tensor-typed outputs of the session, topological
    per_row: dict[str, float] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)  # tensors whose size onnxruntime does not know

    def open(self, layers: bool, threads: int) -> None:
        graph_outputs = [value.name for value in self.model.graph.output]
        names = list(dict.fromkeys([*computed_tensors(self.model), *graph_outputs])) if layers else graph_outputs
        if not layers:
            self.sess = _session(self.model, self.label, threads, path=self.file)
        elif self.file is not None or serialized_size(self.model) < _COPY_LIMIT:
            # With its data on disk the model is small: expose a copy, onnxruntime reads the data.
            self.sess = _session(expose(self.model, names), self.label, threads, path=self.file)
        else:
            self.sess = _exposed_in_place(self.model, names, self.label, threads)
        sizes, self.uncertain = tensor_bytes(self.sess, 1)
        self.per_row = {name: float(size) for name, size in sizes.items()}
        self.order = [name for name in names if name in self.per_row]

    def check_deterministic(self, feeds: FeedPlan, budget: float, describe: Callable[[float], str]) -> None:
        """Run the first samples (the whole batch when it cannot be split) twice; refuse if they differ."""
        rows, sample = self._first_samples(feeds)
        plan = plan_runs(self.order, self.per_row, rows=rows, splittable=False, budget=budget, describe=describe)
        check_deterministic(self.sess, self.order, sample, self.label, groups=plan.groups)

    def measure(self, feeds: FeedPlan, budget: float, describe: Callable[[float], str]) -> None:
        """Measure, on the first samples, the tensors whose dimensions onnxruntime does not know."""
        rows, sample = self._first_samples(feeds)
        measure = [name for name in self.order if name in self.uncertain]
        for group in plan_runs(measure, self.per_row, rows=rows, splittable=False, budget=budget,
                               describe=describe).groups:
            for name, value in zip(group, _run(self.sess, group, sample, self.label)):
                self.per_row[name] = max(self.per_row[name], np.asarray(value).nbytes / max(rows, 1))

    @staticmethod
    def _first_samples(feeds: FeedPlan) -> tuple[int, dict[str, np.ndarray]]:
        rows = min(feeds.rows, _DETERMINISM_ROWS) if feeds.splittable else feeds.rows
        return rows, feeds.chunk(0, rows)


def _memory_message(label: str, feeds: FeedPlan, need_inputs: int, max_bytes: int) -> Callable[[float], str]:
    def describe(need: float) -> str:
        shapes = ", ".join(f"'{name}' {list(array.shape)}" for name, array in list(feeds.feeds.items())[:3])
        return (f"{label}: verification would need about {_human(need_inputs + need)} for inputs ({shapes}) and"
                f" compared tensors (limit {_human(max_bytes)}); lower --batch or raise --max-memory"
                " (or use --outputs-only)")

    return describe


#: Above this many bytes of weights in the two models together, verification keeps one
#: onnxruntime session at a time (the reference's tensors are held while the candidate runs), when
#: those tensors fit in half the memory budget: two sessions of a large model would need twice its
#: size.
ONE_SESSION_BYTES = 1024**3


def _data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their shapes (external data is not read)."""
    total = 0
    for tensor in model.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1
        total += math.prod(tensor.dims) * itemsize
    return total


@dataclass
class _Plan:
    """What the comparison needs, and what it produces (``stats``, ``output_parts``, the run plan)."""

    feeds: FeedPlan
    budget: float
    describe: Callable[[float], str]
    rtol: float | None
    atol: float | None
    shared: list[str]
    layers: bool
    threads: int
    check_determinism: bool
    stats: dict[str, TensorStats] = field(default_factory=dict)
    output_parts: dict[str, list[OutputComparison]] = field(default_factory=dict)
    chunks: list[tuple[int, int]] = field(default_factory=list)
    plan: Any = None

    def prepare(self, side: _Model) -> None:
        side.open(self.layers, self.threads)
        if self.check_determinism:
            side.check_deterministic(self.feeds, self.budget, self.describe)
        side.measure(self.feeds, self.budget, self.describe)

    def start(self, names: list[str], per_row: Mapping[str, float]) -> None:
        for name in self.shared:  # graph outputs that are graph inputs or non-tensors are compared as before
            if name not in names:
                names.append(name)
        self.plan = plan_runs(names, per_row, rows=self.feeds.rows, splittable=self.feeds.splittable,
                              budget=self.budget, describe=self.describe)
        self.stats = {name: TensorStats(name, self.rtol, self.atol) for name in names}
        self.output_parts = {name: [] for name in self.shared}
        self.chunks = self.plan.chunks() if self.feeds.splittable else [(0, self.feeds.rows)]

    def compare(self, group: list[str], ref_values: list, cand_values: list, rows: int) -> None:
        for name, a, b in zip(group, ref_values, cand_values):
            if name in self.output_parts:
                self.output_parts[name].append(compare_arrays(name, a, b, rtol=self.rtol, atol=self.atol))
            self.stats[name].add(a, b, rows, consume=True)


def _compare_side_by_side(ref: _Model, cand: _Model, run: _Plan) -> list[str]:
    """Both sessions open; each batch runs in both and is compared at once."""
    run.prepare(ref)
    run.prepare(cand)
    compared = [name for name in ref.order if name in cand.per_row]
    per_row = {name: max(ref.per_row.get(name, 0.0), cand.per_row.get(name, 0.0)) for name in compared}
    run.start(compared, per_row)
    # The comparison of one run's tensors overlaps onnxruntime's next run (both release the GIL).
    # At most one comparison is pending, so that two runs' tensors are held at a time: the
    # MEMORY_FACTOR of bnfold.layerwise counts them.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-compare") as pool:
        pending = None
        for start, stop in run.chunks:
            chunk = run.feeds.chunk(start, stop)
            for group in run.plan.groups:
                ref_values = _run(ref.sess, group, chunk, ref.label)
                cand_values = _run(cand.sess, group, chunk, cand.label)
                if pending is not None:
                    pending.result()
                pending = pool.submit(run.compare, group, ref_values, cand_values, stop - start)
                del ref_values, cand_values
        if pending is not None:
            pending.result()
    return compared


def _compare_one_session_at_a_time(ref: _Model, cand: _Model, run: _Plan) -> list[str] | None:
    """The reference runs first and its tensors are held; its session is closed before the
    candidate's opens. None (nothing run) when those tensors would not fit in half the budget."""
    wanted = set(computed_tensors(cand.model)) | {value.name for value in cand.model.graph.output}
    run.prepare(ref)
    names = [name for name in ref.order if name in wanted]
    held_bytes = sum(ref.per_row.get(name, 0.0) for name in names) * run.feeds.rows
    if held_bytes > run.budget / 2:
        ref.sess = None
        return None
    run.start(names, ref.per_row)
    held: dict[tuple[int, str], Any] = {}
    for index, (start, stop) in enumerate(run.chunks):
        chunk = run.feeds.chunk(start, stop)
        for group in run.plan.groups:
            for name, value in zip(group, _run(ref.sess, group, chunk, ref.label)):
                held[index, name] = value
    ref.sess = None  # released before the candidate's session is created
    run.prepare(cand)
    compared = [name for name in run.stats if name in cand.per_row or name in run.shared]
    for name in list(run.stats):
        if name not in compared:
            del run.stats[name]
    for index, (start, stop) in enumerate(run.chunks):
        chunk = run.feeds.chunk(start, stop)
        for group in run.plan.groups:
            group = [name for name in group if name in run.stats]
            if group:
                cand_values = _run(cand.sess, group, chunk, cand.label)
                run.compare(group, [held.pop((index, name)) for name in group], cand_values, stop - start)
    return compared


def verify(reference: ModelLike, candidate: ModelLike,
           inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None, *,
           rtol: float | None = None, atol: float | None = None, batch: int = 1, seed: int = 0,
           threads: int = 1, max_bytes: int = DEFAULT_MAX_BYTES,
           names: tuple[str, str] | None = None, outputs_only: bool = False,
           check_determinism: bool = True) -> VerifyReport:
    """Run ``reference`` and ``candidate`` in onnxruntime on the same inputs and compare them layer by layer.

    Parameters
    ----------
    reference, candidate
        `onnx.ModelProto` or path to an ``.onnx`` file (loaded with `bnfold.io.load_model`).
    inputs
        Arrays by graph input name, or the path of an ``.npz`` file holding them; None draws
        random inputs from ``numpy.random.default_rng(seed)`` with symbolic dims set to ``batch``.
        Samples (axis 0 of the inputs whose axis 0 is symbolic) are fed in batches.
    rtol, atol
        Override the dtype defaults (module docstring) for every floating-point tensor.
    threads
        onnxruntime intra-op and inter-op thread count.
    max_bytes
        Keep inputs plus compared tensors under this many bytes (tensors are requested in groups
        and samples fed in batches); refuse (`BnfoldError`) when that is impossible.
    names
        How reports and errors call the two models (default: their paths, or "reference model"
        and "candidate model" for in-memory models).
    outputs_only
        Compare the graph outputs only (the intermediate tensors are not requested).
    check_determinism
        Run each model twice on the first sample and refuse one whose runs differ.

    Returns
    -------
    VerifyReport
        ``.ok`` is True when every tensor compared is within tolerance.

    Raises
    ------
    BnfoldError
        When the models cannot be loaded or run, share no output, take different inputs, the
        given inputs do not match the model, memory does not suffice, or a model is not
        deterministic (two runs on the same input differ).
    """
    _check_options(batch, threads, rtol, atol, max_bytes)
    # Files with external data stay on disk: onnxruntime reads them itself, one at a time.
    ref_model, ref_label, ref_file = _load_for_session(reference, "reference model")
    cand_model, cand_label, cand_file = _load_for_session(candidate, "candidate model")
    if names is not None:
        ref_label, cand_label = names
    specs = unify_inputs(feed_inputs(ref_model, ref_label), feed_inputs(cand_model, cand_label),
                         ref_label, cand_label)

    ref_outputs = [value.name for value in ref_model.graph.output]
    cand_outputs = {value.name for value in cand_model.graph.output}
    shared = [name for name in ref_outputs if name in cand_outputs]
    if not shared:
        raise BnfoldError(
            f"{cand_label} and {ref_label} share no output name (reference outputs: {ref_outputs},"
            f" candidate outputs: {sorted(cand_outputs)})"
        )
    if inputs is None:
        need, shapes = input_bytes(specs, batch)
        # Refused from the shapes alone, before random values are drawn.
        _check_memory(need, _output_bytes(ref_model, shared, 1), max_bytes, batch, ref_label, shapes)
    feeds = plan_feeds(specs, inputs, batch=batch, seed=seed)
    held = sum(int(array.nbytes) for array in feeds.feeds.values())
    _check_memory(held, 0, max_bytes, feeds.rows, ref_label, {name: a.shape for name, a in feeds.feeds.items()})
    budget = max_bytes - held
    describe = _memory_message(ref_label, feeds, held, max_bytes)

    ref = _Model(ref_model, ref_label, ref_file)
    cand = _Model(cand_model, cand_label, cand_file)
    run_plan = _Plan(feeds, budget, describe, rtol, atol, shared, not outputs_only, threads, check_determinism)
    if _data_bytes(ref_model) + _data_bytes(cand_model) > ONE_SESSION_BYTES:
        compared = _compare_one_session_at_a_time(ref, cand, run_plan)
    else:
        compared = None
    if compared is None:
        compared = _compare_side_by_side(ref, cand, run_plan)
    stats, output_parts, chunks, plan = run_plan.stats, run_plan.output_parts, run_plan.chunks, run_plan.plan

    ref_nodes, cand_nodes = producers(ref_model), producers(cand_model)
    layers = [stats[name].result(ref_nodes.get(name, "graph input"), cand_nodes.get(name, "graph input"),
                                 name in output_parts) for name in compared]
    outputs = [merge_comparisons(output_parts[name], feeds.rows if stats[name].batched_shape else None)
               for name in shared]
    report = VerifyReport(
        reference=ref_label,
        candidate=cand_label,
        outputs=outputs,
        inputs=feeds.describe(),
        input_source=feeds.source,
        seed=feeds.seed,
        batch=feeds.rows,
        only_in_reference=[name for name in ref_outputs if name not in cand_outputs],
        only_in_candidate=sorted(cand_outputs - set(ref_outputs)),
        layers=layers,
        mode="outputs" if outputs_only else "layers",
        samples=feeds.rows,
        batches=len(chunks),
        batch_rows=plan.chunk_rows if feeds.splittable else feeds.rows,
        groups=len(plan.groups),
        random_inputs=list(feeds.random),
        notes=list(feeds.notes),
        warnings=list(feeds.warnings),
        deterministic_checked=check_determinism,
    )
    log.info("%s", report.summary())
    return report


# ----------------------------------------------------------------------------- localization


def find_culprits(items: Sequence[str], fails: Callable[[frozenset[str]], bool]) -> list[str]:
    """Find the items responsible for a failure by bisection.

    ``fails(subset)`` answers whether applying only the transformations in ``subset`` (e.g. only
    those BN folds) makes verification fail. Halves that fail on their own are searched
    recursively; when neither half fails alone but the whole does (an interaction), the whole
    group is blamed. Costs about ``2 k log2(n)`` calls of ``fails`` for ``k`` culprits among
    ``n`` items.

    Returns
    -------
    list of str
        Culprits in the order of ``items``; empty if ``fails(all items)`` is False.
    """
    order = {item: index for index, item in enumerate(items)}

    def search(group: list[str]) -> list[str]:
        if len(group) == 1:
            return group
        middle = len(group) // 2
        left, right = group[:middle], group[middle:]
        found = []
        if fails(frozenset(left)):
            found += search(left)
        if fails(frozenset(right)):
            found += search(right)
        return found or group

    group = list(items)
    if not group or not fails(frozenset(group)):
        return []
    return sorted(search(group), key=order.__getitem__)

