"""`bnfold.folding.nodes`, `bnfold.folding.patterns` and `bnfold.folding.context`: the small pieces."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import AttributeProto, helper

from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.nodes import (
    AttributeRef,
    attr_graphs,
    get_attr,
    node_label,
    replace_node,
)
from bnfold.folding.patterns import ChainSkip, Invalid, Rewrite, Skip, pattern
from bnfold.folding.report import FoldReport


def test_get_attr_and_function_references():
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[0, 1])
    assert get_attr(node, "group") == 2 and get_attr(node, "pads") == [0, 1] and get_attr(node, "strides", 7) == 7
    ref = AttributeProto(name="group", ref_attr_name="g", type=AttributeProto.INT)
    node.attribute.append(ref)
    function_node = helper.make_node("Conv", ["x", "w"], ["y"])
    function_node.attribute.append(ref)
    with pytest.raises(AttributeRef):
        get_attr(function_node, "group")


def test_labels():
    assert node_label(helper.make_node("Relu", ["x"], ["y"], name="r")) == "r"
    assert node_label(helper.make_node("Relu", ["x"], ["y"])) == "<Relu -> y>"


def test_replace_node_copies():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="g", doc_string="d", alpha=2.0, transB=1)
    new = replace_node(node, inputs=["a", "b2"], attrs={"beta": 0.5}, drop_attrs=("alpha",))
    assert (list(new.input), new.name, new.doc_string) == (["a", "b2"], "g", "d")
    assert {a.name for a in new.attribute} == {"transB", "beta"}
    assert list(node.input) == ["a", "b", "c"] and {a.name for a in node.attribute} == {"alpha", "transB"}


def test_attr_graphs():
    body = helper.make_graph([], "b", [], [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    assert [len(attr_graphs(a)) for a in node.attribute] == [1, 1]
    assert attr_graphs(helper.make_attribute("axis", 1)) == []


def test_pattern_types():
    assert isinstance(Invalid("bad"), Skip) and isinstance(ChainSkip("chain", None), Skip)

    @pattern("demo", "Relu", "Neg")
    def demo(node, index):
        return Rewrite(into=node.name)

    assert demo.name == "demo" and demo.anchors == frozenset({"Relu", "Neg"})
    assert demo(helper.make_node("Relu", ["x"], ["y"], name="r"), None).into == "r"


def test_context_names_and_workspace():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["w_folded"])], "g", [], [])
    ctx = ModelContext(helper.make_model(graph), FoldOptions(), FoldReport())
    assert ctx.fresh_name("w_folded") == "w_folded_1" and ctx.fresh_name("w_folded") == "w_folded_2"
    assert ctx.fresh_name("new") == "new"
    first = ctx.workspace((2, 3))
    assert first.shape == (2, 3) and first.dtype == np.float64
    assert np.shares_memory(ctx.workspace((3,)), first)  # reused, not reallocated
