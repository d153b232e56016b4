"""SGD with momentum and Adam: closed forms for constant gradients, and step-by-step agreement
with torch.optim on the same random gradient sequences."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.nn.layers import Dense
from bnfold.nn.optim import SGD, Adam


class Holder:
    """A parameter source whose gradient array is replaced before every step (as layers do)."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value
        self.grad = np.zeros_like(value)

    def parameters(self):
        return [("p", self.value, self.grad)]


def test_sgd_momentum_closed_form_for_constant_gradient():
    # v_t = g (1 - mu^t) / (1 - mu), theta_t = theta_0 - lr * g * sum_{k<=t} (1 - mu^k) / (1 - mu).
    lr, mu, g, steps = 0.05, 0.9, np.array([1.0, -2.0, 0.5]), 12
    holder = Holder(np.array([0.3, 0.0, -1.0]))
    start = holder.value.copy()
    opt = SGD(holder, lr=lr, momentum=mu)
    for _ in range(steps):
        holder.grad = g.copy()
        opt.step()
    expected = start - lr * g * sum((1 - mu**k) / (1 - mu) for k in range(1, steps + 1))
    np.testing.assert_allclose(holder.value, expected, rtol=1e-13)


def test_plain_sgd_is_one_gradient_step():
    holder = Holder(np.array([1.0, 2.0]))
    holder.grad = np.array([0.5, -1.0])
    SGD(holder, lr=0.1).step()
    np.testing.assert_array_equal(holder.value, [1.0 - 0.05, 2.0 + 0.1])


def test_adam_closed_form_for_constant_gradient():
    # With g constant, both bias-corrected moments are exact: m_hat = g, v_hat = g^2, so every
    # step moves theta by -lr * g / (|g| + eps).
    lr, eps, g, steps = 0.01, 1e-8, np.array([3.0, -0.2, 1e-3]), 7
    holder = Holder(np.zeros(3))
    opt = Adam(holder, lr=lr, eps=eps)
    for _ in range(steps):
        holder.grad = g.copy()
        opt.step()
    # m_hat and v_hat equal g and g^2 only up to rounding in the 1 - beta^t corrections (~1e-16
    # relative, amplified by 1/(1 - beta2) ~ 1e3): rtol 1e-10.
    np.testing.assert_allclose(holder.value, -steps * lr * g / (np.abs(g) + eps), rtol=1e-10)


@pytest.mark.parametrize("kind", ["sgd", "sgd0", "adam"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_steps_match_torch_optim(kind, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    init = rng.standard_normal((4, 3)).astype(dtype)
    grads = [rng.standard_normal((4, 3)).astype(dtype) for _ in range(25)]
    holder = Holder(init.copy())
    tensor = torch.nn.Parameter(torch.from_numpy(init.copy()))
    if kind == "adam":
        ours, theirs = Adam(holder, lr=0.01, betas=(0.8, 0.99), eps=1e-6), torch.optim.Adam([tensor], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    else:
        mu = 0.9 if kind == "sgd" else 0.0
        ours, theirs = SGD(holder, lr=0.03, momentum=mu), torch.optim.SGD([tensor], lr=0.03, momentum=mu)
    for grad in grads:
        holder.grad = grad.copy()
        ours.step()
        tensor.grad = torch.from_numpy(grad.copy())
        theirs.step()
    # Same update rule, possibly different operation order: float64 agrees to ~1e-15 per step
    # (25 steps -> 1e-12 with margin); float32 to a few ulps (~1e-7) per step -> 1e-5 absolute.
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(holder.value, tensor.detach().numpy(), rtol=0, atol=tol)
    assert holder.value.dtype == dtype


def test_optimizer_reads_current_gradients_from_a_layer():
    layer = Dense(3, 2, rng=np.random.default_rng(0), dtype=np.float64)
    weight = layer.weight  # updated in place: the same array object throughout
    opt = SGD(layer, lr=0.5)
    x = np.eye(3)
    layer.forward(x, training=True)
    layer.backward(np.ones((3, 2)))  # dW = x.T @ 1 = all ones, db = 3
    before = layer.weight.copy()
    opt.step()
    assert layer.weight is weight
    np.testing.assert_allclose(layer.weight, before - 0.5)
    np.testing.assert_allclose(layer.bias, -1.5)


def test_bad_hyper_parameters():
    holder = Holder(np.zeros(2))
    with pytest.raises(ValueError):
        SGD(holder, lr=0.0)
    with pytest.raises(ValueError):
        SGD(holder, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError):
        Adam(holder, betas=(0.9, 1.0))
    holder.grad = np.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        SGD(holder, lr=0.1).step()
