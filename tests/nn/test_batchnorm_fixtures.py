"""`BatchNorm` against recorded PyTorch and Keras outputs (``tests/fixtures/bn_*.npz``).

The fixtures come from ``tests/fixtures/make_bn_fixtures.py`` (torch 2.13 ``BatchNorm1d/2d``,
Keras 3.15 ``BatchNormalization`` on the torch backend): several training steps with autograd
gradients and moving statistics after each, then one inference call. Only NumPy is needed here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnfold.nn import batchnorm
from bnfold.nn.batchnorm import CONVENTIONS, BatchNorm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FILES = sorted(FIXTURES.glob("bn_*.npz"))
EPS32 = float(np.finfo(np.float32).eps)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _layer(fx: dict[str, np.ndarray]) -> BatchNorm:
    momentum = float(fx["momentum"])
    convention, axis = str(fx["convention"]), int(fx["axis"])
    kwargs = {} if axis == CONVENTIONS[convention]["axis"] else {"axis": axis}
    bn = BatchNorm(
        fx["gamma"].size,
        convention=convention,
        momentum=None if np.isnan(momentum) else momentum,
        **kwargs,
    )
    # The defaults must be the framework's own: no eps (and the default axis) is passed above.
    assert bn.eps == float(fx["eps"])
    bn.gamma = fx["gamma"]
    bn.beta = fx["beta"]
    return bn


def _channel(fx: dict[str, np.ndarray]) -> int:
    """Channel axis of the stacked inputs ``x`` (steps, N, ...)."""
    return int(fx["axis"]) % (fx["x"].ndim - 1) + 1


def _tolerance(fx: dict[str, np.ndarray], dtype: np.dtype) -> float:
    """Norm-wise relative tolerance (error / max |reference|) for one fixture and compute dtype.

    float64 on both sides (torch float64 fixtures, float64 here): the same formulas in a
    different summation order. Each reduction over m <= 100 values errs by at most ~m * 1.1e-16
    = 1e-14 and the dx/moving-statistics formulas chain fewer than ten operations, so 1e-12 holds
    with margin; every convention mistake (biased vs unbiased: 1/(m-1) >= 1 %, eps 1e-3 vs 1e-5,
    momentum direction) is larger than 1e-6.

    Otherwise one side is float32: a few ulps times sqrt(m) for the m-term reductions (rounding
    errors of a sum grow like a random walk), times (1 + kappa) where kappa = max E[x^2] / var
    bounds the cancellation of Keras's one-pass variance E[x^2] - E[x]^2 (harmless for torch).
    """
    if dtype == np.float64 and fx["x"].dtype == np.float64:
        return 1e-12
    x = fx["x"].astype(np.float64)
    channel = _channel(fx)
    axes = tuple(a for a in range(1, x.ndim) if a != channel)
    kappa = float(np.max(np.mean(x**2, axis=axes) / np.var(x, axis=axes)))
    m = x[0].size // x.shape[channel]
    return 4 * EPS32 * np.sqrt(m) * (1.0 + kappa)


def _close(actual: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    error = float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected)))
    scale = float(np.max(np.abs(expected)))
    assert error <= tol * scale, f"{what}: max error {error:.3e} > {tol:.1e} * {scale:.3e}"


def test_fixtures_are_present_and_small() -> None:
    names = {p.name for p in FILES}
    assert {"bn_torch_1d_m0.1.npz", "bn_torch_2d_m0.1.npz", "bn_torch_2d_cumulative.npz",
            "bn_keras_rank2.npz", "bn_keras_rank4.npz"} <= names
    assert sum(p.stat().st_size for p in FILES) < 300_000


@pytest.mark.parametrize("block_bytes", [None, 64], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_matches_framework(path: Path, dtype, block_bytes, monkeypatch) -> None:
    if block_bytes is not None:  # tiny blocks: the block-by-block code path on small fixtures
        monkeypatch.setattr(batchnorm, "_BLOCK_BYTES", block_bytes)
    fx = _load(path)
    bn = _layer(fx)
    tol = _tolerance(fx, np.dtype(dtype))
    for step in range(fx["x"].shape[0]):
        x = fx["x"][step].astype(dtype)
        y = bn.forward(x, training=True)
        assert y.dtype == dtype and y.shape == x.shape
        _close(y, fx["y"][step], tol, f"step {step} y")
        dx = bn.backward(fx["dy"][step].astype(dtype))
        assert dx.dtype == dtype
        _close(dx, fx["dx"][step], tol, f"step {step} dx")
        _close(bn.dgamma, fx["dgamma"][step], tol, f"step {step} dgamma")
        _close(bn.dbeta, fx["dbeta"][step], tol, f"step {step} dbeta")
        _close(bn.moving_mean, fx["moving_mean"][step], tol, f"step {step} moving_mean")
        _close(bn.moving_var, fx["moving_var"][step], tol, f"step {step} moving_var")
    y_eval = bn.forward(fx["x_eval"].astype(dtype), training=False)
    _close(y_eval, fx["y_eval"], tol, "inference y")


def _moving_var_recurrence(fx: dict[str, np.ndarray], ddof: int) -> np.ndarray:
    """The moving variance a framework would hold if it fed var(ddof) into its update."""
    x = fx["x"].astype(np.float64)
    channel = _channel(fx)
    axes = tuple(a - 1 for a in range(1, x.ndim) if a != channel)
    momentum = float(fx["momentum"])
    var = np.ones(x.shape[channel])
    history = []
    for t, batch in enumerate(x, start=1):
        if str(fx["convention"]) == "keras":
            old = momentum
        else:
            old = 1.0 - 1.0 / t if np.isnan(momentum) else 1.0 - momentum
        var = old * var + (1.0 - old) * batch.var(axis=axes, ddof=ddof)
        history.append(var)
    return np.stack(history)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_which_variance_each_framework_uses(path: Path) -> None:
    """Torch's running_var follows the UNBIASED batch variance, Keras's the BIASED one.

    Checked from the framework's recorded moving variance alone (no bnfold code): the matching
    recurrence agrees to rounding, the other misses by about 1/(m-1) of a step's contribution.
    """
    fx = _load(path)
    expected = {"torch": "unbiased", "keras": "biased"}[str(fx["convention"])]
    recorded = fx["moving_var"].astype(np.float64)
    errors = {
        name: float(np.max(np.abs(_moving_var_recurrence(fx, ddof) - recorded) / recorded))
        for name, ddof in (("biased", 0), ("unbiased", 1))
    }
    other = "biased" if expected == "unbiased" else "unbiased"
    rounding = 1e-12 if fx["x"].dtype == np.float64 else 1e-5  # as in _tolerance, per dtype
    assert errors[expected] < rounding < errors[other], errors
    if "variance_in_update" in fx:
        assert str(fx["variance_in_update"]) == expected
