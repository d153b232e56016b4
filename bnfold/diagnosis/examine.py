"""`inspect`: the statistics doctor, and the subset of it that `bnfold convert` runs.

``inspect(model, data=None)`` puts together:

- the checks from the file alone (`bnfold.diagnosis.records`): per BN its parameters, what
  ``convert`` would do (a dry run of the fold pass), ``never updated``, ``invalid``, a BN in
  training mode, and the warnings;
- the training switches of the model (`bnfold.folding.switches.find_switches`);
- the checks that run the model (`bnfold.diagnosis.mixing`): ``batch statistics`` (samples that
  mix) and ``not deterministic``;
- with data, ``stale`` (`bnfold.diagnosis.staleness`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import onnx

from bnfold.diagnosis.records import diagnose_static
from bnfold.diagnosis.report import Flag, InspectReport
from bnfold.errors import BnfoldError

__all__ = ["inspect", "preflight", "NO_RUN_FLAGS"]

log = logging.getLogger(__name__)

#: The wrong flags that need no run: what ``convert --no-verify`` checks.
NO_RUN_FLAGS = ("never updated", "invalid", "batch statistics")


def _load(model: onnx.ModelProto | str | os.PathLike, label: str | None) -> tuple[onnx.ModelProto, str]:
    from bnfold.runtime import load

    return load(model, label or "model")


def inspect(model: onnx.ModelProto | str | os.PathLike, data: Any = None, *, run: bool = True,
            batch: int = 4, seed: int = 0, batch_size: int = 256, threads: int = 1,
            label: str | None = None) -> InspectReport:
    """Diagnose the BatchNormalization statistics of ``model``.

    Parameters
    ----------
    model : onnx.ModelProto or path
        Not modified.
    data : path to an .npz, mapping of input name to array, or array (single-input models), optional
        Samples to measure each BN's input over (the ``stale`` check).
    run : bool
        Run the model in onnxruntime for ``batch statistics`` (cross-sample dependence) and
        ``not deterministic``. ``False`` never imports onnxruntime (unless ``data`` is given).
    batch : int
        Batch length for symbolic batch axes in those runs (at least 2).
    seed : int
        Seed of their random inputs.
    batch_size : int
        Samples per onnxruntime run when measuring ``data`` (memory only; results are exact).
    threads : int
        onnxruntime threads.
    label : str, optional
        Name of the model in messages (a path's own name by default).

    Returns
    -------
    InspectReport
        ``.ok`` is False when a wrong flag was found; ``.lines()`` is what ``bnfold inspect``
        prints, ``.to_dict()`` its JSON.
    """
    if batch < 2:
        raise BnfoldError(f"batch must be at least 2 to compare samples, got {batch}")
    if not isinstance(model, onnx.ModelProto):
        # External data stays on disk (memory-mapped): the dry-run fold reads what it needs and
        # leaves its folded weights uncomputed (examined block by block, never written),
        # onnxruntime reads the data from the files (`bnfold.io.mapped`).
        from bnfold.io.mapped import open_model

        with open_model(model, examine_only=True) as opened:
            return inspect(opened.model, data, run=run, batch=batch, seed=seed, threads=threads,
                           batch_size=batch_size, label=label or str(model))
    model, label = _load(model, label)
    dataset = _open_data(model, label, data) if data is not None else None  # bad data fails before any run
    report = _static(model, label)
    if run:
        try:
            _run_checks(model, label, report, batch=batch, seed=seed, threads=threads)
        except BnfoldError as exc:  # e.g. an operator onnxruntime lacks: the rest of the report stands
            for name in ("batch statistics", "not deterministic"):
                report.checks[name] = f"not run: {exc}"
    else:
        report.checks["batch statistics"] = "cross-sample check not run (attributes only)"
        report.checks["not deterministic"] = "not run"
    if dataset is not None:
        _stale(model, dataset, report, batch_size=batch_size, threads=threads)
    else:
        report.checks["stale"] = "not run: no data (--data)"
    return report


def preflight(model: onnx.ModelProto, label: str, *, run: bool, threads: int = 1,
              warn: Callable[[str], None] | None = None) -> InspectReport:
    """What `bnfold convert` checks before folding: the wrong flags, told through ``warn``.

    ``run=False`` (``convert --no-verify``) checks only `NO_RUN_FLAGS` from attributes and values,
    and never imports onnxruntime. Never raises for a flag; the caller decides (``--strict``).
    """
    report = _static(model, label, switches=False, dry_run=False)
    if run:
        try:
            _run_checks(model, label, report, batch=4, seed=0, threads=threads)
        except BnfoldError as exc:  # verification reports an unrunnable model in its own words
            log.debug("runtime checks not run: %s", exc)
    if warn is not None:
        for where, flag in report.wrong:
            warn(f"{where}: {flag.text()}")
    return report


def _static(model: onnx.ModelProto, label: str, switches: bool = True, dry_run: bool = True) -> InspectReport:
    diagnoses, fold_error, parameters = diagnose_static(model, dry_run=dry_run)
    report = InspectReport(model=label, bns=diagnoses, fold_error=fold_error, _parameters=parameters)
    if switches:
        _switches(model, report)
    return report


def _switches(model: onnx.ModelProto, report: InspectReport) -> None:
    """Each training switch (`bnfold.folding.switches.find_switches`): its input, default and what
    each value does, as a warning and in the JSON."""
    from bnfold.folding.switches import find_switches

    for switch in find_switches(model):
        text = switch.describe()
        report.switches.append({**switch.to_dict(), "text": text})
        report.flags.append(Flag("training switch", "warning", text.removeprefix("training switch ")))


def _run_checks(model: onnx.ModelProto, label: str, report: InspectReport, *, batch: int, seed: int,
                threads: int) -> None:
    from bnfold.diagnosis.mixing import check_runtime

    found = check_runtime(model, label, batch=batch, seed=seed, threads=threads)
    report.flags.extend(found.flags)
    report.checks.update(found.checks)


def _open_data(model: onnx.ModelProto, label: str, data: Any):
    from bnfold.dataset import open_dataset
    from bnfold.population import input_specs

    return open_dataset(data, input_specs(model, label))


def _stale(model: onnx.ModelProto, data: Any, report: InspectReport, *, batch_size: int, threads: int) -> None:
    from bnfold.diagnosis.staleness import drift, flag_stale
    from bnfold.population import bn_input_moments

    if not report._parameters:
        report.checks["stale"] = "nothing to measure: no BatchNormalization node with constant statistics"
        return
    moments = bn_input_moments(model, data, batch_size=batch_size, threads=threads)
    measured = 0
    for position, params in report._parameters.items():
        diagnosis = report.bns[position]
        stats = moments.get(diagnosis.input) if diagnosis.graph == "main" else None
        if stats is None or diagnosis.epsilon is None:
            continue
        if stats.mean.shape != params.mean.shape:
            continue
        flag_stale(diagnosis, drift(params.mean, params.var, stats.mean, stats.var, diagnosis.epsilon))
        measured += 1
    samples = next(iter(moments.values())).count if moments else 0
    report.checks["stale"] = (f"measured {measured} BN input(s) over the data ({samples} values per channel),"
                              " the model as it is")
    skipped = sum(bn.kind == "BatchNormalization" for bn in report.bns) - measured
    if skipped:
        report.checks["stale"] += (f"; {skipped} BN(s) not measured (inside control-flow bodies or functions,"
                                   " or with statistics computed at run time)")
