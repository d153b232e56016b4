"""The checks of `bnfold.inspect` that need no run: one `BNDiagnosis` per BN, from the file alone.

Rules (cited in the code as "rule N"):

1. Every BatchNormalization is visited: main graph, If / Loop / Scan bodies (outer-scope constants
   visible) and model-local functions, through the fold pass's own `GraphIndex`, so that a
   parameter is "constant" exactly when the fold pass would find it constant.
2. ``convert`` column: a dry run of `bnfold.folding.fold` on the model; each BN gets its
   `FoldEntry`'s outcome and reason. A BN inside a branch of an ``If`` that the pass resolved (a
   training switch) gets the entry of its inlined copy, or "removed" if its branch was not taken.
   Entries that are not BatchNormalization nodes are the fold pass's decomposed BNs (per-channel
   Mul / Add chains) and get a `BNDiagnosis` of their own. If the pass refuses the model (an
   invalid BN), that refusal is reported and every BN says so.
3. ``invalid`` (wrong): the fold pass's own validation (`validate_batchnorm`: negative or
   non-finite variance, ``var + eps <= 0``, negative epsilon, parameter shapes), plus epsilon
   == 0 and NaN / infinite gamma, beta or mean.
4. ``never updated`` (wrong): moving mean exactly 0 and moving variance exactly 1 in every
   channel, the initial values in every framework. For a decomposed BN that starts with
   ``Sub(z, mean)`` (Keras 3's export), its mean exactly 0 in every channel (the variance is
   merged into the scale; a trained mean is never exactly 0 everywhere).
5. ``batch statistics`` (wrong) from attributes: ``training_mode=1`` (BatchNormalization-14/15),
   ``is_test=0`` (versions 1 and 6), running mean / variance outputs (versions 7 to 13, where
   they exist only in training mode).
6. Warnings: ``huge fold scale`` (``|gamma| / sqrt(var + eps) >= HUGE_SCALE`` in some channel),
   ``float16`` (a value of the fold, scale / shift or the folded tensors of the dry run,
   overflows float16 or becomes subnormal in it: any value of a scale, shift or bias, at least
   `SUBNORMAL_SHARE` of a weight's), ``dead channels`` (gamma exactly 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.diagnosis.report import BNDiagnosis
from bnfold.errors import BnfoldError
from bnfold.folding.algebra import bn_affine
from bnfold.folding.batchnorm import BatchNormParams, read_batchnorm, validate_batchnorm
from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.index import GraphIndex
from bnfold.folding.nodes import AttributeRef, attr_graphs, get_attr, node_label
from bnfold.folding.patterns import Skip
from bnfold.folding.report import FoldEntry, FoldReport

__all__ = ["diagnose_static", "training_mode_reason", "HUGE_SCALE", "FLOAT16_MAX", "FLOAT16_TINY"]

log = logging.getLogger(__name__)

#: A fold multiplies weights by ``|gamma| / sqrt(var + eps)``; at 1e3 or more a channel's input
#: barely varies (var + eps <= 1e-6 for gamma 1) and the fold amplifies the rounding of everything
#: upstream a thousandfold. With the frameworks' default epsilons (1e-5, 1e-3) and gamma near 1
#: the scale stays below 317.
HUGE_SCALE = 1e3
#: Largest finite float16, and its smallest normal number (2**-14): below it values are subnormal.
FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0**-14
#: Share of a folded weight's values subnormal in float16 from which the float16 warning is given.
SUBNORMAL_SHARE = 0.01

_BN = "BatchNormalization"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PASS_THROUGH = ("Cast", "Identity", "Transpose")


def diagnose_static(model: onnx.ModelProto, *, dry_run: bool = True
                    ) -> tuple[list[BNDiagnosis], str | None, dict[int, BatchNormParams]]:
    """Per-BN diagnoses from the file (rules 1-6), the fold pass's refusal if any (rule 2), and the
    constant parameters of each BN node, keyed by the position of its diagnosis in the list.

    ``dry_run=False`` is ``convert``'s check, before its own fold pass: only the wrong flags
    (training mode, never updated, what the fold pass's validation accepts of invalid), no
    ``convert`` column, no decomposed BNs, no warnings.
    """
    from bnfold.folding import fold

    folded, report, fold_error = None, FoldReport(), None
    if dry_run:
        try:
            folded, report = fold(model)
        except BnfoldError as exc:
            fold_error = str(exc)
    entries = {(entry.graph, entry.bn): entry for entry in report.entries}
    resolved = {path: switch for switch in report.switches for path in switch.ifs}
    inlined = {entry.bn: entry for entry in report.entries}
    folded_tensors = _initializers(folded) if folded is not None else {}
    ctx = ModelContext(model, FoldOptions(), FoldReport())
    diagnoses: list[BNDiagnosis] = []
    parameters: dict[int, BatchNormParams] = {}
    seen: set[tuple[str, str]] = set()
    indexes: dict[str, GraphIndex] = {}
    for index in _indexes(model, ctx):
        indexes[index.path] = index
        for node in index.nodes:
            if node.op_type == _BN and node.domain in _DEFAULT_DOMAINS:
                key = (index.path, node_label(node))
                entry, switch = entries.get(key), resolved.get(index.path.rsplit(".", 1)[0])
                if entry is None and switch is not None:  # rule 2: its If was resolved and inlined
                    entry = inlined.get(node_label(node))
                if entry is not None:
                    seen.add((entry.graph, entry.bn))
                diagnosis, params = _batchnorm(node, index, entry, fold_error, folded_tensors, dry_run)
                if switch is not None and fold_error is None:
                    diagnosis.convert = _switched(diagnosis.convert, entry, switch)
                if params is not None:
                    parameters[len(diagnoses)] = params
                diagnoses.append(diagnosis)
    for key, entry in entries.items():
        if key not in seen and key[0] in indexes:  # rule 2: a decomposed BN of the fold pass
            diagnoses.append(_decomposed(entry, indexes[key[0]]))
    return diagnoses, fold_error, parameters


def _indexes(model: onnx.ModelProto, ctx: ModelContext) -> Iterator[GraphIndex]:
    """Rule 1: an index per body, with the same paths as the fold report."""
    stack = [GraphIndex.for_graph(model.graph, ctx, "main")]
    while stack:
        index = stack.pop(0)
        yield index
        for node in index.nodes:
            for attr in node.attribute:
                for sub in attr_graphs(attr):
                    path = f"{index.path}/{node_label(node)}.{attr.name}"
                    stack.append(GraphIndex.for_graph(sub, ctx, path, parent=index))
    for function in model.functions:
        yield GraphIndex.for_function(function, ctx)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found: dict[str, onnx.TensorProto] = {}
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        found.update((t.name, t) for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend(attr_graphs(attr))
    return found


def _summary(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {"min": float(np.min(values)), "max": float(np.max(values))}


def _switched(text: str, entry: FoldEntry | None, switch) -> str:
    """The ``convert`` column of a BN inside a branch of an ``If`` the fold pass resolved."""
    where = "a constant condition" if switch.input is None else f"'{switch.input}' = {switch.value}"
    if entry is None:
        return f"removed: {where} selects the other branch"
    return f"{text} ({where} resolved first)"


def _convert_text(entry: FoldEntry | None, fold_error: str | None) -> str:
    if fold_error is not None:
        return "refused: the model has an invalid BN"
    if entry is None:
        return "-"
    if entry.status == "folded":
        return f"folded into '{entry.into}'"
    if entry.status == "decomposed":
        return "decomposed (Mul + Add)"
    return f"kept: {entry.reason}"


def training_mode_reason(node: onnx.NodeProto, opset: int) -> str | None:
    """Rule 5: why BN ``node`` normalizes with batch statistics, from its attributes; else None."""
    try:
        if int(get_attr(node, "training_mode", 0)):
            return "training_mode=1: normalizes each batch with its own mean and variance"
        if opset < 7 and not int(get_attr(node, "is_test", 0)):
            return f"is_test=0: BatchNormalization-{1 if opset < 6 else 6} in training mode (batch mean and variance)"
    except AttributeRef:
        return None
    if 7 <= opset < 14 and any(node.output[1:]):
        return f"running mean/variance outputs: BatchNormalization-{opset} in training mode (batch mean and variance)"
    return None


def _epsilon(node: onnx.NodeProto) -> float | None:
    try:
        return float(get_attr(node, "epsilon", 1e-5))  # ONNX BatchNormalization default
    except AttributeRef:
        return None


def _batchnorm(node: onnx.NodeProto, index: GraphIndex, entry: FoldEntry | None, fold_error: str | None,
               folded_tensors: dict[str, onnx.TensorProto], full: bool) -> tuple[BNDiagnosis, BatchNormParams | None]:
    eps = _epsilon(node)
    diagnosis = BNDiagnosis(name=node_label(node), graph=index.path, kind=_BN, epsilon=eps,
                            convert=_convert_text(entry, fold_error), input=node.input[0] if node.input else None)
    reason = training_mode_reason(node, index.opset(""))
    if reason is not None:
        diagnosis.add("batch statistics", reason)
    # Without the dry run (``convert``'s check) the fold pass that follows validates the BN
    # itself, and refuses it with the same message: only what it accepts is checked here.
    invalid = _validation_error(node, index) if full else None
    params = read_batchnorm(node, index)
    if isinstance(params, Skip):
        log.debug("BN %s: parameters not read: %s", diagnosis.name, params.reason)
        if invalid is not None:
            diagnosis.add("invalid", invalid)
        return diagnosis, None
    invalid = invalid or _invalid_values(params, eps)
    if invalid is not None:
        diagnosis.add("invalid", invalid)
    if np.all(params.mean == 0) and np.all(params.var == 1):  # rule 4
        diagnosis.add("never updated", f"moving mean is exactly 0 and moving variance exactly 1 in all"
                      f" {params.channels} channels: the statistics were never updated in training")
    if not full:
        return diagnosis, params
    diagnosis.channels = params.channels
    diagnosis.mean, diagnosis.var = _summary(params.mean), _summary(params.var)
    gamma = np.asarray(params.gamma, dtype=np.float64)
    dead = np.flatnonzero(gamma == 0)
    if dead.size:
        diagnosis.add("dead channels", f"gamma is 0 in {dead.size} of {params.channels} channels (first:"
                      f" channel {int(dead[0])}): those outputs are the constant beta")
    if invalid is None and eps is not None:
        scale, shift = bn_affine(params.gamma, params.beta, params.mean, params.var, eps)
        diagnosis.scale = _summary(np.abs(scale))
        _huge_scale(diagnosis, np.abs(scale), np.asarray(params.var, dtype=np.float64))
        values = {"fold scale": scale, "fold shift": shift}
        if entry is not None and entry.status == "folded":
            values.update(_folded_values(entry, params, index, folded_tensors))
        _float16(diagnosis, values)
    return diagnosis, params


def _validation_error(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Rule 3, the fold pass's own validation, as a message without the node's name."""
    prefix = f"BatchNormalization '{node_label(node)}' in {index.path}: "
    try:
        validate_batchnorm(node, index)
    except BnfoldError as exc:
        message = str(exc)
        return message[len(prefix):] if message.startswith(prefix) else message
    return None


def _invalid_values(params: BatchNormParams, eps: float | None) -> str | None:
    """Rule 3, what the fold pass accepts: epsilon 0, NaN or infinite gamma, beta, mean."""
    if eps is not None and eps == 0:
        return "epsilon is 0: a channel whose variance is 0 divides by zero"
    # The common case, all finite, in one test per vector (flatnonzero costs more per BN).
    vectors = [np.asarray(values) for values in (params.gamma, params.beta, params.mean)]
    if all(values.dtype.kind == "f" for values in vectors) and all(np.isfinite(v).all() for v in vectors):
        return None
    for role, values in (("scale", params.gamma), ("bias", params.beta), ("mean", params.mean)):
        bad = np.flatnonzero(~np.isfinite(np.asarray(values, dtype=np.float64)))
        if bad.size:
            channel = int(bad[0])
            what = {"scale": "gamma", "bias": "beta", "mean": "mean"}[role]
            return f"{what} '{params.names[role]}' channel {channel} is {float(values[channel])!r}"
    return None


def _huge_scale(diagnosis: BNDiagnosis, scale: np.ndarray, var: np.ndarray | None) -> None:
    if not scale.size or float(scale.max()) < HUGE_SCALE:
        return
    channel = int(np.argmax(scale))
    count = int(np.count_nonzero(scale >= HUGE_SCALE))
    where = f" (variance {float(var[channel]):.3g})" if var is not None and var.size == scale.size else ""
    diagnosis.add("huge fold scale", f"|gamma| / sqrt(var + eps) reaches {float(scale[channel]):.3g} in channel"
                  f" {channel}{where}, >= {HUGE_SCALE:g} in {count} channel(s): folding multiplies the weights by it")


@dataclass
class _Magnitudes:
    """What rule 6 needs of a tensor's absolute values, gathered block by block (`add`), so that a
    large folded weight is never whole in memory, nor in float64."""

    size: int = 0
    peak: float = 0.0
    subnormal: int = 0
    smallest: float = math.inf

    @classmethod
    def of(cls, values: np.ndarray) -> _Magnitudes:
        found = cls()
        found.add(values)
        return found

    def add(self, values: np.ndarray) -> None:
        magnitude = np.abs(np.asarray(values, dtype=np.float64))
        if not magnitude.size:
            return
        self.size += magnitude.size
        peak = float(magnitude.max())
        # NaN anywhere makes the peak NaN, as NumPy's max over the whole array would.
        self.peak = peak if math.isnan(peak) else max(self.peak, peak)
        subnormal = magnitude[(magnitude > 0) & (magnitude < FLOAT16_TINY)]
        if subnormal.size:
            self.subnormal += subnormal.size
            self.smallest = min(self.smallest, float(subnormal.min()))


def _folded_values(entry: FoldEntry, params: BatchNormParams, index: GraphIndex,
                   folded: dict[str, onnx.TensorProto]) -> dict[str, _Magnitudes]:
    """The dry run's folded weight and bias of ``entry`` (found through its tensor map). A weight
    element that was already below float16's normal range before folding (or 0) is not the fold's
    doing and is left out."""
    values: dict[str, _Magnitudes] = {}
    # The tensor map lists every new tensor computed from each original: beta reaches only the new
    # bias; gamma reaches the new weight and the new bias.
    from_beta = entry.tensor_map.get(params.names.get("bias", ""), [])
    from_gamma = [new for new in entry.tensor_map.get(params.names.get("scale", ""), []) if new not in from_beta]
    for news, what in ((from_gamma, "folded weight"), (from_beta, "folded bias")):
        new = news[0] if len(news) == 1 else None
        if new is None or new not in folded:
            continue
        shape = tuple(folded[new].dims)
        originals = [index.constant(old) for old, targets in entry.tensor_map.items()
                     if new in targets and old not in params.names.values()]
        same = next((o for o in originals if o is not None and np.shape(o) == shape), None)
        values[f"{what} '{new}'"] = _folded_magnitudes(folded[new], same)
    return values


def _folded_magnitudes(tensor: onnx.TensorProto, original: np.ndarray | None) -> _Magnitudes:
    """`_Magnitudes` of a folded tensor, block by block of rows, its elements whose ``original``
    value is below float16's normal range set to 0. A folded weight the dry run left deferred (a
    model whose data stays on disk, `bnfold.io.mapped.defers`) is computed here, block by block,
    by the fold's own arithmetic (`bnfold.folding.chunked.Deferred.arrays`)."""
    from bnfold.folding.chunked import block_rows
    from bnfold.folding.tensors import tensor_to_array
    from bnfold.io.mapped import deferred, release

    found = _Magnitudes()
    plan = deferred(tensor)
    if plan is not None:
        blocks = plan.arrays()
    else:
        array = tensor_to_array(tensor)
        if array.ndim == 0:
            array = array.reshape(1)
            original = None if original is None else np.reshape(original, (1,))
        rows = block_rows(array.shape)
        blocks = ((start, array[start:start + rows]) for start in range(0, array.shape[0], rows))
    for start, block in blocks:
        block = np.asarray(block, dtype=np.float64)
        if original is not None:
            before = original[start:start + block.shape[0]]
            block = np.where(np.abs(np.asarray(before, dtype=np.float64)) < FLOAT16_TINY, 0.0, block)
            release(before)  # the input's pages under a memory-mapped weight, read once
        found.add(block)
    return found


def _float16(diagnosis: BNDiagnosis, values: dict[str, np.ndarray | _Magnitudes]) -> None:
    """Rule 6. A few subnormal weights among many cost nothing measurable; a subnormal bias or
    shift is added to every output of its channel, and `SUBNORMAL_SHARE` of a weight's values
    means whole channels near zero: those are reported."""
    for what, array in values.items():
        found = array if isinstance(array, _Magnitudes) else _Magnitudes.of(array)
        if not found.size:
            continue
        if found.peak > FLOAT16_MAX:
            diagnosis.add("float16", f"{what} reaches {found.peak:.3g}, which overflows float16 (max {FLOAT16_MAX:g})")
            return
        count = found.subnormal
        weight = what.startswith("folded weight")
        if count and (not weight or count >= SUBNORMAL_SHARE * found.size):
            diagnosis.add("float16", f"{what}: {count} of {found.size} value(s) subnormal in float16 (smallest"
                          f" {found.smallest:.3g} < {FLOAT16_TINY:.3g}): slow on CPUs")
            return


def _decomposed(entry: FoldEntry, index: GraphIndex) -> BNDiagnosis:
    diagnosis = BNDiagnosis(name=entry.bn, graph=entry.graph, kind="decomposed", convert=_convert_text(entry, None))
    chain = _chain(entry.bn, index)
    if chain is None:
        return diagnosis
    diagnosis.channels = chain.channels
    diagnosis.input = chain.nodes[0].input[0]
    mean = _subtracted_mean(chain, index)
    if mean is not None:
        diagnosis.mean = _summary(mean)
        if np.all(mean == 0):  # rule 4, as far as a decomposed BN shows it
            diagnosis.add("never updated", f"the moving mean it subtracts is exactly 0 in all {chain.channels}"
                          " channels (its variance is merged into the scale): the statistics were never updated")
    scale = np.abs(chain.scale)
    diagnosis.scale = _summary(scale)
    _huge_scale(diagnosis, scale, None)
    _float16(diagnosis, {"fold scale": chain.scale, "fold shift": chain.shift})
    return diagnosis


def _subtracted_mean(chain, index: GraphIndex) -> np.ndarray | None:
    """The constant of the chain's first arithmetic node if it is ``Sub(z, mean)`` (Keras 3 writes
    a BN as Sub(moving mean) -> Mul -> Add), as float64 values; else None."""
    first = next((n for n in chain.nodes if n.op_type in ("Add", "Sub", "Mul", "Div")), None)
    if first is None or first.op_type != "Sub" or len(first.input) != 2:
        return None
    value = index.constant(first.input[1])
    if value is None or index.constant(first.input[0]) is not None:
        return None
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _chain(label: str, index: GraphIndex):
    """The fold pass's collapsed chain whose first scaling node is ``label``, or None."""
    from bnfold.folding import decomposed

    node = next((n for n in index.nodes if node_label(n) == label), None)
    if node is None:
        return None
    current = next((name for name in node.input if name and index.constant(name) is None), None)
    producer = index.producer.get(current) if current else None
    while producer is not None and producer.op_type in _PASS_THROUGH:
        producer = index.producer.get(producer.input[0]) if producer.input else None
    if producer is None or producer.op_type not in _LINEAR:
        return None
    # The decomposed pattern's own reading of the producer's layout and of the chain: the same
    # constants and channel axis the fold pass used, not a second interpretation.
    layout = decomposed._producer_layout(producer, index)  # noqa: SLF001
    if layout is None:
        return None
    channels, rank, axis, elem_type = layout
    chain = decomposed.collapse_chain(producer.output[0], index, channels=channels, rank=rank, axis=axis,
                                      elem_type=elem_type)
    if chain is None or node_label(chain.first_scaling) != label:
        return None
    return chain
