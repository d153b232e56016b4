"""bnfold.recalibrate --method exact against statistics computed independently in float64, layer
after layer (tests/recal/conftest.py: a NumPy evaluator, np.mean / np.var over all the data at
once, BNs in graph order); the output model's structure; the batch method's arithmetic."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.population import batchnorm_nodes, bn_input_moments
from bnfold.recalibration import bn_levels, recalibrate
from bnfold.runtime import run, session

N = 300  # three batches of 100, and 300 batches of 1


@pytest.fixture(scope="module")
def pool():
    # spawn: onnxruntime's thread pools do not survive fork reliably.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


def _assert_exact(result, reference):
    for change in result.changes:
        mean, var = reference[change.name]
        # The accuracy goal, against float64: the mean within 1e-4 of the data's standard
        # deviation, the variance within 1e-4 relative. The float32 onnxruntime activations put
        # about 1e-7 relative error into each statistic, so the goal has three orders of margin.
        np.testing.assert_array_less(np.abs(change.mean - mean), 1e-4 * np.sqrt(var))
        np.testing.assert_allclose(change.var, var, rtol=1e-4)


@pytest.mark.parametrize("build", ["mlp", "cnn", "residual"])
@pytest.mark.parametrize("batch_size", [1, 100, N])
@pytest.mark.parametrize("workers", [1, 2])
def test_exact_statistics_layer_after_layer(rk, pool, build, batch_size, workers):
    rng = np.random.default_rng(7)
    model = getattr(rk, build)(rng)
    x = rk.data(model, N, rng)
    reference = rk.population64(model, x)
    result = recalibrate(model, x, batch_size=batch_size, executor=pool if workers == 2 else None, shards=3)
    _assert_exact(result, reference)
    # The written statistics are those measured, in the model's dtype.
    initializers = {init.name: numpy_helper.to_array(init) for init in result.model.graph.initializer}
    for node, change in zip(batchnorm_nodes(result.model), result.changes):
        np.testing.assert_array_equal(initializers[node.input[3]], change.mean.astype(np.float32))
        np.testing.assert_array_equal(initializers[node.input[4]], change.var.astype(np.float32))


def test_levels_follow_bn_dependencies(rk):
    rng = np.random.default_rng(0)
    assert bn_levels(rk.mlp(rng)) == [0, 1]
    assert bn_levels(rk.residual(rng)) == [0, 0, 1]  # the two BNs feeding the Add share a pass


def test_one_pass_statistics_would_be_wrong(rk):
    """Healthy counterpart of the level order: measuring every BN with the OLD upstream statistics
    (one pass, the model as it is) misses the goal on the second level; recalibrate does not."""
    rng = np.random.default_rng(7)
    model = rk.mlp(rng)
    x = rk.data(model, N, rng)
    reference = rk.population64(model, x)
    as_is = bn_input_moments(model, x)
    second = batchnorm_nodes(model)[1]
    assert np.abs(as_is[second.input[0]].mean - reference["bn2"][0]).max() > 1e-2 * np.sqrt(reference["bn2"][1]).min()
    _assert_exact(recalibrate(model, x), reference)


def test_recalibrated_model_runs_as_float64_with_the_new_statistics(rk):
    rng = np.random.default_rng(3)
    model = rk.residual(rng)
    x = rk.data(model, 64, rng)
    result = recalibrate(model, x, batch_size=10)
    (out,) = run(session(result.model, "m"), ["logits"], {"x": x}, "m")
    expected = rk.forward64(model, x, rk.population64(model, x))["logits"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The last BN is now exact on this data: its output has mean beta and std |gamma| (eps aside).
    gamma = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bnc.gamma"))
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), np.abs(gamma), rtol=1e-3)


def test_output_keeps_graph_and_names_and_leaves_input_alone(rk):
    rng = np.random.default_rng(1)
    model = rk.cnn(rng)
    before = model.SerializeToString()
    result = recalibrate(model, rk.data(model, 20, rng))
    assert model.SerializeToString() == before
    assert [(n.op_type, n.name) for n in result.model.graph.node] == [(n.op_type, n.name) for n in model.graph.node]
    assert {i.name for i in result.model.graph.initializer} == {i.name for i in model.graph.initializer}
    onnx.checker.check_model(result.model, full_check=True)


def test_shared_statistics_are_not_mutated(rk):
    """Two BNs reading one mean/var initializer, and that variance also read by an Add: each BN
    gets its own new initializers; the shared ones stay as they were for the other reader."""
    rng = np.random.default_rng(2)
    model = rk.residual(rng)
    graph = model.graph
    bna, bnb = graph.node[2], graph.node[3]
    bnb.input[3], bnb.input[4] = bna.input[3], bna.input[4]
    graph.node.append(helper.make_node("Add", [bna.input[4], bna.input[4]], ["twice_var"]))
    graph.output.append(helper.make_tensor_value_info("twice_var", onnx.TensorProto.FLOAT, [3]))
    kept = {i.name for i in graph.initializer} - {"bnb.mean", "bnb.var"}
    del graph.initializer[:]
    graph.initializer.extend(init for init in rk.residual(np.random.default_rng(2)).graph.initializer if init.name in kept)
    x = rk.data(model, 40, rng)
    result = recalibrate(model, x)
    new = result.model
    names = [(n.input[3], n.input[4]) for n in batchnorm_nodes(new)]
    assert len({name for pair in names[:2] for name in pair}) == 4  # no sharing left between bna and bnb
    old_var = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bna.var"))
    (twice,) = run(session(new, "m"), ["twice_var"], {"x": x}, "m")
    np.testing.assert_array_equal(twice, 2 * old_var)  # the Add still reads the original values
    _assert_exact(result, rk.population64(model, x))


def test_statistics_computed_by_nodes_are_replaced(rk):
    """Statistics reached through Constant/Identity nodes (PyTorch's dynamo exports) get initializers."""
    rng = np.random.default_rng(4)
    model = rk.mlp(rng)
    graph = model.graph
    mean = next(i for i in graph.initializer if i.name == "bn1.mean")
    graph.node.insert(0, helper.make_node("Constant", [], ["bn1.mean.c"], value=mean))
    graph.node.insert(1, helper.make_node("Identity", ["bn1.mean.c"], ["bn1.mean.id"]))
    next(n for n in graph.node if n.name == "bn1").input[3] = "bn1.mean.id"
    kept = [i for i in graph.initializer if i.name != "bn1.mean"]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    x = rk.data(model, 50, rng)
    result = recalibrate(model, x)
    np.testing.assert_array_equal(result.changes[0].old_mean, numpy_helper.to_array(mean))
    assert next(n for n in result.model.graph.node if n.name == "bn1").input[3] in {
        i.name for i in result.model.graph.initializer}
    # The Constant -> Identity chain fed nothing else: it goes with the statistics it computed.
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in rk.mlp(np.random.default_rng(4)).graph.node]
    _assert_exact(result, rk.population64(rk.mlp(np.random.default_rng(4)), x))


def test_report_units_are_inspects(rk):
    rng = np.random.default_rng(5)
    model = rk.mlp(rng)
    x = rk.data(model, 80, rng)
    first = recalibrate(model, x)
    change = first.changes[1]
    d = change.drift
    std = np.sqrt(change.var + change.eps)
    assert d["max_mean_shift"] == pytest.approx(np.max(np.abs(change.old_mean - change.mean) / std))
    ratio = (change.old_var + change.eps) / (change.var + change.eps)
    assert d["worst_var_ratio"] == pytest.approx(ratio[np.argmax(np.abs(np.log(ratio)))])
    again = recalibrate(first.model, x)  # healthy counterpart: already exact statistics read 0 and 1
    for change in again.changes:
        assert change.drift["max_mean_shift"] < 1e-4 and abs(np.log(change.drift["worst_var_ratio"])) < 1e-4


def test_batch_method_averages_batch_statistics(rk):
    """--method batch: each BN normalizes with its batch (training mode) and the batch means and
    unbiased variances are averaged, every batch alike (the float64 reference, written here)."""
    rng = np.random.default_rng(6)
    model = rk.cnn(rng)
    x = rk.data(model, 50, rng)
    result = recalibrate(model, x, method="batch", batch_size=16)  # batches 16, 16, 16, 2
    sums = {}
    for lo in range(0, 50, 16):
        batch = x[lo:lo + 16]
        env = rk.forward64(model, batch, {name: stats for name, stats in rk.population64(model, batch).items()})
        for node in batchnorm_nodes(model):
            values = env[node.input[0]]
            n = values.size // values.shape[1]
            mean, var = rk.stats64(values)
            total = sums.setdefault(node.name, [0, 0, 0])
            total[0], total[1], total[2] = total[0] + 1, total[1] + mean, total[2] + var * n / (n - 1)
    for change in result.changes:
        count, mean_sum, var_sum = sums[change.name]
        assert count == 4
        # float32 batch statistics (ReduceMean in onnxruntime) against float64: ~1e-6 relative.
        np.testing.assert_allclose(change.mean, mean_sum / count, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(change.var, var_sum / count, rtol=1e-4)


def test_batch_method_needs_two_values_per_channel(rk):
    model = rk.mlp(np.random.default_rng(0))
    x = rk.data(model, 5, np.random.default_rng(0))
    with pytest.raises(BnfoldError, match="needs 2: use a larger batch size"):
        recalibrate(model, x, method="batch", batch_size=2)  # the last batch holds one sample
    recalibrate(model, x[:4], method="batch", batch_size=2)


def test_labels_accuracy_before_and_after(rk):
    rng = np.random.default_rng(8)
    model = rk.mlp(rng)
    x = rk.data(model, 60, rng)
    logits = rk.forward64(model, x, rk.population64(model, x))["logits"]
    y = logits.argmax(axis=1)  # labels the recalibrated model gets right by construction
    result = recalibrate(model, {"x": x, "y": y}, labels="y")
    assert result.accuracy_after == 1.0
    before = (rk.forward64(model, x)["logits"].argmax(axis=1) == y).mean()
    assert result.accuracy_before == pytest.approx(before)
    assert result.accuracy_before < 1.0


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1)), "is in training mode"),
    (lambda m: m.graph.ClearField("node"), "no BatchNormalization node"),
])
def test_models_that_cannot_be_recalibrated(rk, mutate, message):
    model = rk.mlp(np.random.default_rng(0))
    mutate(model)
    with pytest.raises(BnfoldError, match=message):
        recalibrate(model, np.zeros((4, 6), np.float32))


@pytest.mark.parametrize("method", ["exact", "batch"])
def test_statistics_of_the_wrong_length_are_refused(rk, method):
    """Neither pass runs the BN whose statistics are wrong, so onnxruntime would not notice."""
    model = rk.mlp(np.random.default_rng(0))
    index = next(i for i, init in enumerate(model.graph.initializer) if init.name == "bn2.mean")
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.zeros(3, np.float32), "bn2.mean"))
    with pytest.raises(BnfoldError, match="'bn2': its input has 4 channels but 3 statistics"):
        recalibrate(model, rk.data(model, 10, np.random.default_rng(0)), method=method)


def test_bad_options():
    with pytest.raises(BnfoldError, match="method must be one of exact, batch"):
        recalibrate("unused.onnx", [], method="ema")


@pytest.mark.parametrize("opset", [13, 18])
def test_batch_method_builds_valid_graphs_for_other_opsets(rk, opset):
    """ReduceMean / ReduceSumSquare take axes as an input from opset 18; CastLike exists from 15."""
    rng = np.random.default_rng(9)
    model = rk.cnn(rng)
    x = rk.data(model, 40, rng)
    reference = recalibrate(model, x, method="batch", batch_size=10)
    model.opset_import[0].version = opset
    other = recalibrate(model, x, method="batch", batch_size=10)
    for a, b in zip(reference.changes, other.changes):
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b.var, a.var, rtol=1e-6)


@pytest.mark.parametrize("method, passes", [("exact", 2), ("batch", 1)])
def test_progress_counts_levels_times_batches(rk, pool, method, passes):
    rng = np.random.default_rng(10)
    model = rk.mlp(rng)
    x = rk.data(model, 45, rng)
    for executor in (None, pool):
        events = []
        recalibrate(model, x, method=method, batch_size=10, executor=executor, progress=lambda n, t, events=events: events.append((n, t)))
        assert {total for _, total in events} == {passes * 5}  # 5 batches: 10, 10, 10, 10, 5
        assert sum(n for n, _ in events) == passes * 5


def test_model_exported_with_a_fixed_batch_runs_with_any_batch_size(rk):
    """PyTorch's exporter without dynamic_axes fixes the batch axis to the dummy input's (often 1)."""
    rng = np.random.default_rng(12)
    model = rk.cnn(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    x = rk.data(model, 30, rng)
    result = recalibrate(model, x, batch_size=8, method="exact")
    _assert_exact(result, rk.population64(model, x))
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # OUT declares what IN did
