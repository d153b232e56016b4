"""Reading and validating the parameters of an inference-mode BatchNormalization node.

ONNX BatchNormalization inputs: ``X, scale (gamma), B (beta), input_mean, input_var``; attribute
``epsilon`` (default 1e-5). `validate_batchnorm` raises for parameters no runtime can use (the
model is invalid); `read_batchnorm` returns them as (C,) arrays, or a `Skip` when they are not
constants or not one value per channel (the BN is then kept, with that reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.algebra import bn_affine
from bnfold.folding.nodes import AttributeRef, get_attr, node_label
from bnfold.folding.patterns import Skip

if TYPE_CHECKING:
    from bnfold.folding.index import GraphIndex

__all__ = ["BN_ROLES", "BatchNormParams", "read_batchnorm", "validate_batchnorm"]

#: BatchNormalization inputs 1 to 4, by role (the keys of ``BatchNormParams.names``).
BN_ROLES = ("scale", "bias", "mean", "var")

#: ONNX BatchNormalization default epsilon.
_DEFAULT_EPSILON = 1e-5


@dataclass
class BatchNormParams:
    """The constant parameters of one inference-mode BatchNormalization node.

    ``gamma``, ``beta``, ``mean``, ``var`` are the stored arrays flattened to (C,), in their
    own dtype; ``names`` maps the roles of `BN_ROLES` to the input tensor names.
    """

    node: onnx.NodeProto
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    names: dict[str, str]

    @property
    def channels(self) -> int:
        return int(self.gamma.shape[0])

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Float64 ``(scale, shift)`` with ``BN(x) = scale * x + shift`` (`algebra.bn_affine`)."""
        return bn_affine(self.gamma, self.beta, self.mean, self.var, self.eps)


def read_batchnorm(node: onnx.NodeProto, index: GraphIndex) -> BatchNormParams | Skip:
    """Constant parameters of BN ``node``, flattened to (C,), or `Skip`."""
    try:
        eps = float(get_attr(node, "epsilon", _DEFAULT_EPSILON))
    except AttributeRef:
        return Skip("epsilon is given by the calling function")
    names = {role: node.input[i + 1] for i, role in enumerate(BN_ROLES) if len(node.input) > i + 1}
    if len(names) < 4:
        return Skip("BatchNormalization has fewer than 5 inputs")
    values = index.constants.fetch(**names)
    if isinstance(values, Skip):
        return Skip(f"BN {values.reason}")
    arrays = {}
    channels = None
    for role in BN_ROLES:
        value = np.asarray(values[role])
        squeezed = value.reshape(-1) if value.ndim >= 1 and value.size == value.shape[0] else None
        if squeezed is None:
            return Skip(f"BN {role} '{names[role]}' has shape {value.shape}, not one value per channel")
        if channels is None:
            channels = squeezed.shape[0]
        elif squeezed.shape[0] != channels:
            return Skip(f"BN parameters disagree on the number of channels ({channels} vs {squeezed.shape[0]})")
        arrays[role] = squeezed
    return BatchNormParams(
        node=node, gamma=arrays["scale"], beta=arrays["bias"], mean=arrays["mean"],
        var=arrays["var"], eps=eps, names=names,
    )


def validate_batchnorm(node: onnx.NodeProto, index: GraphIndex) -> None:
    """Raise `BnfoldError` for a BN whose constant parameters are invalid.

    Invalid: negative or non-finite epsilon, a non-finite or negative variance, or
    ``var + eps <= 0`` (division by zero in ``1 / sqrt(var + eps)``), or parameters that are not
    one value per channel (`_validate_parameter_shapes`). Parameters that are not constant are not
    checked (their values are unknown until run time).
    """
    label = node_label(node)
    try:
        eps = float(get_attr(node, "epsilon", _DEFAULT_EPSILON))
    except AttributeRef:
        eps = None
    if eps is not None and (not math.isfinite(eps) or eps < 0):
        raise BnfoldError(f"BatchNormalization '{label}' in {index.path}: epsilon is {eps:.6g}, must be >= 0")
    if len(node.input) < 5:
        return
    _validate_parameter_shapes(node, index, label)
    var = index.constants.value(node.input[4])
    if var is None:
        return
    var = np.asarray(var, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(var) | (var < 0)
    if eps is not None:
        bad |= (var + eps) <= 0
    if bad.any():
        channel = int(np.flatnonzero(bad)[0])
        raise BnfoldError(
            f"BatchNormalization '{label}' in {index.path}: variance '{node.input[4]}' channel"
            f" {channel} is {float(var[channel])!r} (epsilon {eps:.6g}); variance must be finite and"
            " var + epsilon > 0"
        )


def _validate_parameter_shapes(node: onnx.NodeProto, index: GraphIndex, label: str) -> None:
    """Raise `BnfoldError` unless BN ``node``'s constant parameters have one shape, with C values.

    The ONNX spec (BatchNormalization-9 and later, and ``spatial=1`` before) gives scale, B, mean
    and var the shape (C,), C being dimension 1 of X; with ``spatial=0`` (versions 1 to 7) they
    are (C, D1, ..., Dn). onnxruntime refuses anything else when it loads the model, so such a
    model is invalid input, not a BN to keep: folding or passing it on would hide that.
    """
    try:
        spatial_zero = index.opset("") < 9 and not int(get_attr(node, "spatial", 1))
    except AttributeRef:
        return  # per-channel or per-element is decided by the caller: nothing to check against
    # Declared shapes only: `index.shape` may run shape inference over the whole model, which costs
    # more than the fold. A producer's channel count is checked when the fold reads its weight.
    channels = None
    declared = index.types.get(node.input[0])
    if declared is not None and declared.HasField("tensor_type") and len(declared.tensor_type.shape.dim) > 1:
        dim = declared.tensor_type.shape.dim[1]
        channels = int(dim.dim_value) if dim.HasField("dim_value") else None
    where = f"BatchNormalization '{label}' in {index.path}"
    first: tuple[str, str, tuple[int, ...]] | None = None
    for role, name in zip(BN_ROLES, node.input[1:5]):
        value = index.constants.value(name) if name else None
        if value is None:  # computed at run time: unknown until then
            continue
        shape = tuple(np.shape(value))
        if (len(shape) != 1) if not spatial_zero else (len(shape) < 1):
            raise BnfoldError(f"{where}: {role} '{name}' has shape {shape}, must be (C,): one value per channel")
        if first is not None and shape != first[2]:
            raise BnfoldError(
                f"{where}: {role} '{name}' has shape {shape} but {first[0]} '{first[1]}' has shape {first[2]}"
            )
        if channels is not None and shape[0] != channels:
            raise BnfoldError(
                f"{where}: {role} '{name}' has shape {shape}, {shape[0]} values for the {channels} channels"
                f" of input '{node.input[0]}'"
            )
        first = first or (role, name, shape)
