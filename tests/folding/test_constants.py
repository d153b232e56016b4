"""`bnfold.folding.constants`: every evaluated op against onnxruntime; malformed subgraphs are not
constants (with the reason); a bug in an evaluator is raised, never turned into a skip."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.folding import constants as constants_module
from bnfold.folding.constants import EVALUATORS, MAX_CONSTANT_ELEMENTS
from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.index import GraphIndex
from bnfold.folding.report import FoldReport
from bnfold.runtime import run, session

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inits, output, *, elem_type=F32, shape=None, inputs=()):
    graph = helper.make_graph(nodes, "g", list(inputs), [helper.make_tensor_value_info(output, elem_type, shape)],
                              inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _index(model, **options):
    return GraphIndex.for_graph(model.graph, ModelContext(model, FoldOptions(**options), FoldReport()))


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


W = np.arange(12, dtype=np.float32).reshape(3, 4)

# (nodes, initializers, output, output element type): one constant subgraph per evaluated op.
CASES = {
    "Constant": ([helper.make_node("Constant", [], ["y"], value=_init("v", W))], [], "y", F32),
    "Constant-ints": ([helper.make_node("Constant", [], ["y"], value_ints=[3, -1])], [], "y", I64),
    "Identity": ([helper.make_node("Identity", ["w"], ["y"])], [_init("w", W)], "y", F32),
    "Cast": ([helper.make_node("Cast", ["w"], ["y"], to=TensorProto.INT64)], [_init("w", W)], "y", I64),
    "CastLike": ([helper.make_node("CastLike", ["w", "like"], ["y"])],
                 [_init("w", W), _init("like", np.zeros(1, np.float16))], "y", TensorProto.FLOAT16),
    "ConstantOfShape": ([helper.make_node("ConstantOfShape", ["s"], ["y"], value=_init("v", np.full(1, 2.5, "f4")))],
                        [_init("s", np.array([2, 3], np.int64))], "y", F32),
    "Reshape": ([helper.make_node("Reshape", ["w", "s"], ["y"])], [_init("w", W), _init("s", np.array([0, 2, -1]))],
                "y", F32),
    "Unsqueeze": ([helper.make_node("Unsqueeze", ["w", "a"], ["y"])], [_init("w", W), _init("a", np.array([0, -1]))],
                  "y", F32),
    "Squeeze": ([helper.make_node("Squeeze", ["w", "a"], ["y"])],
                [_init("w", W.reshape(1, 3, 1, 4)), _init("a", np.array([2]))], "y", F32),
    "Expand": ([helper.make_node("Expand", ["w", "s"], ["y"])], [_init("w", W[:1]), _init("s", np.array([2, 1, 4]))],
               "y", F32),
    "Shape": ([helper.make_node("Shape", ["w"], ["y"], start=-1)], [_init("w", W)], "y", I64),
    "Transpose": ([helper.make_node("Transpose", ["w"], ["y"])], [_init("w", W)], "y", F32),
    "Concat": ([helper.make_node("Concat", ["w", "w"], ["y"], axis=-1)], [_init("w", W)], "y", F32),
    "Gather": ([helper.make_node("Gather", ["w", "i"], ["y"], axis=1)], [_init("w", W), _init("i", np.array([-1, 0]))],
               "y", F32),
}


def test_every_evaluated_op_is_tested():
    assert {name.split("-")[0] for name in CASES} == set(EVALUATORS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_evaluator_matches_onnxruntime(case):
    nodes, inits, output, elem_type = CASES[case]
    model = _model(nodes, inits, output, elem_type=elem_type)
    (expected,) = run(session(model, case), [output], {}, case)
    value = _index(model).constant(output)
    assert value is not None, _index(model).constants.reason(output)
    # Shape / layout ops move values without arithmetic, and Cast rounds like onnxruntime: exact.
    assert value.dtype == expected.dtype and value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)


def test_gather_of_a_static_dimension_of_a_runtime_value():
    x = helper.make_tensor_value_info("x", F32, ["N", 5])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["y"])]
    model = _model(nodes, [_init("i", np.array(1))], "y", elem_type=I64, inputs=[x])
    assert _index(model).constant("y").tolist() == 5
    symbolic = _model(nodes, [_init("i", np.array(0))], "y", elem_type=I64, inputs=[x])
    assert _index(symbolic).constant("y") is None
    assert "symbolic dimension" in _index(symbolic).constants.reason("y")


@pytest.mark.parametrize(("nodes", "inits", "phrase"), [
    ([helper.make_node("Reshape", ["w", "s"], ["y"])], [_init("w", W), _init("s", np.array([5, 5]))], "cannot reshape"),
    ([helper.make_node("Concat", ["w", "w"], ["y"])], [_init("w", W)], "attribute 'axis' is None"),
    ([helper.make_node("Cast", ["w"], ["y"])], [_init("w", W)], "attribute 'to' is None"),
    ([helper.make_node("Reshape", ["w", ""], ["y"])], [_init("w", W)], "input 1 is missing"),
    ([helper.make_node("Gather", ["w", "i"], ["y"])], [_init("w", W), _init("i", np.array([7]))], "out of bounds"),
    ([helper.make_node("Expand", ["w", "s"], ["y"])], [_init("w", W), _init("s", np.array([2, 5]))], "broadcast"),
], ids=["reshape-size", "concat-no-axis", "cast-no-to", "reshape-no-shape", "gather-index", "expand-shape"])
def test_malformed_subgraphs_are_not_constants(nodes, inits, phrase):
    index = _index(_model(nodes, inits, "y"))
    assert index.constant("y") is None
    reason = index.constants.reason("y")
    assert "not evaluable" in reason and phrase in reason, reason


def test_a_bug_in_an_evaluator_is_raised(monkeypatch):
    def buggy(scope, node, args):
        return args[0].no_such_method()  # AttributeError: a bug, not a malformed model

    monkeypatch.setitem(constants_module.EVALUATORS, "Identity", buggy)
    index = _index(_model(*CASES["Identity"][:3]))
    with pytest.raises(AttributeError):
        index.constant("y")


def test_a_malformed_input_is_not_raised(monkeypatch):
    # The healthy counterpart of the test above: the errors NumPy raises for bad shapes are expected.
    def shape_error(scope, node, args):
        raise ValueError("operands could not be broadcast")

    monkeypatch.setitem(constants_module.EVALUATORS, "Identity", shape_error)
    index = _index(_model(*CASES["Identity"][:3]))
    assert index.constant("y") is None and "could not be broadcast" in index.constants.reason("y")


def test_runtime_values_and_limits():
    x = helper.make_tensor_value_info("x", F32, [3, 4])
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [], "y", inputs=[x])
    assert _index(model).constant("y") is None
    assert _index(model).constants.reason("y") == "'x' is a graph input (computed at run time)"
    huge = np.array([MAX_CONSTANT_ELEMENTS, 2], np.int64)
    big = _model([helper.make_node("ConstantOfShape", ["s"], ["y"])], [_init("s", huge)], "y")
    assert _index(big).constant("y") is None  # never materialized


def test_initializer_inputs_are_runtime_values_when_kept():
    w = _init("w", W)
    model = _model([helper.make_node("Identity", ["w"], ["y"])], [w], "y",
                   inputs=[helper.make_tensor_value_info("w", F32, [3, 4])])
    assert _index(model).constant("y") is not None
    kept = _index(model, keep_initializer_inputs=True)
    assert kept.constant("y") is None and "keep_initializer_inputs" in kept.constants.reason("y")


def test_outer_scope_constants_are_visible_in_subgraphs():
    body = helper.make_graph([helper.make_node("Identity", ["w"], ["z"])], "body", [],
                             [helper.make_tensor_value_info("z", F32, [3, 4])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    model = _model([node], [_init("w", W)], "y", inputs=[cond])
    main = _index(model)
    sub = GraphIndex.for_graph(body, main.ctx, "main/if.then_branch", parent=main)
    np.testing.assert_array_equal(sub.constant("z"), W)
    assert main.users("w") == [node]  # the If reads 'w' through its body (index rule 2)
