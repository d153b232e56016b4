"""Training switches: If nodes resolved to the branch their known condition selects.

Two kinds of models:

- ``tests/fixtures/tf/``: graphs built by tf.compat.v1 and converted by tf2onnx 1.17
  (`make_tf_fixtures.py`), with TensorFlow's own outputs on a recorded batch. The switch
  ``training:0`` is a graph input backed by an initializer (``placeholder_with_default(False)``).
- hand-built graphs (Gemm -> If{BN | BN}) whose expected output is computed in float64 NumPy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold.errors import BnfoldError
from bnfold.folding import fold
from bnfold.folding.switches import find_switches, pinned_reference, resolve_switches

TF = Path(__file__).resolve().parents[1] / "fixtures" / "tf"
F32 = TensorProto.FLOAT

# TensorFlow (oneDNN) and onnxruntime sum the products of each convolution / matrix product in
# different orders, and folding rounds every folded weight to float32 once: about sqrt(K) half-ulps
# (6e-8) of the output scale per layer, K <= 72 terms, 4 layers: ~2e-6 of max|y|. 1e-5 of the
# scale leaves a 5x margin; the other branch of the switch (batch statistics) differs by ~1.
TF_RTOL = 1e-5


def tf_case(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    data = np.load(TF / f"{name}.npz")
    return onnx.load(str(TF / f"{name}.onnx")), {key: data[key] for key in data.files}


def all_ops(model: onnx.ModelProto) -> list[str]:
    ops = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.append(node.op_type)
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
    return ops


def assert_tf_close(expected: np.ndarray, got: np.ndarray) -> None:
    scale = max(float(np.max(np.abs(expected))), 1.0)
    err = float(np.max(np.abs(expected.astype(np.float64) - got)))
    assert err <= TF_RTOL * scale, f"max|diff| {err:.3g} > {TF_RTOL:g} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# tf2onnx fixtures
# ---------------------------------------------------------------------------------------------
def test_tf_switch_conv_default_folds_all_four_bns_and_matches_tensorflow(fk, tmp_path):
    model, data = tf_case("tf_v1_switch_conv")
    before = model.SerializeToString()
    result = bnfold.convert(TF / "tf_v1_switch_conv.onnx", tmp_path / "out.onnx")
    assert (result.report.folded, result.report.total) == (4, 4), result.lines()
    assert [s.to_dict() for s in result.report.switches] == [{
        "input": "training:0", "value": False, "source": "default", "removed": True, "initializer_kept": False,
        "ifs": [f"main/{node.name}" for node in model.graph.node if node.op_type == "If"]}]
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert "If" not in all_ops(out) and "BatchNormalization" not in all_ops(out)
    assert [v.name for v in out.graph.input] == ["x:0"]
    assert "training:0" not in {t.name for t in out.graph.initializer}
    # Nothing that only computed batch statistics for the other branch is left (the one
    # ReduceMean is the network's global average).
    assert all_ops(out).count("ReduceMean") == 1 and not {"ReduceSumSquare", "Shape"} & set(all_ops(out))
    onnx.checker.check_model(out, full_check=True)
    (got,) = fk.run(out, {"x:0": data["x:0"]})
    assert_tf_close(data["y_tf_inference"], got)
    (original,) = fk.run(model, {"x:0": data["x:0"], "training:0": np.array(False)})
    fk.assert_close(original, got, F32, "original with training:0 = False")
    assert model.SerializeToString() == before


def test_tf_switch_conv_pinned_true_selects_batch_statistics(fk):
    model, data = tf_case("tf_v1_switch_conv")
    out, report = fold(model, pins={"training:0": "1"})
    assert report.switches[0].value is True and report.switches[0].source == "pinned"
    assert "If" not in all_ops(out) and [v.name for v in out.graph.input] == ["x:0"]
    assert report.folded == 0 and report.total == 4  # batch statistics: computed mean / var
    (got,) = fk.run(out, {"x:0": data["x:0"]})
    assert_tf_close(data["y_tf_training"], got)
    (original,) = fk.run(model, {"x:0": data["x:0"], "training:0": np.array(True)})
    fk.assert_close(original, got, F32, "original with training:0 = True")


def test_tf_switch_dense_decomposed_bns_with_mean_and_variance_through_ifs_fold(fk):
    model, data = tf_case("tf_v1_switch_dense")
    out, report = fold(model)
    assert (report.folded, report.total) == (2, 2), report.lines()
    assert sorted(set(all_ops(out))) == ["Add", "MatMul", "Relu", "Reshape"]
    (got,) = fk.run(out, {"x:0": data["x:0"]})
    assert_tf_close(data["y_tf_inference"], got)


def test_tf_training_flag_without_default_is_left_alone_unless_pinned(fk):
    model, data = tf_case("tf_v1_training_input")
    resolved, records = resolve_switches(model)
    assert resolved is model and records == []
    out, report = fold(model)
    assert report.folded == 0 and all_ops(out).count("If") == 4
    assert any("'training:0' decides 4 If node(s) and is not fixed" in note for note in report.notes)
    out, report = fold(model, pins={"training:0": False})
    assert (report.folded, report.total) == (4, 4)
    (got,) = fk.run(out, {"x:0": data["x:0"]})
    assert_tf_close(data["y_tf_inference"], got)


def test_find_switches_reports_default_and_what_each_value_does():
    model, _ = tf_case("tf_v1_switch_conv")
    (switch,) = find_switches(model)
    assert (switch.input, switch.dtype, switch.default) == ("training:0", "bool", False)
    assert len(switch.controls) == 4
    default, other = switch.outcomes
    assert (default.value, default.bn_folded, default.bn_total, default.batch_statistics) == (False, 4, 4, False)
    assert (other.value, other.bn_folded, other.bn_total, other.batch_statistics) == (True, 0, 4, True)
    assert "False: inference statistics, BN folded 4 of 4" in switch.describe()
    (no_default,) = find_switches(tf_case("tf_v1_training_input")[0])
    assert no_default.default is None and not no_default.resolved_by_default


def test_keep_initializer_inputs_leaves_the_default_switch_but_pins_still_apply():
    model, _ = tf_case("tf_v1_switch_conv")
    out, report = fold(model, keep_initializer_inputs=True)
    assert report.folded == 0 and report.switches == [] and all_ops(out).count("If") == 4
    out, report = fold(model, keep_initializer_inputs=True, pins={"training:0": 0})
    assert report.folded == 4


# ---------------------------------------------------------------------------------------------
# Hand-built If graphs
# ---------------------------------------------------------------------------------------------
def bn64(y, gamma, beta, mean, var, eps=1e-5):
    return gamma * (y - mean) / np.sqrt(var + eps) + beta


class IfModel:
    """x (N, 3) -> Gemm -> y (N, 4) -> If(cond){then: BN(y, A) | else: BN(y, B)} -> z.

    The then-branch's BN parameters are initializers of the branch, the else-branch's of the
    main graph (both kinds must survive inlining).
    """

    def __init__(self, fk, rng, cond_nodes=(), cond="cond", inputs=(), initializers=()):
        self.w = rng.standard_normal((4, 3))
        self.b = rng.standard_normal(4)
        self.params = {"then": fk.bn_arrays(rng, 4), "else": fk.bn_arrays(rng, 4)}
        then_bn, then_inits = self._bn(fk, "then")
        else_bn, else_inits = self._bn(fk, "else")
        then = helper.make_graph([then_bn], "then", [], [fk.vi("z_then", F32, None)], then_inits)
        other = helper.make_graph([else_bn], "else", [], [fk.vi("z_else", F32, None)])
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1), *cond_nodes,
                 helper.make_node("If", [cond], ["z"], name="switch", then_branch=then, else_branch=other)]
        self.model = fk.model(nodes, [fk.vi("x", F32, ["N", 3]), *inputs], [fk.vi("z", F32, ["N", 4])],
                              [fk.init("W", self.w, F32), fk.init("B", self.b, F32), *else_inits, *initializers])

    @staticmethod
    def _bn(fk, which):
        names = [f"{which}.{r}" for r in ("scale", "bias", "mean", "var")]
        return helper.make_node("BatchNormalization", ["y", *names], [f"z_{which}"], name=f"bn_{which}"), []

    def expected(self, x, branch):
        y = x.astype(np.float64) @ self.w.astype(np.float32).astype(np.float64).T + self.b.astype(np.float32)
        params = [np.asarray(p, dtype=np.float32).astype(np.float64) for p in self.params[branch]]
        return bn64(y, *params)


def if_model(fk, rng, cond_nodes=(), cond="cond", inputs=(), initializers=()):
    m = IfModel(fk, rng, cond_nodes, cond, inputs, initializers)
    gamma, beta, mean, var = m.params["then"]
    then = next(a.g for a in m.model.graph.node[-1].attribute if a.name == "then_branch")
    then.initializer.extend(fk.init(f"then.{r}", a, F32) for r, a in zip(("scale", "bias", "mean", "var"),
                                                                          (gamma, beta, mean, var)))
    for r, a in zip(("scale", "bias", "mean", "var"), m.params["else"]):
        m.model.graph.initializer.append(fk.init(f"else.{r}", a, F32))
    return m


def const_bool(name, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor("v", TensorProto.BOOL, [], [value]))


CONDITIONS = {
    # name: (cond nodes, cond name, extra inputs, extra initializers, branch taken)
    "constant node": ([const_bool("cond", True)], "cond", (), (), "then"),
    "initializer": ([], "c", (), ("c", False), "else"),
    "identity, cast and not": (
        [helper.make_node("Constant", [], ["one"], value_int=1),
         helper.make_node("Cast", ["one"], ["one_b"], to=TensorProto.BOOL),
         helper.make_node("Not", ["one_b"], ["not_one"]),
         helper.make_node("Identity", ["not_one"], ["cond"])], "cond", (), (), "else"),
    "input with a default": ([], "training", ("training",), ("training", True), "then"),
    "int input with a default, cast": (
        [helper.make_node("Cast", ["phase"], ["cond"], to=TensorProto.BOOL)], "cond", ("phase",), ("phase", 0), "else"),
}


@pytest.mark.parametrize("case", sorted(CONDITIONS))
def test_known_condition_resolves_to_the_selected_branch(fk, case):
    nodes, cond, inputs, init, branch = CONDITIONS[case]
    dtype = {"training": TensorProto.BOOL, "phase": TensorProto.INT64}
    m = if_model(fk, np.random.default_rng(1), nodes, cond,
                 inputs=[fk.vi(name, dtype[name], []) for name in inputs],
                 initializers=[fk.init(init[0], np.array(init[1]))] if init else [])
    resolved, _ = resolve_switches(m.model)
    names = {t.name for t in resolved.graph.initializer}
    discarded = "else" if branch == "then" else "then"
    assert {f"{branch}.{r}" for r in ("scale", "bias", "mean", "var")} <= names
    assert not any(name.startswith(discarded + ".") for name in names)
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    out, report = fk.fold_and_check(m.model, folded=1, feeds={"x": x})
    assert "If" not in all_ops(out) and "Not" not in all_ops(out) and "Cast" not in all_ops(out)
    assert [v.name for v in out.graph.input] == ["x"]
    (got,) = fk.run(out, {"x": x})
    np.testing.assert_allclose(got, m.expected(x, branch), rtol=0, atol=1e-5 * np.abs(m.expected(x, branch)).max())
    (record,) = report.switches
    assert record.input == (inputs[0] if inputs else None)
    assert record.source == ("default" if inputs else "constant")


def test_condition_from_a_real_input_or_from_data_is_left_alone(fk):
    rng = np.random.default_rng(3)
    flag = if_model(fk, rng, inputs=[fk.vi("cond", TensorProto.BOOL, [])])
    data = if_model(fk, rng, [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                              helper.make_node("Constant", [], ["zero"], value_float=0.0),
                              helper.make_node("Greater", ["s", "zero"], ["cond"])])
    for m in (flag.model, data.model):
        resolved, records = resolve_switches(m)
        assert resolved is m and records == []
        out, report = fold(m)
        assert all_ops(out).count("If") == 1 and report.folded == 0 and report.switches == []
    with pytest.raises(BnfoldError, match="decides no If condition"):
        resolve_switches(data.model, {"x": 1.0})


def test_inlined_names_do_not_clash_and_nested_bodies_follow_renames(fk):
    """The selected branch defines ``h``, also defined by the other branch and the main graph
    (shadowing is legal ONNX); a nested If (on a real input, so it stays) reads the branch's
    ``h``. Inlining must rename ``h`` and the nested body's reference with it."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    inner = helper.make_node(
        "If", ["flag"], ["z_then"], name="inner",
        then_branch=helper.make_graph([helper.make_node("Identity", ["h"], ["i_then"])], "it", [],
                                      [fk.vi("i_then", F32, None)]),
        else_branch=helper.make_graph([helper.make_node("Neg", ["h"], ["i_else"])], "ie", [],
                                      [fk.vi("i_else", F32, None)]))
    then = helper.make_graph([helper.make_node("Mul", ["y", "y"], ["h"]), inner], "then", [],
                             [fk.vi("z_then", F32, None)])
    other = helper.make_graph([helper.make_node("Abs", ["y"], ["h"]), helper.make_node("Neg", ["h"], ["z_else"])],
                              "else", [], [fk.vi("z_else", F32, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["h"]),
             helper.make_node("If", ["training"], ["z"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["z", "h"], ["out"])]
    m = fk.model(nodes, [fk.vi("x", F32, ["N", 3]), fk.vi("training", TensorProto.BOOL, []),
                         fk.vi("flag", TensorProto.BOOL, [])],
                 [fk.vi("out", F32, ["N", 4])], [fk.init("W", w.T), fk.init("training", np.array(True))])
    out, (record,) = resolve_switches(m)
    onnx.checker.check_model(out, full_check=True)
    assert record.input == "training" and all_ops(out).count("If") == 1
    x = rng.standard_normal((3, 3)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        (expected,) = fk.run(m, feeds)
        (got,) = fk.run(out, feeds)
        np.testing.assert_array_equal(got, expected)
        y = x @ w.T
        np.testing.assert_allclose(got, (y * y if flag else -(y * y)) + np.maximum(y, 0), rtol=1e-6)


def test_branch_outputs_that_are_outer_names_initializers_or_repeated_get_identities(fk):
    rng = np.random.default_rng(5)
    k = rng.standard_normal(4).astype(np.float32)
    then = helper.make_graph([], "then", [], [fk.vi("y", F32, None), fk.vi("k", F32, None), fk.vi("y", F32, None)],
                             [fk.init("k", k)])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["n"])], "else", [],
                              [fk.vi("n", F32, None), fk.vi("n", F32, None), fk.vi("n", F32, None)])
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("If", ["c"], ["a", "b", "d"], then_branch=then, else_branch=other),
             helper.make_node("Sum", ["a", "b", "d"], ["out"])]
    m = fk.model(nodes, [fk.vi("x", F32, ["N", 4])], [fk.vi("out", F32, ["N", 4])],
                 [fk.init("c", np.array(True))])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out, _ = resolve_switches(m)
    onnx.checker.check_model(out, full_check=True)
    assert "If" not in all_ops(out) and all_ops(out).count("Identity") == 3
    # onnxruntime refuses the input model (a branch output that is an outer-scope value), so the
    # reference is NumPy; the resolved model is valid and runs.
    (got,) = fk.run(out, {"x": x})
    np.testing.assert_allclose(got, 2 * np.maximum(x, 0) + k, rtol=1e-6)


def test_every_if_on_the_switch_goes_also_nested_in_a_branch_and_in_a_loop_body(fk):
    """``training`` decides an If in the main graph, an If nested in its selected branch and an
    If inside a Loop body (read from the outer scope)."""
    rng = np.random.default_rng(6)

    def flip(name, source, out):
        return helper.make_node(
            "If", ["training"], [out], name=name,
            then_branch=helper.make_graph([helper.make_node("Neg", [source], [f"{out}_t"])], f"{name}_t", [],
                                          [fk.vi(f"{out}_t", F32, None)]),
            else_branch=helper.make_graph([helper.make_node("Abs", [source], [f"{out}_e"])], f"{name}_e", [],
                                          [fk.vi(f"{out}_e", F32, None)]))

    outer_then = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["s"]), flip("nested", "s", "ns")],
                                   "outer_then", [], [fk.vi("ns", F32, None)])
    outer_else = helper.make_graph([helper.make_node("Tanh", ["x"], ["t"])], "outer_else", [],
                                   [fk.vi("t", F32, None)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), flip("in_loop", "acc_in", "flipped"),
         helper.make_node("Add", ["flipped", "first"], ["acc_out"])],
        "body", [fk.vi("i", TensorProto.INT64, []), fk.vi("cond_in", TensorProto.BOOL, []),
                 fk.vi("acc_in", F32, None)],
        [fk.vi("cond_out", TensorProto.BOOL, []), fk.vi("acc_out", F32, None)])
    nodes = [helper.make_node("If", ["training"], ["first"], name="outer", then_branch=outer_then,
                              else_branch=outer_else),
             helper.make_node("Constant", [], ["trips"], value_int=3),
             helper.make_node("Constant", [], ["go"], value=helper.make_tensor("go", TensorProto.BOOL, [], [True])),
             helper.make_node("Loop", ["trips", "go", "x"], ["out"], body=body)]
    for training in (True, False):
        m = fk.model(nodes, [fk.vi("x", F32, [2, 3]), fk.vi("training", TensorProto.BOOL, [])],
                     [fk.vi("out", F32, [2, 3])], [fk.init("training", np.array(training))])
        out, (record,) = resolve_switches(m)
        onnx.checker.check_model(out, full_check=True)
        assert "If" not in all_ops(out) and len(record.ifs) == (3 if training else 2), record.ifs
        assert record.ifs[-1].startswith("main/<Loop -> out>.body/")
        x = rng.standard_normal((2, 3)).astype(np.float32)
        (got,) = fk.run(out, {"x": x})
        np.testing.assert_array_equal(got, fk.run(m, {"x": x})[0])
        # outer: then = nested flip (Neg) of Sigmoid; else = Tanh
        first = -(1 / (1 + np.exp(-x.astype(np.float64)))) if training else np.tanh(x.astype(np.float64))
        acc = x.astype(np.float64)
        for _ in range(3):
            acc = (-acc if training else np.abs(acc)) + first
        np.testing.assert_allclose(got, acc, rtol=1e-5, atol=1e-6)


def test_nodes_that_only_fed_the_discarded_branch_go_and_unrelated_dead_nodes_stay(fk):
    rng = np.random.default_rng(7)
    then = helper.make_graph([helper.make_node("Neg", ["only_else"], ["z_t"])], "t", [], [fk.vi("z_t", F32, None)])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["z_e"])], "e", [], [fk.vi("z_e", F32, None)])
    nodes = [helper.make_node("Mul", ["x", "x"], ["squared"]),
             helper.make_node("Exp", ["squared"], ["only_else"]),  # feeds only the then branch
             helper.make_node("Relu", ["x"], ["unused"], name="dead_before"),
             helper.make_node("Not", ["training"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other)]
    m = fk.model(nodes, [fk.vi("x", F32, [2]), fk.vi("training", TensorProto.BOOL, [])], [fk.vi("z", F32, [2])],
                 [fk.init("training", np.array(True))])
    out, _ = resolve_switches(m)
    assert [n.op_type for n in out.graph.node] == ["Relu", "Abs"]
    assert not out.graph.initializer and [v.name for v in out.graph.input] == ["x"]
    x = rng.standard_normal(2).astype(np.float32)
    np.testing.assert_array_equal(fk.run(out, {"x": x})[0], np.abs(x))


def test_a_pinned_input_still_read_elsewhere_becomes_a_constant_with_the_pinned_value(fk):
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["z_t"])], "t", [], [fk.vi("z_t", F32, None)])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["z_e"])], "e", [], [fk.vi("z_e", F32, None)])
    nodes = [helper.make_node("If", ["training"], ["z"], then_branch=then, else_branch=other),
             helper.make_node("Cast", ["training"], ["t_f"], to=F32),
             helper.make_node("Add", ["z", "t_f"], ["out"])]
    m = fk.model(nodes, [fk.vi("x", F32, [2]), fk.vi("training", TensorProto.BOOL, [])], [fk.vi("out", F32, [2])],
                 [fk.init("training", np.array(False))])
    out, (record,) = resolve_switches(m, {"training": "true"})
    assert record.initializer_kept and "still read elsewhere" in record.line()
    assert [v.name for v in out.graph.input] == ["x"]
    x = np.array([1.5, -2.0], dtype=np.float32)
    np.testing.assert_array_equal(fk.run(out, {"x": x})[0], -x + 1)
    reference = pinned_reference(m, {"training": True})
    np.testing.assert_array_equal(fk.run(reference, {"x": x})[0], -x + 1)
    assert fk.run(m, {"x": x})[0].tolist() == np.abs(x).tolist()  # the input model is untouched


@pytest.mark.parametrize("pins, message", [
    ({"nope": 1}, "no input of that name"),
    ({"x": 1}, "decides no If condition"),
    ({"training": "maybe"}, r"expected a boolean \(0, 1, true, false\)"),
    ({"phase": "300"}, "out of range for int8"),
    ({"phase": "1.5"}, "expected an integer"),
    ({"training": [0, 1]}, "expected a single value"),
])
def test_bad_pins_are_one_line_errors(fk, pins, message):
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["z_t"])], "t", [], [fk.vi("z_t", F32, None)])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["z_e"])], "e", [], [fk.vi("z_e", F32, None)])
    nodes = [helper.make_node("Cast", ["phase"], ["p"], to=TensorProto.BOOL),
             helper.make_node("And", ["training", "p"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other)]
    m = fk.model(nodes, [fk.vi("x", F32, [2]), fk.vi("training", TensorProto.BOOL, []),
                         fk.vi("phase", TensorProto.INT8, [])], [fk.vi("z", F32, [2])])
    with pytest.raises(BnfoldError, match=message):
        resolve_switches(m, pins)
    out, records = resolve_switches(m, {"training": 1, "phase": "-3"})
    assert [r.input for r in records] == ["phase", "training"] and "If" not in all_ops(out)


def test_rule7_alone_computes_only_what_the_resolution_made_constant(fk):
    """Arithmetic on constants that has nothing to do with a resolved If is left as it is."""
    then = helper.make_graph([helper.make_node("Identity", ["m"], ["z_t"])], "t", [], [fk.vi("z_t", F32, None)])
    other = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["z_e"], axes=[0])], "e", [],
                              [fk.vi("z_e", F32, None)])
    nodes = [helper.make_node("Sqrt", ["k"], ["root"]),  # constant, unrelated to the If
             helper.make_node("If", ["c"], ["mean"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["mean", "one"], ["shifted"]),  # constant after resolution
             helper.make_node("Sub", ["x", "shifted"], ["d"]),
             helper.make_node("Mul", ["d", "root"], ["out"])]
    m = fk.model(nodes, [fk.vi("x", F32, [2, 3])], [fk.vi("out", F32, [2, 3])],
                 [fk.init("c", np.array(True)), fk.init("m", np.array([1, 2, 3], dtype=np.float32)),
                  fk.init("one", np.array(1, dtype=np.float32)), fk.init("k", np.array([4, 9, 16], dtype=np.float32))])
    out, _ = resolve_switches(m)
    assert [n.op_type for n in out.graph.node] == ["Sqrt", "Sub", "Mul"]
    shifted = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}["shifted"]
    np.testing.assert_array_equal(shifted, np.array([2, 3, 4], dtype=np.float32))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(fk.run(out, {"x": x})[0], (x - [2, 3, 4]) * [2, 3, 4])


def test_a_model_without_if_is_returned_as_is_and_pins_on_it_are_errors(fk):
    m = fk.model([helper.make_node("Relu", ["x"], ["y"])], [fk.vi("x", F32, [2])], [fk.vi("y", F32, [2])])
    assert resolve_switches(m) == (m, [])
    with pytest.raises(BnfoldError, match="decides no If condition"):
        resolve_switches(m, {"x": 0})
