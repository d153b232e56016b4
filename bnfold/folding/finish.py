"""The last step of every fold: cast the float64 results, name them, and build the `Rewrite`.

Tensor-map policy
-----------------
The report maps each original tensor to **every** new tensor computed from it, in the order the
new tensors are listed. A fold states, for each new tensor, the original tensors it reads
(``sources``); `tensor_map` inverts that. For a fold into the producer ``z = x W + b``::

    W' = W * s            sources W, gamma, var
    b' = beta + (b - mean) * s  sources b, beta, mean, gamma, var

so ``W -> [W']``, ``b -> [b']``, ``gamma -> [W', b']``, ``var -> [W', b']``, ``beta -> [b']``,
``mean -> [b']``; for a fold into the consumer, ``b' = b + W t`` also reads ``W``, so
``W -> [W', b']``. Users can then find every tensor of the output that a checkpoint value reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.batchnorm import BatchNormParams
from bnfold.folding.casting import cast_folded
from bnfold.folding.chunked import Cast, Deferred
from bnfold.folding.index import GraphIndex
from bnfold.folding.patterns import Rewrite, Skip

__all__ = ["FoldedTensors", "cast_and_name", "tensor_map", "bn_sources", "finish"]


@dataclass(frozen=True)
class FoldedTensors:
    """A fold's new weight and bias: their names, values by name, and subnormals flushed."""

    weight: str
    bias: str
    constants: dict[str, np.ndarray]
    subnormals: int


def cast_and_name(index: GraphIndex, weight64: np.ndarray | Cast | Deferred | str, bias64: np.ndarray,
                  elem_type: int, *, weight_name: str, bias_name: str | None, hint: str) -> FoldedTensors | Skip:
    """Cast a fold's float64 weight and bias to ``elem_type`` (`cast_folded`) and reserve fresh
    names for them: ``<weight>_folded`` and ``<bias>_folded`` (``<hint>_bias_folded`` when the
    linear node had no bias).

    A weight computed block by block (`bnfold.folding.chunked.scale_and_cast`) comes already
    cast (`Cast`), to be computed when written (`Deferred`), or as the reason it cannot be cast.
    """
    what = f"folded weight of '{weight_name}'"
    if isinstance(weight64, str):
        return Skip(f"{what}: {weight64}")
    if isinstance(weight64, (Cast, Deferred)):
        cast_w: tuple = (weight64.array if isinstance(weight64, Cast) else weight64, weight64.flushed)
    else:
        cast_w = cast_folded(weight64, elem_type, what)
    if isinstance(cast_w, Skip):
        return cast_w
    cast_b = cast_folded(bias64, elem_type, "folded bias")
    if isinstance(cast_b, Skip):
        return cast_b
    weight = index.fresh_name(f"{weight_name}_folded")
    bias = index.fresh_name(f"{bias_name}_folded" if bias_name else f"{hint}_bias_folded")
    return FoldedTensors(weight=weight, bias=bias, constants={weight: cast_w[0], bias: cast_b[0]},
                         subnormals=cast_w[1] + cast_b[1])


def tensor_map(sources: Mapping[str, Iterable[str | None]]) -> dict[str, list[str]]:
    """Invert ``new tensor -> original tensors it is computed from`` (the policy above).

    Absent originals (None or ``""``, e.g. a missing bias) are left out; each original lists
    each new tensor once, in the order of ``sources``.
    """
    mapping: dict[str, list[str]] = {}
    for new, originals in sources.items():
        for original in originals:
            if original and new not in mapping.setdefault(original, []):
                mapping[original].append(new)
    return mapping


def bn_sources(params: BatchNormParams) -> tuple[list[str], list[str]]:
    """``(scale sources, shift sources)``: ``s = gamma / sqrt(var + eps)`` reads gamma and var;
    ``t = beta - mean * s`` reads beta, mean, gamma and var."""
    names = params.names
    return [names["scale"], names["var"]], [names["bias"], names["mean"], names["scale"], names["var"]]


def finish(
    *,
    into: str | None,
    remove: list[onnx.NodeProto],
    replace: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]],
    constants: dict[str, np.ndarray],
    sources: Mapping[str, Iterable[str | None]],
    subnormals: int,
    status: str = "folded",
    bn: onnx.NodeProto | None = None,
) -> Rewrite:
    """The `Rewrite` of a fold whose new tensors ``constants`` are computed from ``sources``."""
    return Rewrite(
        into=into, remove=remove, replace=replace, constants=constants, tensor_map=tensor_map(sources),
        status=status, subnormals=subnormals, bn=bn,
    )
