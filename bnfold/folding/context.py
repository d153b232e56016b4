"""What every graph of one model shares during a fold: options, names, opsets, report, types."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold.folding.nodes import attr_graphs

if TYPE_CHECKING:
    from bnfold.folding.report import FoldReport

__all__ = ["FoldOptions", "ModelContext"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldOptions:
    """The switches of `bnfold.folding.fold` that patterns may read (``index.options``)."""

    decompose_rest: bool = False
    keep_initializer_inputs: bool = False
    exclude: frozenset[str] = frozenset()


def _graph_names(graph: onnx.GraphProto, names: set[str]) -> None:
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(v.name for v in graph.value_info)
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                _graph_names(sub, names)


class ModelContext:
    """What every graph of one model shares: names, opsets, options, the report, shape info.

    Parameters
    ----------
    model : onnx.ModelProto
        The model being written (the pass's copy).
    options : FoldOptions
    report : FoldReport
    original : onnx.ModelProto, optional
        The input model, when ``model``'s main graph does not hold the initializers (yet).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        options: FoldOptions,
        report: FoldReport,
        *,
        original: onnx.ModelProto | None = None,
    ) -> None:
        self.model = model
        self.original = original if original is not None else model
        self.options = options
        self.report = report
        self.opsets = {imp.domain or "": imp.version for imp in model.opset_import}
        self._names: set[str] | None = None
        self._counter = 0
        self._inferred: dict[str, onnx.TypeProto] | None = None
        #: initializer names that folds stopped using; removed at the end if nothing else uses them
        self.released: set[str] = set()
        self._workspace = np.empty(0, dtype=np.float64)

    @property
    def names(self) -> set[str]:
        """Every tensor name used anywhere in the model (computed once, then kept current)."""
        if self._names is None:
            names: set[str] = set()
            _graph_names(self.model.graph, names)
            names.update(t.name for t in self.original.graph.initializer)
            for function in self.model.functions:
                names.update(function.input)
                names.update(function.output)
                for node in function.node:
                    names.update(node.input)
                    names.update(node.output)
            self._names = names
        return self._names

    def workspace(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 scratch array of ``shape``, reused across folds (valid until the next call)."""
        size = math.prod(shape)
        if self._workspace.size < size:
            self._workspace = np.empty(max(size, 2 * self._workspace.size), dtype=np.float64)
        return self._workspace[:size].reshape(shape)

    def fresh_name(self, hint: str) -> str:
        """A tensor name unused anywhere in the model, derived from ``hint``."""
        names = self.names
        candidate = hint
        while candidate in names or not candidate:
            self._counter += 1
            candidate = f"{hint}_{self._counter}"
        names.add(candidate)
        return candidate

    def inferred_type(self, name: str) -> onnx.TypeProto | None:
        """Type of ``name`` from ONNX shape inference on the input model (run once, lazily)."""
        if self._inferred is None:
            self._inferred = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.original, strict_mode=False)
            except Exception as exc:  # noqa: BLE001 - inference is best effort, on any model it accepts
                log.debug("shape inference failed: %s", exc)
            else:
                graphs = [inferred.graph]
                while graphs:
                    graph = graphs.pop()
                    for vi in (*graph.value_info, *graph.output, *graph.input):
                        self._inferred.setdefault(vi.name, vi.type)
                    for node in graph.node:
                        for attr in node.attribute:
                            graphs.extend(attr_graphs(attr))
        return self._inferred.get(name)
