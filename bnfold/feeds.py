"""The inputs verification feeds two models: which, how many samples, and in which batches.

- `unify_inputs`: the inputs both models take, with the shape each model's declaration allows.
- `plan_feeds`: random values (seeded) or the user's arrays, checked against the model; which
  inputs carry the batch (axis 0 symbolic), which look like parameters rather than data, and
  whether a ``--batch`` was overridden by a static batch dimension.
- `FeedPlan.chunk`: the rows ``[start, stop)`` of every batched input, other inputs whole, so that
  many samples stream through one session in batches.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.runtime import InputSpec, concrete_shape, random_inputs

__all__ = ["FeedPlan", "input_bytes", "looks_like_parameter", "plan_feeds", "unify_inputs"]

log = logging.getLogger(__name__)


@dataclass
class FeedPlan:
    """The arrays to feed and what the report says about them.

    Attributes
    ----------
    feeds : dict of str to numpy.ndarray
        Every input, in full.
    source : str
        ``"random"``, the ``.npz`` path or ``"the given arrays"``.
    seed : int or None
        Seed of the random values (None for the user's arrays).
    random : list of str
        The inputs fed random values.
    batched : list of str
        The inputs whose axis 0 is symbolic: split into batches of rows; others are fed whole.
    rows : int
        Samples: the axis-0 size of the batched inputs (of the first input when none is batched).
    notes, warnings : list of str
        What the report prints about the inputs.
    """

    feeds: dict[str, np.ndarray]
    source: str
    seed: int | None
    random: list[str]
    batched: list[str]
    rows: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def splittable(self) -> bool:
        """True when the samples can be fed in batches (every batched input has ``rows`` rows)."""
        return bool(self.batched) and all(self.feeds[name].shape[0] == self.rows for name in self.batched)

    def chunk(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The feeds for samples ``[start, stop)`` (views, no copy); everything when not splittable."""
        if not self.splittable:
            return self.feeds
        return {name: array[start:stop] if name in self.batched else array for name, array in self.feeds.items()}

    def describe(self) -> dict[str, dict[str, object]]:
        """dtype and shape of every input, as the JSON report lists them."""
        return {name: {"dtype": array.dtype.name, "shape": list(array.shape)} for name, array in self.feeds.items()}


def unify_inputs(ref: list[InputSpec], cand: list[InputSpec], ref_label: str, cand_label: str) -> list[InputSpec]:
    """The inputs of ``ref``, with each dimension fixed by either model; refuse models that differ."""
    ref_names = [spec.name for spec in ref]
    cand_by_name = {spec.name: spec for spec in cand}
    if set(ref_names) != set(cand_by_name):
        raise BnfoldError(
            f"{cand_label} has inputs {sorted(cand_by_name)} but {ref_label} has {sorted(ref_names)};"
            " both models must take the same inputs"
        )
    unified = []
    for spec in ref:
        other = cand_by_name[spec.name]
        if other.dtype != spec.dtype:
            raise BnfoldError(
                f"input '{spec.name}' is {other.dtype.name} in {cand_label} but {spec.dtype.name}"
                f" in {ref_label}"
            )
        if len(other.dims) != len(spec.dims):
            raise BnfoldError(
                f"input '{spec.name}' has rank {len(other.dims)} in {cand_label} but"
                f" {len(spec.dims)} in {ref_label}"
            )
        dims = []
        for mine, theirs in zip(spec.dims, other.dims):
            if isinstance(mine, int) and isinstance(theirs, int) and mine != theirs:
                raise BnfoldError(
                    f"input '{spec.name}' has shape {list(other.dims)} in {cand_label} but"
                    f" {list(spec.dims)} in {ref_label}"
                )
            dims.append(mine if isinstance(mine, int) else theirs)
        unified.append(InputSpec(spec.name, spec.dtype, tuple(dims)))
    return unified


def _is_batched(spec: InputSpec) -> bool:
    return bool(spec.dims) and not isinstance(spec.dims[0], int)


def looks_like_parameter(spec: InputSpec, specs: Sequence[InputSpec]) -> bool:
    """True for an input with no batch dimension beside inputs that have one.

    Such inputs (every dimension static while another input's axis 0 is symbolic, or a scalar or
    vector beside higher-rank data) are usually constants a converter left as graph inputs, such
    as the normalization mean and variance tf2onnx leaves in Keras 3 EfficientNet: random values
    there test nothing.
    """
    if any(not isinstance(dim, int) for dim in spec.dims):
        return False
    others = [other for other in specs if other.name != spec.name]
    if any(_is_batched(other) for other in others):
        return True
    return len(spec.dims) <= 1 and any(len(other.dims) >= 2 for other in others)


def _shape_text(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(dim) if dim is not None else "?" for dim in shape) + "]"


def _random_plan(specs: list[InputSpec], batch: int, seed: int) -> FeedPlan:
    feeds = random_inputs(specs, batch=batch, rng=np.random.default_rng(seed))
    batched = [spec.name for spec in specs if _is_batched(spec)]
    plan = FeedPlan(feeds=feeds, source="random", seed=seed, random=[spec.name for spec in specs],
                    batched=batched, rows=batch if batched else _first_rows(feeds, batch))
    static = [spec for spec in specs if spec.dims and isinstance(spec.dims[0], int) and spec.name not in batched
              and not looks_like_parameter(spec, specs)]
    if not batched and static and batch != static[0].dims[0]:
        described = ", ".join(f"'{spec.name}' {_shape_text(spec.dims)}" for spec in static[:3])
        plan.notes.append(
            f"the batch dimension is static ({described}): the model's batch size {static[0].dims[0]} is used,"
            f" not --batch {batch}"
        )
    for spec in specs:
        if looks_like_parameter(spec, specs):
            plan.warnings.append(
                f"input '{spec.name}' {_shape_text(spec.dims)} has no batch dimension: it looks like a parameter"
                " rather than data, and random values there test nothing; pass real values with --inputs"
            )
    return plan


def _first_rows(feeds: Mapping[str, np.ndarray], default: int) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else default


def _check_user_inputs(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec],
                       source: str) -> dict[str, np.ndarray]:
    by_name = {spec.name: spec for spec in specs}
    extra = sorted(set(arrays) - set(by_name))
    if extra:
        raise BnfoldError(f"{source}: array '{extra[0]}' is not an input of the model (inputs: {sorted(by_name)})")
    missing = sorted(set(by_name) - set(arrays))
    if missing:
        raise BnfoldError(f"{source}: no array for model input '{missing[0]}' (inputs: {sorted(by_name)})")
    checked = {}
    for name, spec in by_name.items():
        array = np.asarray(arrays[name])
        if array.dtype != spec.dtype:
            raise BnfoldError(
                f"{source}: array '{name}' has dtype {array.dtype.name}, the model input expects"
                f" {spec.dtype.name}"
            )
        fixed_ok = all(not isinstance(dim, int) or dim == size for dim, size in zip(spec.dims, array.shape))
        if array.ndim != len(spec.dims) or not fixed_ok:
            expected = ["?" if not isinstance(d, int) else d for d in spec.dims]
            raise BnfoldError(
                f"{source}: array '{name}' has shape {list(array.shape)}, the model input expects"
                f" {expected}"
            )
        checked[name] = array
    return checked


def _user_plan(inputs: Mapping[str, np.ndarray] | str | os.PathLike, specs: list[InputSpec], batch: int) -> FeedPlan:
    if isinstance(inputs, (str, os.PathLike)):
        from bnfold.io import load_npz

        source, arrays = str(inputs), load_npz(inputs)
    else:
        source, arrays = "the given arrays", dict(inputs)
    feeds = _check_user_inputs(arrays, specs, source)
    batched = [spec.name for spec in specs if _is_batched(spec)]
    rows = int(feeds[batched[0]].shape[0]) if batched else _first_rows(feeds, batch)
    return FeedPlan(feeds=feeds, source=source, seed=None, random=[], batched=batched, rows=rows)


def input_bytes(specs: Sequence[InputSpec], batch: int) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Bytes of random inputs at ``batch``, and their shapes (computed before allocating)."""
    shapes = {spec.name: concrete_shape(spec, batch) for spec in specs}
    return sum(math.prod(shapes[spec.name]) * spec.dtype.itemsize for spec in specs), shapes


def plan_feeds(specs: list[InputSpec], inputs: Mapping[str, np.ndarray] | str | os.PathLike | None, *,
               batch: int, seed: int) -> FeedPlan:
    """Random inputs (``inputs`` None) or the user's, checked against ``specs`` (see `FeedPlan`)."""
    plan = _random_plan(specs, batch, seed) if inputs is None else _user_plan(inputs, specs, batch)
    for line in plan.warnings:
        log.debug("%s", line)  # printed by the report; logging it too would repeat it on stderr
    return plan
