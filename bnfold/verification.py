"""Equivalence of two ONNX models, checked by running both in onnxruntime.

Both models run with graph optimizations DISABLED: onnxruntime's own fusions (Conv+BN, MatMul+BN,
...) would otherwise rewrite the reference into something close to the candidate and hide what
the files contain. They get the same inputs: random, drawn from a seeded
`numpy.random.Generator` according to the graph's input shapes and dtypes (symbolic or unknown
dimensions take the size ``batch``), or the user's own arrays.

Verdict, per output shared by name (reference ``a``, candidate ``b``)::

    ok  <=>  max|a - b| <= atol + rtol * max|a|

The bound is scale-aware: a network whose outputs are around 1e5 is judged relative to that
scale. As information, the report also counts the elements with ``|a - b| > atol + rtol * |a|``.
NaN in both at the same place is equal; NaN in only one is a failure; equal infinities are equal.
Integer and bool outputs must match exactly.

Default tolerances by the reference output's dtype (``atol`` is ``rtol / 100``, so that it scales
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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.runtime import (
    InputSpec,
    ModelLike,
    concrete_shape,
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
"""Default cap on the memory that verification may allocate for inputs and outputs (2 GiB)."""

# dtype name -> default (rtol, atol); atol = rtol / 100 (see the module docstring).
_DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-11),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-4),
    "bfloat16": (1e-2, 1e-4),
}


def default_tolerances(dtype: np.dtype | str) -> tuple[float, float]:
    """Return the default ``(rtol, atol)`` for outputs of ``dtype`` (exact for non-floats)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return _DEFAULT_TOLERANCES.get(name, (0.0, 0.0))


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

    def line(self) -> str:
        """One human-readable line: ``logits (float32, 1x10): max abs 2.4e-07 <= tol 1.0e-05 ok``."""
        shape = "x".join(str(d) for d in self.shape) or "scalar"
        head = f"output '{self.name}' ({self.dtype}, {shape}): "
        if self.reason is not None:
            return head + f"FAILED: {self.reason}"
        verdict = "ok" if self.ok else "FAILED"
        relation = "<=" if self.max_abs <= self.tol else ">"
        text = (
            f"max abs error {self.max_abs:.3g} {relation} tol {self.tol:.3g}"
            f" (atol {self.atol:.3g} + rtol {self.rtol:.3g} * max|ref| {self.scale:.3g}),"
            f" max rel error {self.max_rel:.3g}, {self.n_exceed} of {self.size} elements exceed"
            f" the elementwise bound"
        )
        if self.nan_mismatch:
            text += f", {self.nan_mismatch} NaN in only one model"
        return head + text + f": {verdict}"


@dataclass
class VerifyReport:
    """Result of `verify`: one `OutputComparison` per output both models share."""

    reference: str
    candidate: str
    outputs: list[OutputComparison]
    inputs: dict[str, dict[str, Any]]
    input_source: str
    seed: int | None
    batch: int
    only_in_reference: list[str] = field(default_factory=list)
    only_in_candidate: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every shared output is within tolerance."""
        return all(item.ok for item in self.outputs)

    @property
    def max_abs(self) -> float:
        """Largest absolute error over all compared outputs."""
        return max((item.max_abs for item in self.outputs), default=0.0)

    def failed(self) -> list[OutputComparison]:
        """The outputs that are not within tolerance."""
        return [item for item in self.outputs if not item.ok]

    def lines(self) -> list[str]:
        """Human-readable report, one line per output, then the overall verdict."""
        source = f"random inputs (seed {self.seed}, batch {self.batch})"
        if self.input_source != "random":
            source = f"inputs from {self.input_source}"
        out = [f"verified '{self.candidate}' against '{self.reference}' with onnxruntime"
               f" (graph optimizations disabled) on {source}"]
        out += [item.line() for item in self.outputs]
        for name in self.only_in_reference:
            out.append(f"output '{name}' only in the reference: not compared")
        for name in self.only_in_candidate:
            out.append(f"output '{name}' only in the candidate: not compared")
        failed = len(self.failed())
        out.append("equivalent" if self.ok else f"NOT equivalent: {failed} of {len(self.outputs)} outputs differ")
        return out

    def summary(self) -> str:
        """One line: the verdict and the worst output."""
        if self.ok:
            return f"equivalent (max abs error {self.max_abs:.3g} over {len(self.outputs)} outputs)"
        failed = self.failed()
        return f"{len(failed)} of {len(self.outputs)} outputs differ; {failed[0].line()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (floats that are inf/NaN become strings)."""
        outputs = []
        for item in self.outputs:
            entry = asdict(item)
            entry["shape"] = list(item.shape)
            for key in ("max_abs", "max_rel", "scale", "tol"):
                entry[key] = _json_float(entry[key])
            outputs.append(entry)
        return {
            "ok": self.ok,
            "reference": self.reference,
            "candidate": self.candidate,
            "runtime": "onnxruntime",
            "graph_optimizations": "disabled",
            "input_source": self.input_source,
            "seed": self.seed,
            "batch": self.batch,
            "inputs": self.inputs,
            "outputs": outputs,
            "only_in_reference": list(self.only_in_reference),
            "only_in_candidate": list(self.only_in_candidate),
        }


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


# ----------------------------------------------------------------------------- inputs


def _unify_inputs(ref: list[InputSpec], cand: list[InputSpec], ref_label: str,
                  cand_label: str) -> list[InputSpec]:
    ref_names = [spec.name for spec in ref]
    cand_by_name = {spec.name: spec for spec in cand}
    if set(ref_names) != set(cand_by_name):
        raise BnfoldError(
            f"{cand_label} has inputs {sorted(cand_by_name)} but {ref_label} has {sorted(ref_names)};"
            " both models must take the same inputs"
        )
    unified = []
    for spec in ref:
        other = cand_by_name[spec.name]
        if other.dtype != spec.dtype:
            raise BnfoldError(
                f"input '{spec.name}' is {other.dtype.name} in {cand_label} but {spec.dtype.name}"
                f" in {ref_label}"
            )
        if len(other.dims) != len(spec.dims):
            raise BnfoldError(
                f"input '{spec.name}' has rank {len(other.dims)} in {cand_label} but"
                f" {len(spec.dims)} in {ref_label}"
            )
        dims = []
        for mine, theirs in zip(spec.dims, other.dims):
            if isinstance(mine, int) and isinstance(theirs, int) and mine != theirs:
                raise BnfoldError(
                    f"input '{spec.name}' has shape {list(other.dims)} in {cand_label} but"
                    f" {list(spec.dims)} in {ref_label}"
                )
            dims.append(mine if isinstance(mine, int) else theirs)
        unified.append(InputSpec(spec.name, spec.dtype, tuple(dims)))
    return unified


def _check_user_inputs(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec],
                       source: str) -> dict[str, np.ndarray]:
    by_name = {spec.name: spec for spec in specs}
    extra = sorted(set(arrays) - set(by_name))
    if extra:
        raise BnfoldError(f"{source}: array '{extra[0]}' is not an input of the model (inputs: {sorted(by_name)})")
    missing = sorted(set(by_name) - set(arrays))
    if missing:
        raise BnfoldError(f"{source}: no array for model input '{missing[0]}' (inputs: {sorted(by_name)})")
    checked = {}
    for name, spec in by_name.items():
        array = np.asarray(arrays[name])
        if array.dtype != spec.dtype:
            raise BnfoldError(
                f"{source}: array '{name}' has dtype {array.dtype.name}, the model input expects"
                f" {spec.dtype.name}"
            )
        fixed_ok = all(not isinstance(dim, int) or dim == size for dim, size in zip(spec.dims, array.shape))
        if array.ndim != len(spec.dims) or not fixed_ok:
            expected = ["?" if not isinstance(d, int) else d for d in spec.dims]
            raise BnfoldError(
                f"{source}: array '{name}' has shape {list(array.shape)}, the model input expects"
                f" {expected}"
            )
        checked[name] = array
    return checked


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


def verify(reference: ModelLike, candidate: ModelLike,
           inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None, *,
           rtol: float | None = None, atol: float | None = None, batch: int = 1, seed: int = 0,
           threads: int = 1, max_bytes: int = DEFAULT_MAX_BYTES,
           names: tuple[str, str] | None = None) -> VerifyReport:
    """Run ``reference`` and ``candidate`` in onnxruntime on the same inputs and compare outputs.

    Parameters
    ----------
    reference, candidate
        `onnx.ModelProto` or path to an ``.onnx`` file (loaded with `bnfold.io.load_model`).
    inputs
        Arrays by graph input name, or the path of an ``.npz`` file holding them; None draws
        random inputs from ``numpy.random.default_rng(seed)`` with symbolic dims set to ``batch``.
    rtol, atol
        Override the dtype defaults (module docstring) for every floating-point output.
    threads
        onnxruntime intra-op and inter-op thread count.
    max_bytes
        Refuse (`BnfoldError`) when inputs plus outputs would need more memory than this.
    names
        How reports and errors call the two models (default: their paths, or "reference model"
        and "candidate model" for in-memory models).

    Returns
    -------
    VerifyReport
        ``.ok`` is True when every output the two models share is within tolerance.

    Raises
    ------
    BnfoldError
        When the models cannot be loaded or run, share no output, take different inputs, or the
        given inputs do not match the model.
    """
    _check_options(batch, threads, rtol, atol, max_bytes)
    # Files with external data stay on disk: onnxruntime reads them itself, one at a time.
    ref_model, ref_label, ref_file = _load_for_session(reference, "reference model")
    cand_model, cand_label, cand_file = _load_for_session(candidate, "candidate model")
    if names is not None:
        ref_label, cand_label = names
    specs = _unify_inputs(feed_inputs(ref_model, ref_label), feed_inputs(cand_model, cand_label),
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
        shapes = {spec.name: concrete_shape(spec, batch) for spec in specs}
        input_bytes = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
        _check_memory(input_bytes, _output_bytes(ref_model, shared, batch), max_bytes, batch, ref_label, shapes)
        feeds = random_inputs(specs, batch=batch, rng=np.random.default_rng(seed))
        source, used_seed = "random", seed
    else:
        if isinstance(inputs, (str, os.PathLike)):
            from bnfold.io import load_npz

            source = str(inputs)
            arrays = load_npz(inputs)
        else:
            source, arrays = "the given arrays", dict(inputs)
        feeds = _check_user_inputs(arrays, specs, source)
        first = next(iter(feeds.values()), None)
        data_batch = int(first.shape[0]) if first is not None and first.ndim else batch
        input_bytes = sum(int(array.nbytes) for array in feeds.values())
        _check_memory(input_bytes, _output_bytes(ref_model, shared, data_batch), max_bytes, data_batch, ref_label,
                      {name: array.shape for name, array in feeds.items()})
        used_seed = None

    ref_values = _run(_session(ref_model, ref_label, threads, path=ref_file), shared, feeds, ref_label)
    cand_values = _run(_session(cand_model, cand_label, threads, path=cand_file), shared, feeds, cand_label)
    outputs = [compare_arrays(name, a, b, rtol=rtol, atol=atol)
               for name, a, b in zip(shared, ref_values, cand_values)]
    report = VerifyReport(
        reference=ref_label,
        candidate=cand_label,
        outputs=outputs,
        inputs={name: {"dtype": array.dtype.name, "shape": list(array.shape)} for name, array in feeds.items()},
        input_source=source,
        seed=used_seed,
        batch=batch,
        only_in_reference=[name for name in ref_outputs if name not in cand_outputs],
        only_in_candidate=sorted(cand_outputs - set(ref_outputs)),
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
