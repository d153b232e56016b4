"""The checks of `bnfold.inspect` that run the model: samples that mix, and runs that differ.

Both run in onnxruntime with graph optimizations DISABLED (`bnfold.runtime.session`): its
optimizer removes Dropout and would hide a training-mode export. Every intermediate tensor of the
main graph is exposed (`bnfold.runtime.expose`), so that a finding names the first tensor, in the
graph's (topological) node order, where it appears.

Rules (cited in the code as "rule N"):

1. ``not deterministic``: the model runs twice on the same batch; a tensor that differs between
   the runs is random (Dropout in training mode, RandomNormal, ...). The first such tensor is named.
2. ``batch statistics``: the model runs on a batch, then on the same batch with only its last
   sample replaced. A tensor whose first axis has the batch's length is "mixed" when a row other
   than the last one changed; any other tensor (e.g. a mean over axis 0 of shape (1, C)) is
   "batch-wide" when it changed at all. The model is flagged when a graph output is mixed (or,
   when the outputs are random, any deterministic tensor is): each sample's result depends on
   the other samples. The tensor named is where mixing starts: among the nodes the first mixed
   tensor depends on (itself included), the first node whose inputs are all clean and one of
   whose outputs is mixed or batch-wide (the ReduceMean over axis 0 of a ``training=True``
   export, or a BatchNormalization with ``training_mode=1``).
3. The batch check needs a batch axis: the first axis of every fed input of rank >= 1 is
   symbolic, or static and >= 2 (then the batch has that length); scalar inputs keep one value.
   Otherwise it does not run and the report says why. Random tensors (rule 1) are not compared.
4. Exports often fix the batch axis to 1 (PyTorch without ``dynamic_axes``). Then the check runs
   on a copy whose inputs' first axis is made free, if onnxruntime runs it with a batch of
   ``batch`` (a Reshape to a fixed shape may forbid it: then the report says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.diagnosis.report import Flag
from bnfold.errors import BnfoldError
from bnfold.runtime import (
    InputSpec,
    computed_tensors,
    concrete_shape,
    expose,
    feed_inputs,
    random_inputs,
    run,
    session,
    within_tolerance,
)

__all__ = ["RuntimeFindings", "check_runtime"]

log = logging.getLogger(__name__)

#: The runs keep every intermediate tensor of three runs: inputs beyond this are not drawn.
MAX_INPUT_BYTES = 256 * 2**20


@dataclass
class RuntimeFindings:
    flags: list[Flag]
    checks: dict[str, str]


def _batch_length(specs: list[InputSpec], default: int) -> tuple[int | None, str | None]:
    """Rule 3: the batch length to use, or None and why the batch check cannot run. Scalar inputs
    (a training flag, a threshold) are not batched: they keep their value in every run."""
    static = set()
    batched = [spec for spec in specs if spec.dims]
    if not batched:
        return None, "no input has a batch axis (no inputs, or scalars only)"
    for spec in batched:
        first = spec.dims[0]
        if isinstance(first, int):
            if first < 2:
                return None, f"input '{spec.name}' has a static first axis of {first}: no batch of 2 or more to compare"
            static.add(first)
    if len(static) > 1:
        return None, f"inputs disagree on the length of their first axis ({sorted(static)}): no common batch axis"
    return (static.pop() if static else default), None


def _runner(model: onnx.ModelProto, label: str, threads: int):
    """``(session, names)``: every intermediate exposed if onnxruntime accepts that, else the outputs."""
    names = computed_tensors(model)
    try:
        return session(expose(model, names), label, threads), names + [o.name for o in model.graph.output
                                                                         if o.name not in set(names)]
    except BnfoldError as exc:
        log.debug("exposing intermediates failed (%s); checking the outputs only", exc)
        return session(model, label, threads), [o.name for o in model.graph.output]


def _fixed_to_one(specs: list[InputSpec]) -> bool:
    batched = [spec for spec in specs if spec.dims]
    return bool(batched) and all(spec.dims[0] == 1 for spec in batched)


def _free_batch_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing the same tensors with the first axis of its inputs free
    (`bnfold.population.submodel`, which recalibration uses for the same reason)."""
    from bnfold.population import submodel

    outputs = computed_tensors(model)
    outputs += [o.name for o in model.graph.output if o.name not in set(outputs)]
    return submodel(model, outputs)


def _input_bytes(specs: list[InputSpec], length: int) -> int:
    return sum(int(np.prod(concrete_shape(spec, length), dtype=np.float64)) * spec.dtype.itemsize for spec in specs)


def check_runtime(model: onnx.ModelProto, label: str, *, batch: int = 4, seed: int = 0, threads: int = 1,
                  max_bytes: int = MAX_INPUT_BYTES) -> RuntimeFindings:
    """Run rules 1-3 on ``model``; raises `BnfoldError` if onnxruntime cannot run it.

    Inputs larger than ``max_bytes`` in total (static dimensions can be absurd) are not drawn:
    both checks then say they did not run.
    """
    specs = feed_inputs(model, label)
    rng = np.random.default_rng(seed)
    length, why_not = _batch_length(specs, batch)
    if length is None and _fixed_to_one(specs):  # rule 4
        try:
            found = check_runtime(_free_batch_axis(model), label, batch=batch, seed=seed, threads=threads,
                                  max_bytes=max_bytes)
        except BnfoldError as exc:
            why_not += f"; with it made free, onnxruntime cannot run the model ({exc})"
        else:
            found.checks["batch statistics"] += " (the static batch axis of 1 made free)"
            return found
    needed = _input_bytes(specs, length or 1)
    if needed > max_bytes:
        why = f"not run: the random inputs would take {needed / 2**20:.0f} MiB (limit {max_bytes / 2**20:.0f} MiB)"
        return RuntimeFindings([], {"not deterministic": why, "batch statistics": why})
    sess, names = _runner(model, label, threads)
    # np.asarray: a scalar bool input is drawn as a NumPy scalar, which onnxruntime refuses.
    feeds = {name: np.asarray(value) for name, value in random_inputs(specs, batch=length or 1, rng=rng).items()}
    first = dict(zip(names, run(sess, names, feeds, label)))
    second = dict(zip(names, run(sess, names, feeds, label)))
    # The verification bound (`bnfold.runtime.within_tolerance`): what `verify` and `convert` refuse
    # as not deterministic is exactly what is flagged here.
    random = [name for name in names if not within_tolerance(first[name], second[name])]
    del second  # every intermediate tensor of a run: not held while the third run computes its own
    flags: list[Flag] = []
    checks: dict[str, str] = {}
    producers = {out: node for node in model.graph.node for out in node.output if out}
    if random:  # rule 1
        node = producers.get(random[0])
        origin = f" ({node.op_type} '{node.name or node.output[0]}')" if node is not None else ""
        flags.append(Flag("not deterministic", "wrong",
                          f"two runs on the same input differ, first at tensor '{random[0]}'{origin};"
                          f" {len(random)} of {len(names)} tensors checked differ"))
    checks["not deterministic"] = f"ran twice on the same batch of {length or 1}, compared {len(names)} tensors"
    if length is None:
        checks["batch statistics"] = f"cross-sample check not run: {why_not}"
        return RuntimeFindings(flags, checks)
    changed = dict(feeds)
    fresh = random_inputs(specs, batch=length, rng=rng)
    for spec in specs:
        if not spec.dims:
            continue
        array = np.array(feeds[spec.name], copy=True)
        array[-1] = fresh[spec.name][-1]
        changed[spec.name] = array
    third = dict(zip(names, run(sess, names, changed, label)))
    state = _states(names, first, third, set(random), length)
    outputs = [o.name for o in model.graph.output]
    mixed_outputs = [name for name in outputs if state.get(name) == "mixed"]
    decided_by = mixed_outputs
    if not mixed_outputs and all(state.get(name) == "random" for name in outputs):
        decided_by = [name for name in names if state[name] == "mixed"]
    scalars = [f"{spec.name}={feeds[spec.name].item()!r}" for spec in specs if not spec.dims]
    given = f" (scalar inputs: {', '.join(scalars)})" if scalars else ""
    checks["batch statistics"] = (f"ran on a batch of {length}, changed sample {length - 1},"
                                  f" compared the other samples in {len(names)} tensors{given}")
    if random:
        checks["batch statistics"] += f" ({len(random)} random tensors not compared)"
    if decided_by:
        mixed = next(name for name in names if state[name] == "mixed")
        start = _start(mixed, producers, state, names)
        where = (f"{start.op_type} '{start.name or start.output[0]}' -> '{_first_unclean(start, state)}'"
                 if start is not None else f"'{mixed}'")
        subject = f"output '{mixed_outputs[0]}'" if mixed_outputs else f"tensor '{decided_by[0]}'"
        flags.append(Flag("batch statistics", "wrong",
                          f"{subject} of samples 0..{length - 2} changes when only sample {length - 1} changes{given}:"
                          f" the model normalizes over the batch; samples first mix at {where}"))
    return RuntimeFindings(flags, checks)


def _states(names: list[str], before: dict, after: dict, random: set[str], length: int) -> dict[str, str]:
    """Rule 2: ``clean``, ``mixed``, ``batch-wide`` or ``random`` per tensor."""
    states = {}
    for name in names:
        if name in random:
            states[name] = "random"
            continue
        a, b = np.asarray(before[name]), np.asarray(after[name])
        if a.ndim >= 1 and a.shape == b.shape and a.shape[0] == length:
            states[name] = "clean" if within_tolerance(a[:-1], b[:-1]) else "mixed"
        else:
            states[name] = "clean" if within_tolerance(a, b) else "batch-wide"
    return states


def _first_unclean(node: onnx.NodeProto, state: dict[str, str]) -> str:
    return next((out for out in node.output if state.get(out) in ("mixed", "batch-wide")), node.output[0])


def _start(mixed: str, producers: dict[str, onnx.NodeProto], state: dict[str, str],
           order: list[str]) -> onnx.NodeProto | None:
    """Rule 2: the first node (in graph order) that ``mixed`` depends on where mixing starts."""
    ancestors: dict[int, onnx.NodeProto] = {}
    stack = [mixed]
    seen = set()
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in ancestors or name in seen:
            continue
        seen.add(name)
        ancestors[id(node)] = node
        stack.extend(i for i in node.input if i)
    position = {name: i for i, name in enumerate(order)}
    starts = [
        node for node in ancestors.values()
        if any(state.get(out) in ("mixed", "batch-wide") for out in node.output)
        and all(state.get(i, "clean") == "clean" for i in node.input if i)
    ]
    if not starts:
        return None
    return min(starts, key=lambda node: min(position.get(out, len(order)) for out in node.output if out))
