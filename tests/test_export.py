"""Export of NumPy models to ONNX: NumPy == unfolded ONNX == folded ONNX, in onnxruntime.

Reference and tolerance. Every float32 path (NumPy inference, onnxruntime on the unfolded graph,
on the export-time folded graph and on the graph-pass folded graph) is compared with the float64
evaluation of the same network (the NumPy model run on float64 input: weights stored in float32
are exact in float64). The bound is the standard first-order rounding-error bound for a chain of
dot products (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1): a length-K dot
product computed in precision u is off by at most K u sum_i |x_i w_i|, and errors of earlier
layers reach the output through |W|. Running the network on |x| with |W|, |b|, the BN maps
|s| x + |s mean| + |beta| and activations replaced by the identity gives ``abs_forward``, an upper
bound of every magnitude involved; the error of any float32 path is then at most
``sum_l (K_l + 6) * eps32 * abs_forward`` elementwise (K_l = fan-in of layer l; the 6 per layer
cover the bias add, BN's subtract/divide/multiply/add and the float32 rounding of stored or
folded parameters; eps32 = 2u is taken for u to keep first-order slack).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bnfold.errors import BnfoldError
from bnfold.export import DEFAULT_OPSET, MIN_OPSET, batchnorm_version, export_onnx, max_opset, save_onnx
from bnfold.nn.batchnorm import BatchNorm
from bnfold.nn.checkpoint import save_checkpoint
from bnfold.nn.layers import Dense, LeakyReLU, ReLU
from bnfold.nn.model import Sequential

OPSETS = sorted({9, 13, 14, 15, DEFAULT_OPSET, max_opset()})
EPS32 = float(np.finfo(np.float32).eps)
LINEAR = ("Gemm", "MatMul")


def make_model(convention: str, *, center: bool = True, scale: bool = True, seed: int = 0) -> Sequential:
    """Dense(no bias) -> BN -> ReLU -> Dense(bias) -> BN -> LeakyReLU -> Dense(bias), random stats."""
    rng = np.random.default_rng(seed)
    bns = [BatchNorm(c, convention=convention, center=center, scale=scale) for c in (24, 16)]
    for bn in bns:
        channels = bn.num_features
        if scale:
            bn.gamma = rng.uniform(0.5, 2.0, channels)
        if center:
            bn.beta = rng.normal(0.0, 1.0, channels)
        bn.moving_mean = rng.normal(0.0, 2.0, channels)
        bn.moving_var = rng.uniform(0.05, 4.0, channels)
    second = Dense(24, 16, rng=rng)
    second.bias = rng.normal(0.0, 0.5, 16).astype(np.float32)
    last = Dense(16, 10, rng=rng)
    last.bias = rng.normal(0.0, 0.5, 10).astype(np.float32)
    return Sequential([Dense(20, 24, use_bias=False, rng=rng), bns[0], ReLU(), second, bns[1], LeakyReLU(0.1), last])


def abs_forward(model: Sequential, x: np.ndarray) -> np.ndarray:
    """The network on |x| with absolute weights and identity activations (see module docstring)."""
    v = np.abs(x.astype(np.float64))
    for layer in model.layers:
        if isinstance(layer, Dense):
            v = v @ np.abs(layer.weight.astype(np.float64))
            if layer.bias is not None:
                v = v + np.abs(layer.bias.astype(np.float64))
        elif isinstance(layer, BatchNorm):
            s = np.abs(layer.gamma) / np.sqrt(layer.moving_var + layer.eps)
            v = s * (v + np.abs(layer.moving_mean)) + np.abs(layer.beta)
    return v


def error_bound(model: Sequential, x: np.ndarray) -> np.ndarray:
    roundings = sum(layer.in_features + 6 for layer in model.layers if isinstance(layer, Dense))
    roundings += 6 * sum(isinstance(layer, BatchNorm) for layer in model.layers)
    return roundings * EPS32 * abs_forward(model, x)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def bias_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Biases per linear node: Gemm's C, plus every Add by a constant that directly follows."""
    constants = {init.name for init in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts = {}
    for node in model.graph.node:
        if node.op_type not in LINEAR:
            continue
        count = int(node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != "")
        out = node.output[0]
        while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type == "Add" and set(consumers[out][0].input) & constants:
            count += 1
            out = consumers[out][0].output[0]
        counts[node.name] = count
    return counts


@pytest.mark.parametrize("convention", ["keras", "torch"])
@pytest.mark.parametrize("center,scale", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("opset", OPSETS)
def test_numpy_unfolded_and_folded_agree(convention: str, center: bool, scale: bool, opset: int) -> None:
    from bnfold.folding import fold

    model = make_model(convention, center=center, scale=scale, seed=opset)
    x = np.random.default_rng(100 + opset).standard_normal((33, 20)).astype(np.float32)
    truth = model.forward(x.astype(np.float64), training=False)
    bound = error_bound(model, x)

    unfolded = export_onnx(model, opset=opset)
    folded = export_onnx(model, opset=opset, fold=True)
    graph_folded, report = fold(unfolded)
    assert report.folded == report.total == 2

    outputs = {
        "numpy": model.forward(x, training=False),
        "unfolded": run(unfolded, x),
        "export-folded": run(folded, x),
        "graph-folded": run(graph_folded, x),
    }
    for name, y in outputs.items():
        assert y.dtype == np.float32 and y.shape == (33, 10), name
        excess = np.abs(y - truth) - bound
        assert excess.max() <= 0, f"{name}: error exceeds the float32 bound by {excess.max():.3g}"
    # Sanity of the bound itself: it is far below the outputs' magnitude (a useless bound would
    # let any model pass) but above the observed errors.
    assert bound.max() < 1e-3 * np.abs(truth).max()


@pytest.mark.parametrize("opset", OPSETS)
def test_folded_graphs_have_no_batchnorm_and_one_bias_per_linear(opset: int) -> None:
    from bnfold.folding import fold

    model = make_model("keras", seed=1)
    unfolded = export_onnx(model, opset=opset)
    assert [node.op_type for node in unfolded.graph.node].count("BatchNormalization") == 2
    for folded in (export_onnx(model, opset=opset, fold=True), fold(unfolded)[0]):
        onnx.checker.check_model(folded, full_check=True)
        ops = [node.op_type for node in folded.graph.node]
        assert "BatchNormalization" not in ops
        counts = bias_counts(folded)
        assert len(counts) == 3 and set(counts.values()) == {1}, counts


def test_export_time_fold_is_gemm_chain() -> None:
    folded = export_onnx(make_model("torch"), fold=True)
    assert [node.op_type for node in folded.graph.node] == ["Gemm", "Relu", "Gemm", "LeakyRelu", "Gemm"]
    assert all(len(node.input) == 3 for node in folded.graph.node if node.op_type == "Gemm")


@pytest.mark.parametrize("opset", OPSETS)
def test_batchnorm_version_follows_onnx_schema(opset: int) -> None:
    model = export_onnx(make_model("keras"), opset=opset)
    schema = onnx.defs.get_schema("BatchNormalization", opset)
    assert batchnorm_version(opset) == schema.since_version
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    attributes = {attr.name: onnx.helper.get_attribute_value(attr) for attr in bn.attribute}
    assert set(attributes) <= set(schema.attributes)
    if schema.since_version >= 14:
        assert attributes["training_mode"] == 0
    assert model.ir_version == onnx.helper.find_min_ir_version_for([model.opset_import[0]])


def test_interface_names_dtypes_metadata() -> None:
    model = export_onnx(make_model("torch"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == DEFAULT_OPSET >= 17
    assert model.producer_name == "bnfold" and model.producer_version
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    for value, width in ((graph_input, 20), (graph_output, 10)):
        tensor_type = value.type.tensor_type
        assert tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert tensor_type.shape.dim[0].dim_param == "N"
        assert tensor_type.shape.dim[1].dim_value == width
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert props["bnfold.bn_convention"] == "torch"
    assert props["bnfold.bn_momentum"] == "0.1" and props["bnfold.bn_eps"] == "1e-05"
    details = json.loads(props["bnfold.batchnorm"])
    assert [entry["layer"] for entry in details] == [1, 4]
    # PyTorch momentum 0.1 weighs the new batch; ONNX's momentum weighs the old value (BN-15 spec).
    assert details[0]["onnx_momentum"] == pytest.approx(0.9)
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    attributes = {attr.name: onnx.helper.get_attribute_value(attr) for attr in bn.attribute}
    assert attributes["momentum"] == pytest.approx(0.9)
    assert attributes["epsilon"] == pytest.approx(1e-5)


def test_batch_dimension_is_symbolic() -> None:
    model = export_onnx(make_model("keras"))
    for batch in (1, 7):
        x = np.zeros((batch, 20), dtype=np.float32)
        assert run(model, x).shape == (batch, 10)


def test_center_and_scale_off_write_identity_parameters() -> None:
    model = make_model("keras", center=False, scale=False)
    exported = export_onnx(model)
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in exported.graph.initializer}
    np.testing.assert_array_equal(arrays["1.gamma"], np.ones(24, np.float32))
    np.testing.assert_array_equal(arrays["1.beta"], np.zeros(24, np.float32))


def test_checkpoint_path_and_save(tmp_path) -> None:
    model = make_model("keras")
    checkpoint = tmp_path / "m.npz"
    save_checkpoint(model, checkpoint)
    exported = export_onnx(checkpoint)
    assert {prop.key: prop.value for prop in exported.metadata_props}["bnfold.source"] == "m.npz"
    out = save_onnx(exported, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 20)).astype(np.float32)
    np.testing.assert_array_equal(run(onnx.load(out), x), run(export_onnx(model), x))
    with pytest.raises(BnfoldError, match="already exists"):
        save_onnx(exported, out)


def test_batchnorm_first_is_folded_as_mul_add() -> None:
    rng = np.random.default_rng(3)
    bn = BatchNorm(20)
    bn.moving_mean = rng.normal(size=20)
    bn.moving_var = rng.uniform(0.5, 2.0, 20)
    model = Sequential([bn, Dense(20, 5, rng=rng)])
    folded = export_onnx(model, fold=True)
    assert [node.op_type for node in folded.graph.node] == ["Mul", "Add", "Gemm"]
    x = rng.standard_normal((6, 20)).astype(np.float32)
    truth = model.forward(x.astype(np.float64), training=False)
    np.testing.assert_array_less(np.abs(run(folded, x) - truth), error_bound(model, x) + 1e-30)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, 10**6, "17"])
def test_bad_opset(opset) -> None:
    with pytest.raises(BnfoldError, match="opset"):
        export_onnx(make_model("keras"), opset=opset)


def test_bad_models() -> None:
    with pytest.raises(BnfoldError, match="empty"):
        export_onnx(Sequential([]))
    bn = BatchNorm(8, axis=0)
    with pytest.raises(BnfoldError, match="axis 0"):
        export_onnx(Sequential([Dense(4, 8), bn]))
    with pytest.raises(BnfoldError, match="expects 5 features"):
        export_onnx(Sequential([Dense(4, 8), Dense(5, 2)]))
    with pytest.raises(BnfoldError, match="cannot export"):
        export_onnx(object())


def test_fold_overflow_is_refused() -> None:
    bn = BatchNorm(2)
    bn.gamma = np.array([1e38, 1.0])  # s = 1e38 / sqrt(1e-3): beyond float32 max 3.4e38
    bn.moving_var = np.array([1e-12, 1.0])
    with pytest.raises(BnfoldError, match="overflows float32"):
        export_onnx(Sequential([Dense(2, 2, use_bias=False, rng=np.random.default_rng(0)), bn]), fold=True)


SHIPPED_NPZ = Path(__file__).resolve().parents[1] / "models" / "digits_mlp.npz"
SHIPPED_ONNX = SHIPPED_NPZ.with_suffix(".onnx")


def test_shipped_onnx_is_the_export_of_the_shipped_checkpoint() -> None:
    from bnfold.folding import fold
    from bnfold.nn.checkpoint import load_checkpoint
    from bnfold.nn.data import load_digits

    assert SHIPPED_ONNX.read_bytes() == export_onnx(SHIPPED_NPZ).SerializeToString()
    shipped = onnx.load(SHIPPED_ONNX)
    onnx.checker.check_model(shipped, full_check=True)
    model = load_checkpoint(SHIPPED_NPZ)
    x = load_digits().x_test
    truth = model.forward(x.astype(np.float64), training=False)
    bound = error_bound(model, x)
    for y in (run(shipped, x), run(fold(shipped)[0], x), run(export_onnx(model, fold=True), x)):
        assert (np.abs(y - truth) - bound).max() <= 0
        np.testing.assert_array_equal(y.argmax(axis=1), truth.argmax(axis=1))


def test_every_supported_opset_exports_and_runs() -> None:
    from bnfold.export import onnx_max_opset

    assert MIN_OPSET == 9 and DEFAULT_OPSET <= max_opset() <= onnx_max_opset()
    model = make_model("keras", seed=2)
    x = np.random.default_rng(4).standard_normal((3, 20)).astype(np.float32)
    truth = model.forward(x.astype(np.float64), training=False)
    for opset in range(MIN_OPSET, max_opset() + 1):
        exported = export_onnx(model, opset=opset)
        onnx.checker.check_model(exported, full_check=True)
        assert (np.abs(run(exported, x) - truth) - error_bound(model, x)).max() <= 0, opset
