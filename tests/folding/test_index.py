"""`bnfold.folding.index`: producers, consumers (subgraph reads included), types, and edits."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.index import GraphIndex, NodeMap
from bnfold.folding.patterns import Rewrite
from bnfold.folding.report import FoldReport

F32 = TensorProto.FLOAT


def _model(nodes, inits=(), outputs=("y",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 3])],
                              [helper.make_tensor_value_info(o, F32, None) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _index(model):
    return GraphIndex.for_graph(model.graph, ModelContext(model, FoldOptions(), FoldReport()))


def test_node_map_keys_by_identity_not_value():
    a, b = helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["y"])
    assert a == b  # protobuf messages compare by value ...
    nodes: NodeMap[int] = NodeMap()
    nodes[a] = 1
    assert a in nodes and b not in nodes and nodes[a] == 1 and nodes.get(b) is None  # ... the map does not
    nodes[b] = 2
    assert len(nodes) == 2 and list(nodes) == [a, b]


def test_producers_consumers_and_sole_reader():
    relu = helper.make_node("Relu", ["x"], ["h"], name="relu")
    neg = helper.make_node("Neg", ["h"], ["y"], name="neg")
    abs_ = helper.make_node("Abs", ["h"], ["z"], name="abs")
    index = _index(_model([relu, neg, abs_], outputs=("y", "z")))
    relu, neg, abs_ = index.nodes  # the graph holds copies: the index answers with those
    assert index.producer["h"] is relu and index.users("h") == [neg, abs_]
    assert index.sole_consumer_reason("h", neg) == "'h' is also read by Abs 'abs'"
    assert index.sole_consumer_reason("y", relu) == "'y' is a graph output"
    assert index.sole_consumer_reason("x", relu) is None
    assert index.rank("x") == 2 and index.elem_type("x") == F32 and index.static_shape("x") is None


def test_subgraph_reads_count_as_consumers():
    body = helper.make_graph([helper.make_node("Neg", ["h"], ["z"])], "body", [],
                             [helper.make_tensor_value_info("z", F32, None)])
    relu = helper.make_node("Relu", ["x"], ["h"])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    model = _model([relu, cond], [numpy_helper.from_array(np.array(True), "c")])
    index = _index(model)
    assert index.users("h") == [index.nodes[1]]


def test_apply_and_commit_replace_nodes_and_write_constants():
    relu = helper.make_node("Relu", ["x"], ["h"], name="relu")
    neg = helper.make_node("Neg", ["h"], ["y"], name="neg")
    model = _model([relu, neg])
    index = _index(model)
    relu, neg = index.nodes
    add = helper.make_node("Add", ["x", "k"], ["y"], name="add")
    index.apply(Rewrite(into="add", remove=[relu], replace=[(neg, [add])], constants={"k": np.ones(3, np.float32)},
                        subnormals=3))
    assert index.is_removed(relu) and index.is_removed(neg) and not index.is_removed(add)
    assert index.producer["y"] is add and "h" not in index.producer and index.users("x") == [add]
    np.testing.assert_array_equal(index.constant("k"), np.ones(3))
    assert index.ctx.report.subnormals_flushed == 3
    index.commit()
    assert [n.name for n in model.graph.node] == ["add"]
    assert [t.name for t in model.graph.initializer] == ["k"]


def test_a_replacement_can_itself_be_replaced():
    conv = helper.make_node("Relu", ["x"], ["a"], name="first")
    tail = helper.make_node("Neg", ["a"], ["y"], name="tail")
    model = _model([conv, tail])
    index = _index(model)
    conv = index.nodes[0]
    second = helper.make_node("Abs", ["x"], ["a"], name="second")
    index.apply(Rewrite(into=None, replace=[(conv, [second])]))
    third = helper.make_node("Sign", ["x"], ["a"], name="third")
    index.apply(Rewrite(into=None, replace=[(second, [third])]))
    index.commit()
    assert [n.name for n in model.graph.node] == ["third", "tail"]


def test_unused_constant_subgraphs_are_dropped_on_commit():
    shape = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([3], np.int64)))
    reshape = helper.make_node("Reshape", ["w", "s"], ["w3"], name="reshape")
    mul = helper.make_node("Mul", ["x", "w3"], ["y"], name="mul")
    model = _model([shape, reshape, mul], [numpy_helper.from_array(np.ones((1, 3), np.float32), "w")])
    index = _index(model)
    mul = index.nodes[2]
    new = helper.make_node("Identity", ["x"], ["y"], name="id")
    index.apply(Rewrite(into=None, replace=[(mul, [new])]))
    index.commit()
    assert [n.name for n in model.graph.node] == ["id"]
    assert index.ctx.released == {"w"}  # the pass removes the initializer if nothing else reads it
