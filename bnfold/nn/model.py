"""A sequential model, and the builder of the digits classifier.

The classifier (the network `bnfold train` fits and later steps export to ONNX)::

    x (N, 64) -> Dense(64, H1, no bias) -> BatchNorm(H1) -> ReLU
              -> Dense(H1, H2, no bias) -> BatchNorm(H2) -> ReLU
              -> Dense(H2, 10, bias) -> logits (N, 10)

Softmax lives in the loss, not in the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bnfold.nn.layers import Dense, LeakyReLU, Parameter, ReLU

__all__ = ["Sequential", "build_mlp", "is_batchnorm", "ACTIVATIONS", "UNSET"]

log = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "leaky_relu")

# "Not given": None cannot serve, since momentum=None is the cumulative average (torch convention).
UNSET: Any = object()


def is_batchnorm(layer: Any) -> bool:
    """True for a `bnfold.nn.batchnorm.BatchNorm` layer."""
    from bnfold.nn.batchnorm import BatchNorm

    return isinstance(layer, BatchNorm)


class Sequential:
    """Layers applied one after another.

    ``forward`` runs them in order, ``backward`` in reverse order (each layer uses the cache of
    its own last forward), ``parameters()`` lists every layer's parameters named
    ``"<layer index>.<name>"`` (the names used in checkpoints).
    """

    def __init__(self, layers: Iterable[Any]) -> None:
        self.layers = list(layers)
        for index, layer in enumerate(self.layers):
            for method in ("forward", "backward", "parameters"):
                if not callable(getattr(layer, method, None)):
                    raise TypeError(f"Sequential: layer {index} ({type(layer).__name__}) has no {method}()")

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Return the output of the last layer; ``training`` is passed to every layer."""
        for layer in self.layers:
            x = layer.forward(x, training=training)
        return x

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Back-propagate ``dy`` (gradient of the loss w.r.t. the output); return the input gradient."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self) -> list[Parameter]:
        """``[("<i>.<name>", array, grad), ...]`` over all layers, in layer order."""
        return [(f"{index}.{name}", value, grad) for index, layer in enumerate(self.layers) for name, value, grad in layer.parameters()]

    def batchnorms(self) -> list[tuple[int, Any]]:
        """``[(layer index, BatchNorm), ...]`` in forward order."""
        return [(index, layer) for index, layer in enumerate(self.layers) if is_batchnorm(layer)]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner}\n])"


def _activation(name: str) -> Any:
    if name == "relu":
        return ReLU()
    if name == "leaky_relu":
        return LeakyReLU()
    raise ValueError(f"build_mlp: activation must be one of {ACTIVATIONS}, got {name!r}")


def build_mlp(
    hidden: Sequence[int] = (128, 64),
    *,
    in_features: int = 64,
    num_classes: int = 10,
    convention: str = "keras",
    momentum: Any = UNSET,
    activation: str = "relu",
    rng: np.random.Generator,
    dtype: np.dtype | type = np.float32,
) -> Sequential:
    """Build ``[Dense(no bias) -> BatchNorm -> activation] * len(hidden) -> Dense(bias)``.

    Parameters
    ----------
    hidden : sequence of int
        Width of each hidden block (at least one).
    convention : {"keras", "torch"}
        Moving-statistics convention of every BatchNorm (see `bnfold.nn.batchnorm.BatchNorm`).
    momentum : float, optional
        BatchNorm momentum *in that convention* (Keras: weight of the old moving value; PyTorch:
        weight of the new batch statistic; None = cumulative average). Omitted: the convention's
        own default. The default
        `bnfold train` passes is 0.9 (keras) / 0.1 (torch): the same EMA in both conventions.
    activation : {"relu", "leaky_relu"}
    rng : numpy.random.Generator
        Draws the initial Dense weights.
    """
    from bnfold.nn.batchnorm import BatchNorm

    hidden = [int(h) for h in hidden]
    if not hidden or min(hidden) < 1:
        raise ValueError(f"build_mlp: hidden sizes must be positive and non-empty, got {hidden}")
    bn_kwargs: dict[str, Any] = {"convention": convention}
    if momentum is not UNSET:
        bn_kwargs["momentum"] = momentum
    layers: list[Any] = []
    width = in_features
    for size in hidden:
        layers.append(Dense(width, size, use_bias=False, rng=rng, dtype=dtype))
        layers.append(BatchNorm(size, **bn_kwargs))
        layers.append(_activation(activation))
        width = size
    layers.append(Dense(width, num_classes, use_bias=True, rng=rng, dtype=dtype))
    return Sequential(layers)
