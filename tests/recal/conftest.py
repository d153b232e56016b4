"""Models with BatchNormalization and an independent float64 NumPy evaluator for the recalibration tests.

Test modules get this module through the session fixture ``rk`` (pytest runs with
``--import-mode=importlib``, so conftest modules cannot be imported by name).

The evaluator (`forward64`) implements the few ops these models use directly from the ONNX
operator definitions, in float64, without onnxruntime: it is the reference the float32
onnxruntime passes are checked against. `population64` recomputes every BN's statistics in
graph (topological) order, each over the whole data set at once with np.mean / np.var, every
earlier BN already using its new statistics: what `bnfold recalibrate --method exact` must give.
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _bn(prefix: str, x: str, y: str, channels: int, rng: np.random.Generator, *, mean: float = 0.0,
        var: float = 1.0) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    inits = [
        _init(f"{prefix}.gamma", rng.uniform(0.5, 1.5, channels)),
        _init(f"{prefix}.beta", rng.normal(0, 0.3, channels)),
        _init(f"{prefix}.mean", np.full(channels, mean)),
        _init(f"{prefix}.var", np.full(channels, var)),
    ]
    node = helper.make_node("BatchNormalization", [x, *(i.name for i in inits)], [y], name=prefix, epsilon=1e-5)
    return node, inits


def _model(nodes, inits, x_shape, out: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", *x_shape])],
        [helper.make_tensor_value_info(out, F32, ["N", None])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """x(N,6) -> MatMul -> BN -> Relu -> MatMul -> BN -> Relu -> MatMul -> logits(N,3): 2 levels."""
    nodes, inits = [], [_init("w1", rng.normal(0, 1, (6, 5)) + 0.4), _init("w2", rng.normal(0, 1, (5, 4))),
                        _init("w3", rng.normal(0, 1, (4, 3)))]
    nodes.append(helper.make_node("MatMul", ["x", "w1"], ["h1"]))
    node, more = _bn("bn1", "h1", "b1", 5, rng)
    nodes += [node, helper.make_node("Relu", ["b1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["h2"])]
    inits += more
    node, more = _bn("bn2", "h2", "b2", 4, rng, mean=0.5, var=2.0)
    nodes += [node, helper.make_node("Relu", ["b2"], ["r2"]), helper.make_node("MatMul", ["r2", "w3"], ["logits"])]
    inits += more
    return _model(nodes, inits, [6], "logits")


def cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """x(N,2,6,6) -> Conv3x3 pad1 -> BN -> Relu -> Conv3x3 -> BN -> GlobalAveragePool -> Flatten: 2 levels."""
    inits = [_init("c1", rng.normal(0, 0.5, (4, 2, 3, 3))), _init("c1b", rng.normal(1, 0.5, 4)),
             _init("c2", rng.normal(0, 0.5, (3, 4, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["h1"], pads=[1, 1, 1, 1])]
    node, more = _bn("bn1", "h1", "b1", 4, rng)
    nodes += [node, helper.make_node("Relu", ["b1"], ["r1"]), helper.make_node("Conv", ["r1", "c2"], ["h2"])]
    inits += more
    node, more = _bn("bn2", "h2", "b2", 3, rng, mean=-1.0, var=0.25)
    nodes += [node, helper.make_node("GlobalAveragePool", ["b2"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])]
    inits += more
    return _model(nodes, inits, [2, 6, 6], "logits")


def residual(rng: np.random.Generator) -> onnx.ModelProto:
    """Two branches Conv -> BN meeting in an Add (level 0 twice), then Relu -> Conv -> BN (level 1)."""
    inits = [_init("ca", rng.normal(0, 0.5, (3, 3, 3, 3))), _init("cb", rng.normal(0, 0.5, (3, 3, 1, 1))),
             _init("cc", rng.normal(0, 0.5, (2, 3, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "ca"], ["ha"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "cb"], ["hb"])]
    for prefix, src, dst in [("bna", "ha", "ba"), ("bnb", "hb", "bb")]:
        node, more = _bn(prefix, src, dst, 3, rng)
        nodes.append(node)
        inits += more
    nodes += [helper.make_node("Add", ["ba", "bb"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
              helper.make_node("Conv", ["r", "cc"], ["hc"], pads=[1, 1, 1, 1])]
    node, more = _bn("bnc", "hc", "logits", 2, rng)
    nodes.append(node)
    inits += more
    return _model(nodes, inits, [3, 5, 5], "logits")


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: list[int]) -> np.ndarray:
    """ONNX Conv, stride 1, dilation 1, group 1: cross-correlation over zero-padded x."""
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = w.shape[2:]
    oh, ow = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, :oh, :ow]
    y = np.einsum("nchwij,ocij->nohw", windows, w)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def forward64(model: onnx.ModelProto, x: np.ndarray, overrides: dict | None = None) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` on ``x`` in float64. ``overrides``: BN name -> (mean, var)."""
    overrides = overrides or {}
    env = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    env["x"] = np.asarray(x, np.float64)
    for node in model.graph.node:
        a = [env[n] if n else None for n in node.input]
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        if node.op_type == "MatMul":
            y = a[0] @ a[1]
        elif node.op_type == "Conv":
            y = _conv(a[0], a[1], a[2] if len(a) > 2 else None, list(attrs.get("pads", [0, 0, 0, 0])))
        elif node.op_type == "BatchNormalization":
            gamma, beta, mean, var = a[1:]
            mean, var = overrides.get(node.name, (mean, var))
            shape = (1, -1) + (1,) * (a[0].ndim - 2)
            y = gamma.reshape(shape) * (a[0] - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + attrs.get("epsilon", 1e-5)) + beta.reshape(shape)
        elif node.op_type == "Relu":
            y = np.maximum(a[0], 0)
        elif node.op_type == "Add":
            y = a[0] + a[1]
        elif node.op_type == "GlobalAveragePool":
            y = a[0].mean(axis=(2, 3), keepdims=True)
        elif node.op_type == "Flatten":
            y = a[0].reshape(len(a[0]), -1)
        else:
            raise NotImplementedError(node.op_type)
        env[node.output[0]] = y
    return env


def stats64(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, *range(2, values.ndim))
    return values.mean(axis=axes), values.var(axis=axes)


def population64(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN name -> exact (mean, population var) of its input, earlier BNs already recalibrated."""
    overrides: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            overrides[node.name] = stats64(forward64(model, x, overrides)[node.input[0]])
    return overrides


def data(model: onnx.ModelProto, n: int, rng: np.random.Generator) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return (rng.normal(0.3, 1.2, (n, *dims))).astype(np.float32)


@pytest.fixture(scope="session")
def rk() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        mlp=mlp, cnn=cnn, residual=residual, forward64=forward64, stats64=stats64, population64=population64,
        data=data, F32=F32,
    )
