"""Small hand-built ONNX models for the reliability tests and the fuzzer.

Every builder returns an ``onnx.ModelProto`` built with ``onnx.helper`` only (no bnfold code), so
that the models under test do not depend on the code under test. Parameters are drawn from an
explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "gemm_bn", "conv_bn", "matmul_bn", "bn_params", "runtime_weight_conv_bn", "cycle_model", "random_foldable",
]

OPSET = 17


def bn_params(
    channels: int, rng: np.random.Generator, *, var: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Scale, bias, mean and a positive variance per channel (float32)."""
    return {
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "B": rng.normal(0.0, 0.5, channels).astype(np.float32),
        "mean": rng.normal(0.0, 0.5, channels).astype(np.float32),
        "var": (rng.uniform(0.5, 2.0, channels) if var is None else var).astype(np.float32),
    }


def _bn_node(x: str, y: str, params: dict[str, np.ndarray], prefix: str, eps: float, **attrs) -> tuple:
    names = [f"{prefix}.{key}" for key in ("scale", "B", "mean", "var")]
    inits = [numpy_helper.from_array(params[key], name) for key, name in zip(("scale", "B", "mean", "var"), names)]
    node = helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, epsilon=eps, **attrs)
    return node, inits


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "reliability", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = min(model.ir_version, 8)  # readable by every onnxruntime we support
    return model


def gemm_bn(
    rng: np.random.Generator | None = None,
    *,
    c_in: int = 3,
    c_out: int = 4,
    var: np.ndarray | None = None,
    eps: float = 1e-5,
    batch: int | str = "N",
    training_mode: int | None = None,
    opset: int = OPSET,
    param_shapes: dict[str, tuple[int, ...]] | None = None,
) -> onnx.ModelProto:
    """``x (batch, c_in) -> Gemm(transB=1, bias) -> BatchNormalization 'bn' -> y``."""
    rng = rng or np.random.default_rng(0)
    weight = rng.normal(0.0, 1.0, (c_out, c_in)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, c_out).astype(np.float32)
    params = bn_params(c_out, rng, var=var)
    for key, shape in (param_shapes or {}).items():
        params[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    attrs = {} if training_mode is None else {"training_mode": training_mode}
    bn, bn_inits = _bn_node("z", "y", params, "bn", eps, **attrs)
    if training_mode:
        # onnxruntime requires the running mean and variance outputs in training mode.
        bn.output.extend(["bn.running_mean", "bn.running_var"])
    gemm = helper.make_node("Gemm", ["x", "gemm.W", "gemm.b"], ["z"], name="gemm", transB=1)
    inits = [numpy_helper.from_array(weight, "gemm.W"), numpy_helper.from_array(bias, "gemm.b"), *bn_inits]
    return _model(
        [gemm, bn],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c_out])],
        inits,
        opset,
    )


def conv_bn(
    rng: np.random.Generator | None = None,
    *,
    c_in: int = 2,
    c_out: int = 3,
    size: int = 5,
    var: np.ndarray | None = None,
    eps: float = 1e-5,
) -> onnx.ModelProto:
    """``x (N, c_in, size, size) -> Conv 3x3 pad 1 -> BatchNormalization 'bn' -> Relu -> y``."""
    rng = rng or np.random.default_rng(1)
    weight = rng.normal(0.0, 0.5, (c_out, c_in, 3, 3)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, c_out).astype(np.float32)
    bn, bn_inits = _bn_node("z", "t", bn_params(c_out, rng, var=var), "bn", eps)
    conv = helper.make_node("Conv", ["x", "conv.W", "conv.b"], ["z"], name="conv", pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["t"], ["y"], name="relu")
    inits = [numpy_helper.from_array(weight, "conv.W"), numpy_helper.from_array(bias, "conv.b"), *bn_inits]
    return _model(
        [conv, bn, relu],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, size, size])],
        inits,
    )


def matmul_bn(rng: np.random.Generator | None = None, *, widths: tuple[int, ...] = (4, 5, 3)) -> onnx.ModelProto:
    """A chain ``MatMul -> BN -> Relu`` per layer, widths ``widths[0] -> ... -> widths[-1]``."""
    rng = rng or np.random.default_rng(2)
    nodes, inits, current = [], [], "x"
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        weight = rng.normal(0.0, 1.0 / np.sqrt(c_in), (c_in, c_out)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"mm{i}.W"))
        nodes.append(helper.make_node("MatMul", [current, f"mm{i}.W"], [f"z{i}"], name=f"mm{i}"))
        bn, bn_inits = _bn_node(f"z{i}", f"t{i}", bn_params(c_out, rng), f"bn{i}", 1e-3)
        nodes.append(bn)
        inits.extend(bn_inits)
        current = f"y{i}" if i < len(widths) - 2 else "y"
        nodes.append(helper.make_node("Relu", [f"t{i}"], [current], name=f"relu{i}"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )


def runtime_weight_conv_bn(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """Conv whose weight is computed at run time (``w0 * wscale``, wscale a graph input) -> BN."""
    rng = rng or np.random.default_rng(3)
    weight = rng.normal(0.0, 0.5, (3, 2, 3, 3)).astype(np.float32)
    bn, bn_inits = _bn_node("z", "y", bn_params(3, rng), "bn", 1e-5)
    nodes = [
        helper.make_node("Mul", ["w0", "wscale"], ["W"], name="scale_weight"),
        helper.make_node("Conv", ["x", "W"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        bn,
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5]),
            helper.make_tensor_value_info("wscale", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [numpy_helper.from_array(weight, "w0"), *bn_inits],
    )


def cycle_model(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """Gemm -> BN -> Add whose output feeds back into the Add: a cycle through the BN's consumer."""
    model = gemm_bn(rng, c_in=4, c_out=4)
    graph = model.graph
    graph.node.append(helper.make_node("Add", ["y", "loop"], ["loop"], name="feedback"))
    graph.node.append(helper.make_node("Relu", ["loop"], ["out"], name="relu"))
    # Also close a cycle through the linear op itself: Gemm reads the Add's output.
    graph.node[0].input[0] = "loop"
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4]))
    return model


def random_foldable(rng: np.random.Generator) -> onnx.ModelProto:
    """A random chain of linear op -> BN (-> Relu) layers that bnfold can fold exactly.

    Either an MLP (each layer one of Gemm with transB 0/1 and optional bias, MatMul, MatMul + Add)
    or a CNN (Conv with random kernel size, padding, stride, optional bias), 1 to 3 layers of 1 to
    6 channels, positive variances, epsilon in [1e-5, 1e-2].
    """
    cnn = bool(rng.integers(2))
    layers = int(rng.integers(1, 4))
    widths = [int(w) for w in rng.integers(1, 7, layers + 1)]
    nodes, inits = [], []
    current = "x"

    def const(array: np.ndarray, name: str) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        z = f"z{i}"
        if cnn:
            k = int(rng.choice([1, 3]))
            inputs = [current, const(rng.normal(0, 0.5, (c_out, c_in, k, k)), f"conv{i}.W")]
            if rng.integers(2):
                inputs.append(const(rng.normal(0, 0.1, c_out), f"conv{i}.b"))
            nodes.append(helper.make_node("Conv", inputs, [z], name=f"conv{i}", pads=[k // 2] * 4))
        else:
            kind = str(rng.choice(["gemm", "gemm_t", "matmul", "matmul_add"]))
            if kind.startswith("gemm"):
                trans = kind == "gemm_t"
                shape = (c_out, c_in) if trans else (c_in, c_out)
                inputs = [current, const(rng.normal(0, 0.5, shape), f"gemm{i}.W")]
                if rng.integers(2):
                    inputs.append(const(rng.normal(0, 0.1, c_out), f"gemm{i}.b"))
                nodes.append(helper.make_node("Gemm", inputs, [z], name=f"gemm{i}", transB=int(trans)))
            else:
                mm = z if kind == "matmul" else f"mm{i}"
                nodes.append(helper.make_node("MatMul", [current, const(rng.normal(0, 0.5, (c_in, c_out)), f"mm{i}.W")],
                                              [mm], name=f"mm{i}"))
                if kind == "matmul_add":
                    nodes.append(helper.make_node("Add", [mm, const(rng.normal(0, 0.1, c_out), f"add{i}.b")], [z],
                                                  name=f"add{i}"))
        params = bn_params(c_out, rng)
        params["var"] = rng.uniform(0.05, 3.0, c_out).astype(np.float32)
        t = f"t{i}"
        bn, bn_inits = _bn_node(z, t, params, f"bn{i}", float(10 ** rng.uniform(-5, -2)))
        nodes.append(bn)
        inits.extend(bn_inits)
        current = f"y{i}"
        if rng.integers(2):
            nodes.append(helper.make_node("Relu", [t], [current], name=f"relu{i}"))
        else:
            nodes.append(helper.make_node("Identity", [t], [current], name=f"id{i}"))
    nodes[-1].output[0] = "y"
    shape_in = ["N", widths[0], 4, 4] if cnn else ["N", widths[0]]
    shape_out = ["N", widths[-1], 4, 4] if cnn else ["N", widths[-1]]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
        inits,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_if_bytes(depth: int) -> bytes:
    """A model whose Gemm -> BN sits `depth` If-branches deep, serialized by hand.

    Encoded directly in the protobuf wire format (field numbers from onnx.proto) because the
    protobuf runtime refuses to build messages deeper than its own limit, which is the point of
    the deepest cases.
    """
    inner = gemm_bn()
    inner.graph.ClearField("input")
    graph = inner.graph.SerializeToString()
    zeros = numpy_helper.from_array(np.zeros((1, 4), np.float32), "zeros")
    other = helper.make_graph([helper.make_node("Constant", [], ["y"], value=zeros)], "other", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]).SerializeToString()
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]).SerializeToString()
    graph_type = _varint(20 << 3) + _varint(onnx.AttributeProto.GRAPH)  # AttributeProto.type
    for level in range(depth):
        then_attr = _field(1, "then_branch") + _field(6, graph) + graph_type
        else_attr = _field(1, "else_branch") + _field(6, other) + graph_type
        node = _field(1, "cond") + _field(2, "y") + _field(3, f"if{level}") + _field(4, "If")
        node += _field(5, then_attr) + _field(5, else_attr)
        graph = _field(1, node) + _field(2, f"level{level}") + _field(12, output)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    graph += b"".join(_field(11, value.SerializeToString()) for value in inputs)
    opset = helper.make_opsetid("", OPSET).SerializeToString()
    return _varint(1 << 3) + _varint(8) + _field(8, opset) + _field(7, graph)  # ir_version 8
