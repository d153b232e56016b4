"""`bnfold inspect --data` against PyTorch's own statistics.

With ``momentum=None`` PyTorch's running statistics are the cumulative average of the batch
statistics it saw; for the FIRST BN of a network (whose input does not depend on other BNs) fed
equal-sized batches of the data, that is exactly the data's mean, and the variance up to
PyTorch's unbiased factor m / (m - 1) per batch. So inspect must measure (almost) no drift there,
and flag the same network after a few steps of the default EMA (momentum 0.1), which leaves
0.9**k of the initial statistics.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402


def cnn(momentum):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8, momentum=momentum), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8, momentum=momentum), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def export(net, path):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(2, 3, 8, 8),), str(path), input_names=["images"],
                          dynamic_axes={"images": {0: "N"}}, opset_version=17, do_constant_folding=False,
                          dynamo=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((128, 3, 8, 8)) * rng.uniform(0.5, 2, (1, 3, 1, 1)) + 1.0).astype(np.float32)


def train(net, data, batches: int):
    net.train()
    with torch.no_grad():
        for chunk in np.array_split(data, batches):
            net(torch.from_numpy(chunk))
    return net


def test_cumulative_statistics_are_not_stale(data, tmp_path):
    net = train(cnn(None), data, 4)
    export(net, tmp_path / "m.onnx")
    report = bnfold.inspect(tmp_path / "m.onnx", {"images": data})
    assert report.ok, report.lines()
    first = report.bns[0].drift
    # Mean: PyTorch's average of 4 equal batch means is the data mean (float32 accumulation in
    # PyTorch over 2,048 values per channel and batch: ~1e-6 of the std).
    assert first["max_mean_shift"] < 1e-4
    # Variance: PyTorch averages unbiased batch variances (m = 32 * 64 = 2,048 values), which
    # exceed the population variance by m/(m-1) plus the spread of the batch means (those
    # enter the population variance but no batch variance): measured here 0.997-1.001.
    np.testing.assert_allclose(first["var_ratio"], 1.0, atol=5e-3)


def test_few_ema_steps_are_stale(data, tmp_path):
    net = train(cnn(0.1), data, 4)  # 0.9**4 = 66% of the initial (0, 1) statistics remain
    export(net, tmp_path / "m.onnx")
    report = bnfold.inspect(tmp_path / "m.onnx", {"images": data})
    assert {flag.name for _, flag in report.all_flags()} == {"stale"}
    # The data statistics inspect measured, against the first Conv's output over all the data
    # computed by PyTorch in float64 (onnxruntime runs the Conv in float32: ~1e-6 relative).
    conv = net[0].double()
    with torch.no_grad():
        z = conv(torch.from_numpy(data).double())
    drift = report.bns[0].drift
    np.testing.assert_allclose(drift["data_mean"], z.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(drift["data_var"], z.var((0, 2, 3), unbiased=False).numpy(), rtol=1e-5)
