"""NumPy model -> ONNX inference graph, unfolded (faithful) or with BN folded at export time.

For a `bnfold.nn.Sequential` of Dense, BatchNorm, ReLU and LeakyReLU layers acting on ``(N, C)``
activations, the graph has one input ``"input"`` of shape ``(N, in_features)`` (``N`` symbolic)
and one output ``"logits"``. Layer ``i`` becomes:

==============  ==================================  =========================================
layer           unfolded                            folded (``fold=True``)
==============  ==================================  =========================================
Dense, no bias  ``MatMul(x, W)``                    ``MatMul(x, W)`` (no BN after it)
Dense, bias     ``Gemm(x, W, b)``                   ``Gemm(x, W, b)``
Dense -> BN     ``... -> BatchNormalization``       ``Gemm(x, W', b')``, `fold_batchnorm`
BN, no Dense    ``BatchNormalization``              ``Mul(x, s) -> Add(., t)``, `bn_affine`
ReLU            ``Relu``                            ``Relu``
LeakyReLU       ``LeakyRelu(alpha)``                ``LeakyRelu(alpha)``
==============  ==================================  =========================================

``W`` is stored as (in, out), so the output channels are axis 1 of the weight (Gemm with
``transB=0``). The BatchNormalization node is in inference mode (``training_mode=0`` from
opset 14) and reads the moving statistics: ``Y = scale * (X - input_mean) / sqrt(input_var +
epsilon) + B`` (ONNX BatchNormalization-9/14/15, channel axis 1). A Keras-convention BN on
``(N, C)`` has ``axis=-1`` and a torch one ``axis=1``: on rank-2 activations both are ONNX's
channel axis 1. With ``center=False`` the layer's ``beta`` is 0 and with ``scale=False`` its
``gamma`` is 1; those are what the graph receives.

ONNX's ``momentum`` attribute is the weight of the old value, ``running = momentum * running +
(1 - momentum) * current`` (BatchNormalization-15): a Keras momentum ``m`` is written as ``m``,
a torch momentum ``m`` as ``1 - m``; torch's cumulative average (``momentum=None``) has no ONNX
equivalent and the attribute is left at its default. It does not affect inference.

Opsets: every opset from `MIN_OPSET` (9) to `max_opset()`, the newest that both the installed
``onnx`` and ``onnxruntime`` accept (onnxruntime's limit is found by building and running a small
exported model, once per process). BatchNormalization is version 9 for opsets 9-13, 14 for
opset 14 and 15 from opset 15. The default is `DEFAULT_OPSET` (17).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding.algebra import bn_affine, check_representable, fold_batchnorm

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "batchnorm_version",
    "max_opset",
    "onnx_max_opset",
    "onnxruntime_max_opset",
    "export_onnx",
    "save_onnx",
]

log = logging.getLogger(__name__)

MIN_OPSET = 9
"""Oldest opset exported: BatchNormalization-9 dropped the ``spatial`` attribute of version 7."""

DEFAULT_OPSET = 17
"""Default opset: widely supported by deployed runtimes, and newer than BatchNormalization-15."""

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "N"

_ONNX_DTYPES = {np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float32): TensorProto.FLOAT,
                np.dtype(np.float64): TensorProto.DOUBLE}


def batchnorm_version(opset: int) -> int:
    """BatchNormalization version in effect at ``opset``: 9 (opsets 9-13), 14, or 15 (15+)."""
    if opset >= 15:
        return 15
    if opset == 14:
        return 14
    return 9


def onnx_max_opset() -> int:
    """Newest default-domain opset the installed ``onnx`` knows."""
    return int(onnx.defs.onnx_opset_version())


@functools.lru_cache(maxsize=None)
def onnxruntime_max_opset() -> int:
    """Newest opset (up to `onnx_max_opset`) at which onnxruntime loads and runs an exported model.

    onnxruntime has no public query for this, so a small Dense -> BN -> ReLU -> Dense model is
    exported at each opset from the newest down, and the first one onnxruntime runs wins.
    """
    import onnxruntime as ort

    from bnfold.nn.batchnorm import BatchNorm
    from bnfold.nn.layers import Dense, ReLU
    from bnfold.nn.model import Sequential

    rng = np.random.default_rng(0)
    probe = Sequential([Dense(2, 2, use_bias=False, rng=rng), BatchNorm(2), ReLU(), Dense(2, 2, rng=rng)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    x = np.ones((1, 2), dtype=np.float32)
    for opset in range(onnx_max_opset(), DEFAULT_OPSET - 1, -1):
        model = _build(probe, fold=False, opset=opset, source=None)
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            session.run(None, {INPUT_NAME: x})
        except Exception as exc:
            log.debug("onnxruntime %s rejects opset %d: %s", ort.__version__, opset, exc)
            continue
        return opset
    return DEFAULT_OPSET


def max_opset() -> int:
    """Newest opset `export_onnx` writes: the newest both onnx and onnxruntime accept."""
    return min(onnx_max_opset(), onnxruntime_max_opset())


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return min(DEFAULT_OPSET, onnx_max_opset())
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise BnfoldError(f"opset must be an integer, got {opset!r}")
    opset = int(opset)
    # Up to the default, every supported onnx/onnxruntime pair accepts the opset: no probe needed.
    newest = onnx_max_opset() if opset <= DEFAULT_OPSET else max_opset()
    if not MIN_OPSET <= opset <= newest:
        raise BnfoldError(
            f"opset {opset} is not supported: bnfold exports opsets {MIN_OPSET} to {max_opset()}"
            f" (the newest accepted by both onnx {onnx.__version__} and the installed onnxruntime)"
        )
    return opset


class _GraphBuilder:
    """Collects nodes and initializers; names follow the layer index (checkpoint keys)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=self.dtype), name))
        return name

    def node(self, op_type: str, inputs: list[str], name: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attributes))
        return name


def _channel_axis_ok(layer: Any) -> bool:
    # Activations are (N, C): Keras's axis -1 and torch's axis 1 are both ONNX's channel axis 1.
    return int(layer.axis) in (1, -1)


def _bn_parameters(layer: Any) -> dict[str, np.ndarray]:
    channels = int(layer.num_features)
    gamma = np.asarray(layer.gamma, dtype=np.float64) if layer.scale else np.ones(channels)
    beta = np.asarray(layer.beta, dtype=np.float64) if layer.center else np.zeros(channels)
    return {"gamma": gamma, "beta": beta, "moving_mean": np.asarray(layer.moving_mean, dtype=np.float64),
            "moving_var": np.asarray(layer.moving_var, dtype=np.float64)}


def _onnx_momentum(layer: Any) -> float | None:
    if layer.momentum is None:
        return None
    return float(layer.momentum) if layer.convention == "keras" else 1.0 - float(layer.momentum)


def _emit_dense(builder: _GraphBuilder, index: int, layer: Any, x: str) -> str:
    weight = builder.constant(f"{index}.weight", layer.weight)
    if layer.bias is None:
        return builder.node("MatMul", [x, weight], f"dense_{index}")
    bias = builder.constant(f"{index}.bias", layer.bias)
    return builder.node("Gemm", [x, weight, bias], f"dense_{index}")


def _emit_batchnorm(builder: _GraphBuilder, index: int, layer: Any, x: str, opset: int) -> str:
    params = _bn_parameters(layer)
    names = [builder.constant(f"{index}.{key}", value) for key, value in params.items()]
    attributes: dict[str, Any] = {"epsilon": float(layer.eps)}
    momentum = _onnx_momentum(layer)
    if momentum is not None:
        attributes["momentum"] = momentum
    if batchnorm_version(opset) >= 14:
        attributes["training_mode"] = 0
    return builder.node("BatchNormalization", [x, *names], f"batchnorm_{index}", **attributes)


def _emit_folded_dense(builder: _GraphBuilder, index: int, dense: Any, bn_index: int, bn: Any, x: str) -> str:
    params = _bn_parameters(bn)
    weight, bias = fold_batchnorm(dense.weight, dense.bias, params["gamma"], params["beta"],
                                  params["moving_mean"], params["moving_var"], float(bn.eps),
                                  axis=1, dtype=np.float64)
    for name, value in (("weight", weight), ("bias", bias)):
        reason = check_representable(value, builder.dtype)
        if reason is not None:
            raise BnfoldError(f"cannot fold BatchNorm layer {bn_index} into Dense layer {index}: {reason}")
    w = builder.constant(f"{index}.weight.folded", weight)
    b = builder.constant(f"{index}.bias.folded", bias)
    return builder.node("Gemm", [x, w, b], f"dense_{index}")


def _emit_decomposed_bn(builder: _GraphBuilder, index: int, layer: Any, x: str) -> str:
    params = _bn_parameters(layer)
    scale, shift = bn_affine(params["gamma"], params["beta"], params["moving_mean"], params["moving_var"],
                             float(layer.eps))
    for value in (scale, shift):
        reason = check_representable(value, builder.dtype)
        if reason is not None:
            raise BnfoldError(f"cannot rewrite BatchNorm layer {index} as Mul + Add: {reason}")
    scaled = builder.node("Mul", [x, builder.constant(f"{index}.scale", scale)], f"batchnorm_{index}_mul")
    return builder.node("Add", [scaled, builder.constant(f"{index}.shift", shift)], f"batchnorm_{index}")


def _layer_kind(layer: Any) -> str:
    from bnfold.nn.batchnorm import BatchNorm
    from bnfold.nn.layers import Dense, LeakyReLU, ReLU

    for kind, cls in (("Dense", Dense), ("BatchNorm", BatchNorm), ("LeakyReLU", LeakyReLU), ("ReLU", ReLU)):
        if isinstance(layer, cls):
            return kind
    raise BnfoldError(f"cannot export layer of type {type(layer).__name__}: bnfold exports Dense, BatchNorm, ReLU, LeakyReLU")


def _check_layers(layers: list[Any]) -> tuple[list[str], int]:
    """Return the layer kinds and the input width; refuse what cannot be exported."""
    if not layers:
        raise BnfoldError("cannot export an empty model (no layers)")
    kinds = [_layer_kind(layer) for layer in layers]
    in_features = width = None
    for index, (kind, layer) in enumerate(zip(kinds, layers)):
        if kind == "BatchNorm" and not _channel_axis_ok(layer):
            raise BnfoldError(
                f"BatchNorm layer {index} normalizes axis {layer.axis}; on (N, C) activations only"
                " the channel axis (1 or -1) can be exported"
            )
        expected = {"Dense": getattr(layer, "in_features", None), "BatchNorm": getattr(layer, "num_features", None)}.get(kind)
        if expected is None:
            continue
        if width is None:
            in_features = width = int(expected)
        if expected != width:
            raise BnfoldError(f"layer {index} ({kind}) expects {expected} features, the layer before produces {width}")
        if kind == "Dense":
            width = int(layer.out_features)
    if in_features is None:
        raise BnfoldError("cannot export a model without Dense or BatchNorm layers (unknown input width)")
    return kinds, in_features


def _model_dtype(layers: list[Any], kinds: list[str]) -> np.dtype:
    for kind, layer in zip(kinds, layers):
        if kind == "Dense":
            dtype = np.dtype(layer.weight.dtype)
            if dtype not in _ONNX_DTYPES:
                raise BnfoldError(f"Dense weights of dtype {dtype} cannot be exported (float16/32/64 only)")
            return dtype
    return np.dtype(np.float32)


def _emit_layers(builder: _GraphBuilder, layers: list[Any], kinds: list[str], *, fold: bool, opset: int) -> str:
    x = INPUT_NAME
    index = 0
    while index < len(layers):
        kind, layer = kinds[index], layers[index]
        next_is_bn = index + 1 < len(layers) and kinds[index + 1] == "BatchNorm"
        if kind == "Dense" and fold and next_is_bn:
            x = _emit_folded_dense(builder, index, layer, index + 1, layers[index + 1], x)
            index += 2
            continue
        if kind == "Dense":
            x = _emit_dense(builder, index, layer, x)
        elif kind == "BatchNorm":
            x = _emit_decomposed_bn(builder, index, layer, x) if fold else _emit_batchnorm(builder, index, layer, x, opset)
        elif kind == "ReLU":
            x = builder.node("Relu", [x], f"relu_{index}")
        else:
            x = builder.node("LeakyRelu", [x], f"leaky_relu_{index}", alpha=float(layer.alpha))
        index += 1
    return x


def _out_features(layers: list[Any], kinds: list[str], in_features: int) -> int:
    width = in_features
    for kind, layer in zip(kinds, layers):
        if kind == "Dense":
            width = layer.out_features
    return int(width)


def _metadata(layers: list[Any], kinds: list[str], *, fold: bool, opset: int, source: str | None) -> dict[str, str]:
    bns = []
    for index, (kind, layer) in enumerate(zip(kinds, layers)):
        if kind != "BatchNorm":
            continue
        bns.append({
            "layer": index,
            "convention": layer.convention,
            "momentum": layer.momentum,
            "onnx_momentum": _onnx_momentum(layer),
            "eps": float(layer.eps),
            "center": bool(layer.center),
            "scale": bool(layer.scale),
            "debias": bool(getattr(layer, "debias", False)),
        })

    def joined(key: str) -> str:
        return ",".join(sorted({str(entry[key]) for entry in bns}))

    props = {
        "bnfold.folded": "true" if fold else "false",
        "bnfold.opset": str(opset),
        "bnfold.bn_convention": joined("convention"),
        "bnfold.bn_momentum": joined("momentum"),
        "bnfold.bn_eps": joined("eps"),
        "bnfold.batchnorm": json.dumps(bns),
    }
    if source is not None:
        props["bnfold.source"] = source
    return props


def _build(model: Any, *, fold: bool, opset: int, source: str | None) -> onnx.ModelProto:
    from bnfold import __version__

    layers = list(model.layers)
    kinds, in_features = _check_layers(layers)
    dtype = _model_dtype(layers, kinds)
    builder = _GraphBuilder(dtype)
    last = _emit_layers(builder, layers, kinds, fold=fold, opset=opset)
    if last == INPUT_NAME:
        raise BnfoldError("cannot export a model whose layers compute nothing")
    builder.nodes[-1].output[0] = OUTPUT_NAME
    elem = _ONNX_DTYPES[dtype]
    graph = helper.make_graph(
        builder.nodes,
        "bnfold_mlp_folded" if fold else "bnfold_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, elem, [BATCH_DIM, in_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, [BATCH_DIM, _out_features(layers, kinds, in_features)])],
        initializer=builder.initializers,
        doc_string="BatchNorm folded into the preceding Dense layers" if fold else "Inference graph, BatchNorm with moving statistics",
    )
    opset_id = helper.make_opsetid("", opset)
    onnx_model = helper.make_model(graph, opset_imports=[opset_id], producer_name="bnfold", producer_version=__version__)
    # The lowest IR version that knows the opset: IR 4 for opset 9, which already allows
    # initializers that are not graph inputs.
    onnx_model.ir_version = helper.find_min_ir_version_for([opset_id])
    helper.set_model_props(onnx_model, _metadata(layers, kinds, fold=fold, opset=opset, source=source))
    return onnx_model


def export_onnx(model_or_checkpoint: Any, *, fold: bool = False, opset: int | None = None) -> onnx.ModelProto:
    """Export a NumPy `Sequential` (or a checkpoint path) to an ONNX inference graph.

    Parameters
    ----------
    model_or_checkpoint : bnfold.nn.Sequential or path
        The model, or a ``.npz`` checkpoint read with `bnfold.nn.checkpoint.load_checkpoint`.
    fold : bool
        Fold each BatchNorm into the Dense layer before it at export time
        (`bnfold.folding.algebra.fold_batchnorm`, float64, cast to the weights' dtype): the graph
        then holds only Gemm/MatMul with one bias each and the activations.
    opset : int, optional
        Default-domain opset, `MIN_OPSET` to `max_opset()`; default `DEFAULT_OPSET`.

    Returns
    -------
    onnx.ModelProto
        Input ``"input"`` (N, in_features) and output ``"logits"`` (N, out_features) in the weights'
        dtype (float32 for bnfold's trainer); passes ``onnx.checker.check_model(full_check=True)``.

    Raises
    ------
    BnfoldError
        Unsupported opset or layer, mismatched widths, a BN on a non-channel axis, or a fold that
        overflows the weights' dtype.
    """
    opset = _check_opset(opset)
    source = None
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        from bnfold.nn.checkpoint import load_checkpoint

        source = Path(model_or_checkpoint).name
        model = load_checkpoint(model_or_checkpoint)
    else:
        model = model_or_checkpoint
    if not hasattr(model, "layers"):
        raise BnfoldError(f"cannot export {type(model).__name__}: expected a bnfold.nn.Sequential or a checkpoint path")
    onnx_model = _build(model, fold=fold, opset=opset, source=source)
    onnx.checker.check_model(onnx_model, full_check=True)
    log.info("exported %d layers to ONNX opset %d (%s)", len(model.layers), opset, "folded" if fold else "unfolded")
    return onnx_model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite: bool = False,
              inputs: tuple = ()) -> Path:
    """Write ``model`` to ``path`` atomically; refuse an existing file unless ``overwrite``.

    ``inputs`` are paths the output must not coincide with (e.g. the checkpoint).
    """
    from bnfold.io import check_output_path, save_model

    path = check_output_path(path, overwrite=overwrite, inputs=inputs)
    save_model(model, path)
    return path
