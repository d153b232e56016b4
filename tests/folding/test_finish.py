"""`bnfold.folding.finish`: the tensor-map policy (each original -> every new tensor computed from
it) and the naming of folded tensors."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bnfold.folding import fold
from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.finish import cast_and_name, finish, tensor_map
from bnfold.folding.index import GraphIndex
from bnfold.folding.patterns import Skip
from bnfold.folding.report import FoldReport


def test_tensor_map_inverts_sources_in_order():
    sources = {"W'": ["W", "gamma", "var"], "b'": [None, "beta", "mean", "gamma", "var", ""]}
    assert tensor_map(sources) == {
        "W": ["W'"], "gamma": ["W'", "b'"], "var": ["W'", "b'"], "beta": ["b'"], "mean": ["b'"],
    }


def test_an_original_used_twice_maps_to_each_new_tensor_once():
    assert tensor_map({"a": ["x", "x"], "b": ["x"]}) == {"x": ["a", "b"]}


def test_finish_builds_the_rewrite():
    node = helper.make_node("Relu", ["x"], ["y"])
    rewrite = finish(into="conv", remove=[node], replace=[], constants={"W'": np.ones(1)},
                     sources={"W'": ["W"]}, subnormals=2)
    assert (rewrite.into, rewrite.remove, rewrite.tensor_map, rewrite.subnormals) == ("conv", [node], {"W": ["W'"]}, 2)
    assert rewrite.status == "folded" and rewrite.bn is None


def _index():
    graph = helper.make_graph([], "g", [], [])
    model = helper.make_model(graph)
    model.graph.initializer.append(helper.make_tensor("w_folded", TensorProto.FLOAT, [1], [0.0]))
    return GraphIndex.for_graph(model.graph, ModelContext(model, FoldOptions(), FoldReport()))


def test_cast_and_name_reserves_fresh_names():
    index = _index()
    folded = cast_and_name(index, np.array([1.0, 1e-40]), np.array([2.0]), TensorProto.FLOAT, weight_name="w",
                           bias_name=None, hint="dense")
    # 1e-40 is subnormal in float32. 'w_folded' is taken in the model: the weight gets a numbered name.
    assert (folded.weight, folded.bias) == ("w_folded_1", "dense_bias_folded")
    assert folded.subnormals == 1 and folded.constants["w_folded_1"].dtype == np.float32
    overflow = cast_and_name(index, np.array([1e300]), np.array([0.0]), TensorProto.FLOAT, weight_name="w",
                             bias_name="b", hint="dense")
    assert isinstance(overflow, Skip) and overflow.reason.startswith("folded weight of 'w': folded value")


def test_producer_and_consumer_folds_follow_one_policy():
    """``var`` reaches the folded weight and bias, whichever side the BN is folded into."""
    rng = np.random.default_rng(3)

    def model(bn_first):
        w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], rng.standard_normal(16).astype(np.float32))
        params = [helper.make_tensor(n, TensorProto.FLOAT, [4], v)
                  for n, v in zip(("g", "b", "m", "v"), (np.ones(4), np.zeros(4), np.ones(4), np.full(4, 2.0)))]
        if bn_first:
            nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["h"], name="bn"),
                     helper.make_node("Gemm", ["h", "w"], ["y"], name="dense")]
        else:
            nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="dense"),
                     helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w, *params])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    for bn_first in (False, True):
        out, report = fold(model(bn_first))
        (entry,) = report.entries
        (gemm,) = out.graph.node
        assert entry.status == "folded"
        new_w, new_b = gemm.input[1], gemm.input[2]
        assert entry.tensor_map["v"] == entry.tensor_map["g"] == [new_w, new_b]
        assert entry.tensor_map["b"] == entry.tensor_map["m"] == [new_b]
        # W' = W s always; b' = b + W t reads W only when the BN comes first (into the consumer).
        assert entry.tensor_map["w"] == ([new_w, new_b] if bn_first else [new_w])
        onnx.checker.check_model(out)
