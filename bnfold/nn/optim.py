"""First-order optimizers that update parameters in place: SGD with momentum, and Adam.

An optimizer is built on a *parameter source*: anything with a ``parameters()`` method that
returns ``[(name, array, grad), ...]`` (a layer or a `Sequential`), or a fixed list of such
triples. ``step()`` asks the source for the current list every time, because layers replace
their gradient arrays on each backward. Per-parameter state (velocities, moments) is keyed by
position in that list, which a model keeps fixed.

The update rules are PyTorch's (``torch.optim.SGD`` with ``dampening=0, nesterov=False,
weight_decay=0`` and ``torch.optim.Adam`` with ``amsgrad=False, weight_decay=0``), so runs can be
checked step by step against it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["SGD", "Adam", "Optimizer"]

log = logging.getLogger(__name__)

Parameter = tuple[str, np.ndarray, np.ndarray]


class _HasParameters(Protocol):
    def parameters(self) -> list[Parameter]: ...


class Optimizer:
    """Base: resolves the parameter source and checks gradients against their parameters."""

    def __init__(self, params: _HasParameters | Sequence[Parameter], lr: float) -> None:
        lr = float(lr)
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"{type(self).__name__}: learning rate must be finite and > 0, got {lr}")
        self.lr = lr
        self._source = params
        self.steps = 0

    def _current(self) -> list[Parameter]:
        source = self._source
        params = source.parameters() if hasattr(source, "parameters") else list(source)
        for name, value, grad in params:
            if grad is None or np.shape(grad) != value.shape:
                raise ValueError(f"{type(self).__name__}: gradient of '{name}' has shape {np.shape(grad)}, parameter {value.shape}")
        return params

    def step(self) -> None:
        """Apply one update to every parameter, in place."""
        params = self._current()
        self.steps += 1
        for index, (_, value, grad) in enumerate(params):
            self._update(index, value, np.asarray(grad, dtype=value.dtype))

    def _update(self, index: int, value: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    r"""Stochastic gradient descent with (heavy-ball) momentum.

    .. math::
        v_t = \mu\, v_{t-1} + g_t \quad (v_1 = g_1), \qquad \theta_t = \theta_{t-1} - \eta\, v_t

    Parameters
    ----------
    params : object with ``parameters()``, or list of ``(name, array, grad)``
    lr : float
        Learning rate :math:`\eta`.
    momentum : float
        :math:`\mu \in [0, 1)`; 0 is plain SGD.
    """

    def __init__(self, params: _HasParameters | Sequence[Parameter], lr: float = 0.01, momentum: float = 0.0) -> None:
        super().__init__(params, lr)
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self._velocity: dict[int, np.ndarray] = {}

    def _update(self, index: int, value: np.ndarray, grad: np.ndarray) -> None:
        if self.momentum == 0.0:
            value -= self.lr * grad
            return
        velocity = self._velocity.get(index)
        if velocity is None:
            velocity = self._velocity[index] = grad.copy()
        else:
            velocity *= self.momentum
            velocity += grad
        value -= self.lr * velocity


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) with bias-corrected moments.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,

        \theta_t = \theta_{t-1} - \eta\, \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    Parameters
    ----------
    params : object with ``parameters()``, or list of ``(name, array, grad)``
    lr : float
        :math:`\eta` (default 1e-3, as in the paper and in PyTorch).
    betas : (float, float)
        :math:`(\beta_1, \beta_2)`, default (0.9, 0.999).
    eps : float
        :math:`\epsilon`, added outside the square root as PyTorch does (default 1e-8).
    """

    def __init__(
        self,
        params: _HasParameters | Sequence[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        beta1, beta2 = (float(b) for b in betas)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Adam: betas must lie in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"Adam: eps must be > 0, got {eps}")
        self.beta1, self.beta2, self.eps = beta1, beta2, float(eps)
        self._m: dict[int, np.ndarray] = {}
        self._v: dict[int, np.ndarray] = {}

    def _update(self, index: int, value: np.ndarray, grad: np.ndarray) -> None:
        m = self._m.setdefault(index, np.zeros_like(value))
        v = self._v.setdefault(index, np.zeros_like(value))
        m *= self.beta1
        m += (1.0 - self.beta1) * grad
        v *= self.beta2
        v += (1.0 - self.beta2) * grad * grad
        correction1 = 1.0 - self.beta1**self.steps
        correction2 = 1.0 - self.beta2**self.steps
        denom = np.sqrt(v / correction2) + self.eps
        value -= (self.lr / correction1) * m / denom
