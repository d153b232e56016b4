"""Tensor-by-tensor comparison of two models, streamed over batches of samples.

Every tensor both models compute under the same name is compared, in the reference's topological
order, with the bound outputs have (``max|a - b| <= atol + rtol * max|a|``, the dtype defaults of
`bnfold.runtime.default_tolerances`). A folded node keeps the output name of the BN it absorbed,
so each fold is checked where it happens, not only through whatever reaches the outputs.

Memory: the intermediate tensors are requested in groups, and the samples fed in batches of rows,
so that inputs plus about four times the requested tensors' bytes (both models' values and the
comparison's temporaries) stay under the limit. Each model has one onnxruntime session, which
outputs every tensor; each run requests one group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.runtime import default_tolerances, np_dtype

__all__ = [
    "MAX_ROWS", "MEMORY_FACTOR", "TARGET_BYTES", "Plan", "TensorComparison", "TensorStats", "plan_runs", "producers",
    "tensor_bytes",
]

log = logging.getLogger(__name__)

MEMORY_FACTOR = 4
"""Bytes held per byte of a requested tensor: both models' values plus the comparison's temporaries."""

MAX_ROWS = 64
"""Largest batch of samples per run: beyond it onnxruntime gains nothing and memory grows."""

TARGET_BYTES = 128 * 1024**2
"""Batches are cut so that one run returns about this much (the requested tensors of one model):
larger batches ran slower per sample, in onnxruntime and in the comparison (MobileNetV2 with every
tensor requested: 1.9 s per 32 samples at 8 rows per batch, 1.4 s at 2)."""


@dataclass
class TensorComparison:
    """How one tensor of the candidate compares with the reference's, over every sample.

    ``max_abs`` is ``max|a - b|``, ``scale`` is ``max|a|`` over finite ``a``, ``tol`` is
    ``atol + rtol * scale``, ``rel`` is ``max_abs / scale``; ``reference_node`` and
    ``candidate_node`` name the nodes that produce the tensor (``"Conv 'conv3'"``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    scale: float
    rtol: float
    atol: float
    tol: float
    nan_mismatch: int
    ok: bool
    reference_node: str
    candidate_node: str
    output: bool = False
    reason: str | None = None

    @property
    def rel(self) -> float:
        """``max_abs / scale`` (``max_abs`` itself when the reference is all zero)."""
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    def line(self) -> str:
        """``tensor 'h' (float32, 4x8), Conv 'c' in the reference, Conv 'c' in the candidate: ...``."""
        shape = "x".join(str(d) for d in self.shape) or "scalar"
        head = (f"tensor '{self.name}' ({self.dtype}, {shape}), {self.reference_node} in the reference,"
                f" {self.candidate_node} in the candidate: ")
        if self.reason is not None:
            return head + f"FAILED: {self.reason}"
        relation = "<=" if self.max_abs <= self.tol else ">"
        text = (f"max abs error {self.max_abs:.3g} {relation} tol {self.tol:.3g} (atol {self.atol:.3g} + rtol"
                f" {self.rtol:.3g} * max|ref| {self.scale:.3g}), relative error {self.rel:.3g}")
        if self.nan_mismatch:
            text += f", {self.nan_mismatch} NaN in only one model"
        return head + text + (": ok" if self.ok else ": FAILED")

    def to_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | str:
            return value if math.isfinite(value) else str(value)

        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "output": self.output,
                "reference_node": self.reference_node, "candidate_node": self.candidate_node,
                "max_abs": number(self.max_abs), "rel": number(self.rel), "scale": number(self.scale),
                "rtol": self.rtol, "atol": self.atol, "tol": number(self.tol), "nan_mismatch": self.nan_mismatch,
                "ok": self.ok, "reason": self.reason}


@dataclass
class TensorStats:
    """Running statistics of one tensor over batches: what `TensorComparison` needs, nothing more."""

    name: str
    rtol: float | None
    atol: float | None
    dtype: str = ""
    shape: tuple[int, ...] = ()
    rows: int = 0
    batched_shape: bool = True
    max_abs: float = 0.0
    scale: float = 0.0
    nan_mismatch: int = 0
    reason: str | None = None
    exact: bool = False

    def add(self, a: np.ndarray, b: np.ndarray, rows: int, *, consume: bool = False) -> None:
        """Fold the values of one batch of ``rows`` samples into the statistics.

        ``consume=True`` lets the comparison overwrite ``b`` (no temporary array).
        """
        a, b = np.asarray(a), np.asarray(b)
        if not self.dtype:
            self.dtype, self.shape = a.dtype.name, tuple(int(d) for d in a.shape)
        self.batched_shape = self.batched_shape and a.ndim > 0 and a.shape[0] == rows
        self.rows += rows
        if self.reason is not None:
            return
        if a.shape != b.shape:
            self.reason = f"shape {b.shape} differs from the reference's {a.shape}"
        elif a.dtype != b.dtype:
            self.reason = f"dtype {b.dtype.name} differs from the reference's {a.dtype.name}"
        elif default_tolerances(a.dtype)[0] == 0.0:
            self.exact = True
            self._add_exact(a, b)
        else:
            self._add_float(a, b, consume)

    def _add_exact(self, a: np.ndarray, b: np.ndarray) -> None:
        differ = a != b
        if differ.any():
            wide = a.dtype.kind in "iub"
            self.max_abs = max(self.max_abs, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                               if wide else math.inf)

    def _add_float(self, a: np.ndarray, b: np.ndarray, consume: bool) -> None:
        if a.dtype.itemsize < 4:  # float16 / bfloat16: compute in float32
            a, b = a.astype(np.float32), b.astype(np.float32)
            consume = True
        if a.size == 0:
            return
        scale = float(max(a.max(), -a.min()))  # NaN or inf when a has any
        if not math.isfinite(scale):
            max_abs, scale, nan_mismatch = _careful(a.astype(np.float64), b.astype(np.float64))
            self.nan_mismatch += nan_mismatch
        else:
            # In the tensor's own dtype: the rounding of a - b (relative 2**-24 in float32) is far
            # below any tolerance. With a finite, a - b is NaN exactly where b is NaN and
            # infinite where b is, so the difference alone tells the rest.
            with np.errstate(invalid="ignore", over="ignore"):  # b's NaN and infinities: handled below
                diff = np.subtract(a, b, out=b if consume and b.flags.writeable else None)
            max_abs = float(max(diff.max(), -diff.min()))
            if not math.isfinite(max_abs):
                nan = np.isnan(diff)
                self.nan_mismatch += int(np.count_nonzero(nan))
                max_abs = float(np.max(np.abs(diff[~nan]))) if not nan.all() else 0.0
        self.max_abs = max(self.max_abs, max_abs)
        self.scale = max(self.scale, scale)

    def result(self, reference_node: str, candidate_node: str, output: bool) -> TensorComparison:
        default_rtol, default_atol = default_tolerances(self.dtype or "float32")
        exact = self.exact or default_rtol == 0.0
        rtol = 0.0 if exact else (default_rtol if self.rtol is None else self.rtol)
        atol = 0.0 if exact else (default_atol if self.atol is None else self.atol)
        shape = self.shape
        if self.batched_shape and shape:
            shape = (self.rows, *shape[1:])
        tol = atol + rtol * self.scale
        ok = self.reason is None and self.nan_mismatch == 0 and self.max_abs <= tol
        return TensorComparison(name=self.name, dtype=self.dtype, shape=shape, max_abs=self.max_abs,
                                scale=self.scale, rtol=rtol, atol=atol, tol=tol, nan_mismatch=self.nan_mismatch,
                                ok=ok, reference_node=reference_node, candidate_node=candidate_node, output=output,
                                reason=self.reason)


def _careful(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """``(max_abs, scale, nan_mismatch)`` with NaN and infinities (rules of `compare_arrays`)."""
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    comparable = ~(nan_a | nan_b)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(comparable & (a != b), np.abs(a - b), 0.0)
    finite_a = np.isfinite(a)
    scale = float(np.max(np.abs(a[finite_a]))) if finite_a.any() else 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    # An infinite reference matched by anything else exceeds any bound.
    if np.any(comparable & ~finite_a & (a != b)):
        max_abs = math.inf
    return max_abs, scale, int(np.count_nonzero(nan_a != nan_b))


def producers(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> ``"OpType 'node name'"`` of the main-graph node that computes it."""
    found = {}
    for index, node in enumerate(model.graph.node):
        label = f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} (node #{index})"
        for name in node.output:
            if name:
                found.setdefault(name, label)
    return found


def tensor_bytes(sess, rows: int) -> tuple[dict[str, int], set[str]]:
    """Estimated bytes of each tensor output of onnxruntime session ``sess`` at ``rows`` samples.

    The first named (symbolic) dimension counts ``rows``; other unknown dimensions count 1, and the names
    of tensors with such dimensions (or no known shape) are returned as uncertain, to be measured.
    """
    sizes, uncertain = {}, set()
    for value in sess.get_outputs():
        kind = value.type or ""
        if not kind.startswith("tensor("):
            continue
        try:
            itemsize = np_dtype(_ELEMENT_TYPES.get(kind[len("tensor("):-1], 1), value.name).itemsize
        except BnfoldError:
            itemsize = 8
        count, symbolic_seen = 1, False
        if value.shape is None:
            uncertain.add(value.name)
        for dim in value.shape or []:
            if isinstance(dim, int):
                count *= dim
            elif isinstance(dim, str) and not symbolic_seen:  # a named dimension: the batch
                count *= rows
                symbolic_seen = True
            else:  # unknown (None) or a second named dimension
                uncertain.add(value.name)
        sizes[value.name] = count * itemsize
    return sizes, uncertain


_ELEMENT_TYPES = {
    "float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE, "float16": onnx.TensorProto.FLOAT16,
    "bfloat16": onnx.TensorProto.BFLOAT16, "int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
    "int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16, "int32": onnx.TensorProto.INT32,
    "uint32": onnx.TensorProto.UINT32, "int64": onnx.TensorProto.INT64, "uint64": onnx.TensorProto.UINT64,
    "bool": onnx.TensorProto.BOOL,
}


@dataclass
class Plan:
    """Batches of samples and groups of tensors whose runs fit the memory budget."""

    rows: int
    chunk_rows: int
    groups: list[list[str]]
    per_row: dict[str, float] = field(default_factory=dict)

    def chunks(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk_rows, self.rows)) for start in range(0, self.rows, self.chunk_rows)]


def plan_runs(names: Sequence[str], per_row: Mapping[str, float], *, rows: int, splittable: bool,
              budget: float, describe: Callable[[float], str]) -> Plan:
    """Choose the batch size and the tensor groups so that ``MEMORY_FACTOR`` x bytes <= ``budget``.

    ``per_row`` holds each tensor's bytes per sample. All tensors in one group at the largest batch
    that fits (up to `MAX_ROWS` and `TARGET_BYTES` per run) is preferred; when even one sample does not hold them all, the
    tensors are split into groups, in order. ``describe(need)`` words the error when one tensor
    alone does not fit.
    """
    returned_per_row = sum(per_row.get(name, 0.0) for name in names)
    if not splittable:
        chunk_rows = rows
    elif returned_per_row <= 0:
        chunk_rows = min(rows, MAX_ROWS)
    else:
        fits = int(budget // (MEMORY_FACTOR * returned_per_row))
        chunk_rows = max(1, min(rows, MAX_ROWS, fits, int(TARGET_BYTES // returned_per_row)))
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0.0
    for name in names:
        need = MEMORY_FACTOR * per_row.get(name, 0.0) * chunk_rows
        if need > budget:
            raise BnfoldError(describe(need))
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0.0
        current.append(name)
        used += need
    if current:
        groups.append(current)
    return Plan(rows=rows, chunk_rows=chunk_rows, groups=groups, per_row=dict(per_row))
