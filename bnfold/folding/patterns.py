"""The pattern protocol: what a fold pattern returns, and how a plain function becomes one.

A fold is *pattern -> check -> rewrite*. A pattern is any object with

``name: str``
    Short identifier used in logs (e.g. ``"linear-bn"``).
``anchors: frozenset[str]``
    The op types of the nodes it starts from (``{"BatchNormalization"}`` for the BN patterns,
    ``{"Conv", "Gemm", ...}`` for decomposed-BN chains).
``__call__(node, index) -> Rewrite | Skip | None``
    ``None``: the pattern does not apply to ``node`` at all (the next pattern is tried and nothing
    is reported). ``Skip(reason)``: it applies but cannot fold exactly; the reason reaches the
    user's report unless a later pattern folds the node. ``Rewrite``: a complete plan, computed
    without touching the graph; the pass applies it.

Patterns never mutate the graph or the index: they read through the
`bnfold.folding.index.GraphIndex`, reserve the names of new tensors with ``index.fresh_name``,
build new nodes with `bnfold.folding.nodes.replace_node` (or the rebuild of
`bnfold.folding.linear_ops`), and return a `Rewrite` (usually through
`bnfold.folding.finish.finish`). Each pattern module exports its patterns, in the order they are
tried, as ``PATTERNS``; `bnfold.folding.fold_pass` imports the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx

if TYPE_CHECKING:
    from bnfold.folding.index import GraphIndex

__all__ = ["Skip", "ChainSkip", "Invalid", "Rewrite", "Pattern", "FunctionPattern", "pattern"]


@dataclass(frozen=True)
class Skip:
    """A pattern applies to a node but cannot fold it exactly; ``reason`` reaches the report."""

    reason: str


@dataclass(frozen=True)
class ChainSkip(Skip):
    """A decomposed BN (per-channel Mul/Add chain) was recognised but cannot be folded.

    ``node`` is the chain's first scaling node, which names the chain in the report.
    """

    node: onnx.NodeProto | None = None


@dataclass(frozen=True)
class Invalid(Skip):
    """The model is invalid at this node, e.g. BN parameters for 3 channels after a 4-channel Conv.

    Patterns anchored on other ops (decomposed chains) treat it as a `Skip`; for a
    BatchNormalization node the pass raises `BnfoldError` with ``reason`` instead of keeping it.
    """


@dataclass
class Rewrite:
    """A complete, not yet applied, plan for one fold.

    Attributes
    ----------
    into : str or None
        Name of the node that absorbs the BN (reported as "folded into <into>").
    remove : list of NodeProto
        Nodes deleted (the BN, a bias Add, the Mul/Add of a decomposed BN, ...).
    replace : list of (NodeProto, list of NodeProto)
        Each anchor node is replaced by the new nodes, at the anchor's position in the graph (so
        topological order holds if the new nodes read values defined before the anchor and the
        anchor's former consumers come after it).
    constants : dict of str to numpy.ndarray
        New constant tensors, keyed by names reserved with ``index.fresh_name``; written as
        initializers (as Constant nodes inside functions) once, with ``raw_data``.
    tensor_map : dict of str to list of str
        Original tensor name -> every new tensor computed from it, for the report (the policy of
        `bnfold.folding.finish`).
    status : {"folded", "decomposed"}
    subnormals : int
        Values flushed to zero by `bnfold.folding.casting.cast_folded` while building this plan.
    bn : NodeProto or None
        The node reported on; defaults to the anchor node the pattern was called with.
    """

    into: str | None
    remove: list[onnx.NodeProto] = field(default_factory=list)
    replace: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    tensor_map: dict[str, list[str]] = field(default_factory=dict)
    status: str = "folded"
    subnormals: int = 0
    bn: onnx.NodeProto | None = None


class Pattern(Protocol):
    """See the module docstring."""

    name: str
    anchors: frozenset[str]

    def __call__(self, node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None: ...


@dataclass(frozen=True)
class FunctionPattern:
    """A `Pattern` made from a plain function ``func(node, index)``."""

    name: str
    anchors: frozenset[str]
    func: Callable[[onnx.NodeProto, GraphIndex], Rewrite | Skip | None]

    def __call__(self, node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None:
        return self.func(node, index)


def pattern(name: str, *anchors: str) -> Callable[[Callable], FunctionPattern]:
    """Decorator turning ``func(node, index)`` into a `FunctionPattern` anchored on ``anchors``."""

    def wrap(func: Callable) -> FunctionPattern:
        return FunctionPattern(name=name, anchors=frozenset(anchors), func=func)

    return wrap
