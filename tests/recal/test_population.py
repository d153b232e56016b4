"""bnfold.population.bn_input_moments: exact statistics of each BN's input, the model as it is,
against an independent float64 NumPy evaluation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bnfold.population import batchnorm_nodes, bn_input_moments, submodel


def _check(model, x, moments, rk):
    env = rk.forward64(model, x)
    for node in batchnorm_nodes(model):
        mean, var = rk.stats64(env[node.input[0]])
        got = moments[node.input[0]]
        # float32 activations (onnxruntime) against float64: relative error ~1e-6 per op, so the
        # issue's 1e-4 of the std (mean) and 1e-4 relative (var) hold with a wide margin.
        np.testing.assert_allclose(got.mean, mean, rtol=0, atol=1e-4 * np.sqrt(var).min())
        np.testing.assert_allclose(got.var, var, rtol=1e-4)


@pytest.mark.parametrize("build", ["mlp", "cnn", "residual"])
@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_moments_of_bn_inputs_as_the_model_is(rk, build, batch_size):
    rng = np.random.default_rng(0)
    model = getattr(rk, build)(rng)
    x = rk.data(model, 60, rng)
    before = model.SerializeToString()
    moments = bn_input_moments(model, x, batch_size=batch_size)
    assert model.SerializeToString() == before
    assert list(moments) == [node.input[0] for node in batchnorm_nodes(model)]
    assert all(m.count == 60 * int(np.prod(rk.forward64(model, x[:1])[name].shape[2:])) for name, m in moments.items())
    _check(model, x, moments, rk)


def test_executor_shards_give_the_same_moments(rk):
    rng = np.random.default_rng(1)
    model = rk.cnn(rng)
    x = rk.data(model, 50, rng)
    serial = bn_input_moments(model, x, batch_size=8)
    with ThreadPoolExecutor(2) as pool:
        sharded = bn_input_moments(model, x, batch_size=8, executor=pool, shards=3)
    for name in serial:
        np.testing.assert_allclose(sharded[name].mean, serial[name].mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sharded[name].m2, serial[name].m2, rtol=1e-12)


def test_submodel_keeps_only_what_the_outputs_need(rk):
    model = rk.mlp(np.random.default_rng(0))
    cut = submodel(model, ["h2"])
    assert [n.op_type for n in cut.graph.node] == ["MatMul", "BatchNormalization", "Relu", "MatMul"]
    assert [o.name for o in cut.graph.output] == ["h2"]
    assert "w3" not in {i.name for i in cut.graph.initializer}
    assert cut.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_model_without_batchnorm_has_no_moments(rk):
    model = rk.mlp(np.random.default_rng(0))
    del model.graph.node[:]
    assert bn_input_moments(model, np.zeros((2, 6), np.float32)) == {}
