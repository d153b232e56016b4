"""Mini-batch training, evaluation three ways, and exact recomputation of BN statistics.

Batch normalization gives a network three ways to normalize at test time, and `evaluate` reports
the accuracy of each:

- ``batch``: training-mode forward (``training=True``), each BN normalizing with the statistics
  of the test batch itself. Not usable in deployment (the output depends on the other samples in
  the batch; a batch of one is normalized to ``beta``), but it shows what the network learned.
- ``moving``: inference mode with the moving statistics (the EMA accumulated during training):
  what a deployed model computes.
- ``population``: inference mode after `recompute_statistics` replaced each BN's moving
  statistics with the exact statistics of its input over the training set.

When ``moving`` lags far behind the other two, the EMA has not converged (momentum too close to 1
for the number of steps taken): the classic trap `bnfold train --momentum 0.99` makes visible.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from bnfold.moments import Moments
from bnfold.nn.losses import softmax_cross_entropy
from bnfold.nn.model import Sequential
from bnfold.nn.optim import Optimizer

__all__ = [
    "Evaluation",
    "EpochResult",
    "minibatches",
    "train_epoch",
    "train",
    "accuracy",
    "evaluate",
    "recompute_statistics",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy (fraction correct) with the three kinds of BN statistics."""

    batch: float
    moving: float
    population: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class EpochResult:
    """Mean training loss of one epoch, its step count so far, and the evaluation after it."""

    epoch: int
    steps: int
    loss: float
    evaluation: Evaluation | None


def _split(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    # ceil(n / batch_size) batches of nearly equal size (sizes differ by at most one), instead
    # of full batches plus a small remainder: a remainder of 1-3 samples gives BN statistics so
    # noisy that they disturb training (and a batch of one is an error in training mode).
    return np.array_split(indices, max(1, math.ceil(len(indices) / batch_size)))


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield index arrays covering ``range(n)`` once, in an order shuffled by ``rng``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    yield from _split(rng.permutation(n), batch_size)


def train_epoch(
    model: Sequential,
    x: np.ndarray,
    y: np.ndarray,
    *,
    optimizer: Optimizer,
    batch_size: int,
    rng: np.random.Generator,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Run one shuffled pass of training steps; return the mean loss over its batches.

    Each step: ``forward(training=True)`` (BN normalizes with batch statistics and updates its
    moving statistics), softmax cross-entropy, ``backward``, ``optimizer.step()``.
    ``on_batch(batch_len)`` is called after every step (for progress bars).
    """
    losses = []
    for index in minibatches(len(x), batch_size, rng):
        logits = model.forward(x[index], training=True)
        loss, dlogits = softmax_cross_entropy(logits, y[index])
        model.backward(dlogits)
        optimizer.step()
        losses.append(loss)
        if on_batch is not None:
            on_batch(len(index))
    return float(np.mean(losses))


def train(
    model: Sequential,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    optimizer: Optimizer,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train ``model`` in place for ``epochs`` shuffled passes over ``(x_train, y_train)``.

    Parameters
    ----------
    model : Sequential
    x_train, y_train : numpy.ndarray
        (N, F) features and (N,) integer labels.
    optimizer : SGD or Adam
        Built on ``model`` (it reads ``model.parameters()`` at each step).
    epochs, batch_size : int
        Every epoch splits a fresh permutation into ``ceil(N / batch_size)`` batches of nearly
        equal size.
    rng : numpy.random.Generator
        The only source of randomness (shuffling).
    x_test, y_test : numpy.ndarray, optional
        When given, every epoch ends with `evaluate` on them (the model itself is not changed).
    on_batch, on_epoch : callable, optional
        Called after each step with the batch length, and after each epoch with its result.

    Returns
    -------
    list of EpochResult
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    history = []
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, x_train, y_train, optimizer=optimizer, batch_size=batch_size, rng=rng, on_batch=on_batch)
        evaluation = None
        if x_test is not None and y_test is not None:
            evaluation = evaluate(model, x_test, y_test, x_train=x_train, batch_size=batch_size)
        result = EpochResult(epoch=epoch, steps=optimizer.steps, loss=loss, evaluation=evaluation)
        log.info("epoch %d: loss %.4f %s", epoch, loss, evaluation)
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return history


def accuracy(model: Sequential, x: np.ndarray, y: np.ndarray, *, training: bool = False, batch_size: int = 256) -> float:
    """Fraction of ``argmax(model(x)) == y``.

    With ``training=True`` each BN normalizes with the statistics of each evaluation batch
    (``ceil(N / batch_size)`` batches of nearly equal size); this runs on a copy of the model, so
    ``model``'s moving statistics are left untouched.
    """
    if training:
        model = copy.deepcopy(model)
    correct = 0
    for index in _split(np.arange(len(x)), batch_size):
        logits = model.forward(x[index], training=training)
        correct += int((logits.argmax(axis=1) == y[index]).sum())
    return correct / len(x)


def evaluate(model: Sequential, x: np.ndarray, y: np.ndarray, *, x_train: np.ndarray, batch_size: int = 256) -> Evaluation:
    """Accuracy on ``(x, y)`` with batch, moving, and recomputed population statistics.

    ``batch_size`` sets the evaluation batches for the batch-statistics accuracy (use the training
    batch size to see what training-mode validation would report). Population statistics are
    recomputed over ``x_train`` on a copy of the model: ``model`` is not changed.
    """
    recomputed = copy.deepcopy(model)
    recompute_statistics(recomputed, x_train)
    return Evaluation(
        batch=accuracy(model, x, y, training=True, batch_size=batch_size),
        moving=accuracy(model, x, y, training=False),
        population=accuracy(recomputed, x, y, training=False),
    )


def recompute_statistics(model: Sequential, x: np.ndarray, *, batch_size: int = 256) -> None:
    r"""Set every BN's moving statistics to the exact statistics of its input over ``x``.

    BNs are processed in forward order. For BN number k, the data is streamed (in chunks of
    ``batch_size``) through the layers in front of it in *inference mode*, so every upstream BN
    already uses its recomputed statistics; the per-channel mean and biased variance of the
    result, over all samples (and spatial positions), become its ``moving_mean`` and
    ``moving_var``.

    Why this order and these statistics: at inference BN k sees exactly the inputs produced by
    inference-mode upstream layers, so those inputs are the population whose statistics it
    needs. Estimating all BNs in one pass with the *old* upstream statistics would give each BN
    the statistics of a distribution it never sees at inference. The variance is the biased one
    (divide by the count m) because that is what batch normalization divides by: after this call,
    inference on ``x`` equals a training-mode forward of all of ``x`` as a single batch (the
    tests check exactly that). The same in both conventions; PyTorch stores an unbiased
    estimate in its running variance during training, which differs by the factor m / (m - 1),
    about 1e-3 relative on the digits training set. This is "precise BN" (Wu & Johnson, 2021) with
    the whole training set.

    Chunks are merged in float64 with Chan et al.'s pairwise update of (count, mean, M2)
    (`bnfold.moments.Moments`, the same code as ``bnfold recalibrate``), so the result does not
    depend on ``batch_size`` beyond rounding. Costs one inference pass over ``x``
    per BN.
    """
    x = np.asarray(x)
    if len(x) < 2:
        raise ValueError(f"recompute_statistics: need at least 2 samples, got {len(x)}")
    for position, bn in model.batchnorms():
        upstream = model.layers[:position]
        total = Moments.empty(bn.num_features)
        for index in _split(np.arange(len(x)), batch_size):
            h = x[index]
            for layer in upstream:
                h = layer.forward(h, training=False)
            total = total.merge(Moments.from_batch(h, axis=bn.axis))
        dtype = np.asarray(bn.moving_mean).dtype
        bn.moving_mean = total.mean.astype(dtype)
        bn.moving_var = total.var.astype(dtype)
        log.debug("layer %d: recomputed statistics over %d values per channel", position, total.count)
