"""Convert an ONNX model file: load, fold BatchNormalization, verify, write (`bnfold convert`).

The pipeline: load (`bnfold.io.load_model`), fold (`bnfold.folding.fold`), verify against the input
in onnxruntime, layer by layer (`bnfold.verification.verify`, unless ``verify=False``), write OUT
atomically. OUT is written only after verification passed, so a failed run never leaves OUT behind
and never touches an existing OUT. When verification fails, the folds responsible are found
starting from the first failing tensor: a folded node keeps its BN's output name, so that tensor
names the fold; it is left unfolded and verification repeated until it passes. When the first
failing tensor is not a fold's output (or with ``outputs_only``), bisection
(`bnfold.verification.find_culprits`, re-folding with ``exclude=``) finds them. With
``keep_failing_unfolded=True`` the model is written with just those BNs left unfolded (verified).

Models whose tensors were stored as external data, or that exceed protobuf's 2 GB limit, are
written with every tensor of 1 KiB or more in a sidecar ``OUT.<content hash>.data`` beside OUT
(`bnfold.io.save_model`), so that replacing OUT never breaks the previous file's data.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bnfold.errors import BnfoldError, VerificationError
from bnfold.folding.report import NO_BATCHNORM
from bnfold.io.files import serialized_size
from bnfold.io.writing import write_json, written_size

__all__ = ["convert", "ConvertResult", "NO_BATCHNORM"]

# Kept BNs whose reasons differ only in the names they quote are summarized on one line.
_QUOTED = re.compile(r"'[^']*'")

# Protobuf refuses to serialize messages of 2 GiB or more; leave headroom for the graph itself.
_PROTOBUF_LIMIT = 2**31 - 2**24


@dataclass
class ConvertResult:
    """What `convert` did.

    Attributes
    ----------
    data : dict
        The machine-readable report (what ``bnfold convert --json`` writes): input, output, ok,
        BN counts, fold entries, tensor map, node counts, sizes, verification, timing.
    report : bnfold.folding.FoldReport
        BN by BN: folded into which node, or kept and why.
    verification : bnfold.verification.VerifyReport or None
        None when verification was skipped.
    """

    data: dict[str, Any]
    report: Any
    verification: Any = None

    @property
    def ok(self) -> bool:
        return bool(self.data["ok"])

    def lines(self, *, verbose: bool = False) -> list[str]:
        """The human-readable summary ``bnfold convert`` prints (``verbose``: every BN by name)."""
        return _summary_lines(self.data, self.report, verbose=verbose)

    def final_line(self) -> str:
        """One line: IN -> OUT, the BN count and the verdict (what ``bnfold -q convert`` prints)."""
        data = self.data
        text = f"{data['input']} -> {data['output']}: "
        total = data["bn_total"]
        text += f"BN folded {data['bn_folded']} of {total}" if total else "no BatchNormalization"
        if data["verification"] is None:
            return text + ", verification skipped"
        verdict = "equivalent" if data["verification"]["ok"] else "NOT equivalent"
        return text + f", max abs error {data['max_abs_error']:.3g}: {verdict}"


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
            force: bool = False, in_place: bool = False, verify: bool = True, check: bool = False,
            decompose_rest: bool = False, keep_initializer_inputs: bool = False,
            keep_failing_unfolded: bool = False, json_path: str | os.PathLike | None = None,
            inline_functions: bool = False, inputs: str | os.PathLike | Mapping[str, Any] | None = None,
            rtol: float | None = None,
            atol: float | None = None, batch: int = 1, seed: int = 0, threads: int = 1,
            max_bytes: int = 2 * 1024**3, outputs_only: bool = False, pins: Mapping[str, Any] | None = None,
            strict: bool = False, warn: Callable[[str], None] | None = None) -> ConvertResult:
    """Fold the BatchNormalization nodes of the ONNX file `input_path` and write `output_path`.

    Parameters
    ----------
    input_path, output_path : path
        IN and OUT. IN is never modified; OUT is written atomically, only after verification
        passed. ``output_path=None`` requires ``in_place=True`` (OUT = IN).
    force : bool
        Allow replacing an existing OUT.
    in_place : bool
        Allow OUT to be IN.
    verify : bool
        Compare OUT with IN in onnxruntime before writing (``False`` never imports onnxruntime).
    check : bool
        Run ``onnx.checker.check_model(full_check=True)`` on OUT before writing it.
    decompose_rest, keep_initializer_inputs, pins, inline_functions :
        Options of `bnfold.folding.fold`. ``pins`` fixes training-switch inputs
        (``{"training:0": False}``; ``--set``); OUT is then verified against IN run with those
        values.
    keep_failing_unfolded : bool
        If verification fails, leave the BNs responsible unfolded and write the verified rest.
    json_path : path, optional
        Also write ``ConvertResult.data`` as JSON here (also when verification fails).
    inputs, rtol, atol, batch, seed, threads, max_bytes, outputs_only :
        Options of `bnfold.verification.verify` (layer by layer unless ``outputs_only``).
    strict : bool
        Treat the statistics flags that mean "wrong" (`bnfold.diagnosis.preflight`: never
        updated, invalid, batch statistics, not deterministic) as an error: `VerificationError`,
        OUT not written. Without it they are only told through ``warn``.
    warn : callable, optional
        Called with one line per such flag, before folding.

    Returns
    -------
    ConvertResult

    Raises
    ------
    BnfoldError
        Bad input, unsafe or unwritable paths, IN or OUT not deterministic (nothing written).
    VerificationError
        OUT disagrees with IN (OUT not written; ``.report`` is the `VerifyReport`), or ``strict``
        and a statistics flag (``.report`` is None).
    """
    started = time.perf_counter()
    source = Path(input_path)
    if output_path is None and not in_place:
        raise BnfoldError("missing -o/--output (or give --in-place to replace IN)")
    out = Path(output_path) if output_path is not None else source
    _check_paths(source, out, force=force, in_place=in_place, json_path=json_path)
    # External data stays on disk (memory-mapped) until the end: `stack` closes it.
    with contextlib.ExitStack() as stack:
        # Folded and only written (no session, no checker): large folded weights stay arrays and
        # go from them into OUT, never through protobuf (`bnfold.io.mapped`, rule 4).
        model, external, size_before, in_bytes = _load(source, out, stack, hold_new=not verify and not check)
        statistics = _statistics(model, pins, str(source), out, run=verify, threads=threads, strict=strict,
                                 warn=warn)
        loaded = time.perf_counter()

        fold_options = {"decompose_rest": decompose_rest, "keep_initializer_inputs": keep_initializer_inputs,
                        "inline_functions": inline_functions}
        if pins:
            fold_options["pins"] = dict(pins)
        folded, report = _fold(model, fold_options)
        fold_done = time.perf_counter()

        result: dict[str, Any] = {"input": str(source), "output": str(out), "ok": True, "verification": None,
                                  "max_abs_error": None, "culprits": [], "kept_unfolded": [],
                                  "external_data": external, "statistics": statistics}
        verification = None
        staged = _stage(folded, out, external, stack) if verify else None
        if verify:
            options = {"inputs": inputs, "rtol": rtol, "atol": atol, "batch": batch, "seed": seed,
                       "threads": threads, "max_bytes": max_bytes, "names": (str(source), f"folded model for {out}"),
                       "outputs_only": outputs_only}
            # Pinned switches: the reference is IN run with the pinned values (its own default otherwise).
            reference = _pinned_reference(model, pins)
            folded, report, verification = _verify(reference, folded, report, fold_options, options,
                                                   keep_failing_unfolded, result)
            verification.reference, verification.candidate = str(source), str(out)
            result.update(verification=verification.to_dict(), max_abs_error=verification.max_abs,
                          ok=verification.ok, verification_summary=verification.summary())
        verify_done = time.perf_counter()
        result.update({
            "bn_folded": report.folded,
            "bn_total": report.total,
            "fold": report.to_dict(),
            "tensor_map": _merged_tensor_map(report),
            "kept_by_reason": _kept_by_reason(report),
            "nodes": {"before": _count_nodes(model.graph), "after": _count_nodes(folded.graph)},
            "size_bytes": {"before": size_before, "after": None},
        })

        if not result["ok"]:
            result["timing_s"] = _timing(started, loaded, fold_done, verify_done, time.perf_counter())
            if json_path is not None:
                write_json(json_path, result)
            message = _failure_message(out, verification, report, result["culprits"], keep_failing_unfolded)
            raise VerificationError(message, verification)

        # A fold at most copies each weight once (shared weights) and replaces every BN's four vectors
        # with at most two: OUT is under twice IN's size, so only a large IN needs OUT measured.
        external = external or (in_bytes > _PROTOBUF_LIMIT // 2 and written_size(folded) > _PROTOBUF_LIMIT)
        if staged is not None and staged[1] is folded:  # verified as staged: move it into place
            staged[0].commit()
            if check:
                _check(str(out), out, written=True)
        else:
            _write(folded, out, external=external, check=check)
        sidecars = _external_files(out) if external else []
        result["size_bytes"]["after"] = _disk_size(out, sidecars)
        result["timing_s"] = _timing(started, loaded, fold_done, verify_done, time.perf_counter())
        if json_path is not None:
            write_json(json_path, result)
        return ConvertResult(data=result, report=report, verification=verification)


def _statistics(model: onnx.ModelProto, pins: Mapping[str, Any] | None, label: str, out: Path, *, run: bool,
                threads: int, strict: bool, warn: Callable[[str], None] | None) -> list[dict[str, str]]:
    """The wrong statistics flags of ``model`` (`bnfold.diagnosis.preflight`); raise under ``strict``."""
    from bnfold.diagnosis import preflight

    if pins:  # checked as the model will run: with the pinned switch values
        try:
            model = _pinned_reference(model, pins)
        except BnfoldError:
            pass  # a bad pin: the fold pass, next, says what is wrong with it

    wrong = preflight(model, label, run=run, threads=threads, warn=warn).wrong
    if strict and wrong:
        names = ", ".join(dict.fromkeys(f"{flag.name} ('{where}')" for where, flag in wrong))
        raise VerificationError(f"{out}: not written: --strict and the statistics are wrong: {names}")
    return [{"where": where, "flag": flag.name, "detail": flag.detail} for where, flag in wrong]


def _pinned_reference(model: onnx.ModelProto, pins: Mapping[str, Any]) -> onnx.ModelProto:
    from bnfold.folding.switches import pinned_reference

    return pinned_reference(model, pins)
def _merged_tensor_map(report) -> dict[str, list[str]]:
    """Every entry's tensor map in one: original tensor -> every new tensor computed from it."""
    merged: dict[str, list[str]] = {}
    for entry in report.entries:
        for name, news in entry.tensor_map.items():
            merged.setdefault(name, []).extend(new for new in news if new not in merged[name])
    return merged


def _stage(folded: onnx.ModelProto, out: Path, external: bool, stack: contextlib.ExitStack):
    """``(StagedModel, folded)``: OUT written beside its place before verification, for a model
    whose data stays on disk, so that onnxruntime verifies the very files that are then moved
    into place (one copy of the data, not two); None for other models. ``stack`` removes the
    staged files unless they are committed."""
    from bnfold.io.mapped import active
    from bnfold.io.writing import stage_model

    store = active()
    if not external or store is None or store.scratch_dir is None:
        return None
    staged = stack.enter_context(stage_model(folded, out))
    store.register_file(folded, staged.tmp)
    return staged, folded


def _count_nodes(graph: onnx.GraphProto) -> int:
    count = 0
    for node in graph.node:
        count += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                count += _count_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                count += sum(_count_nodes(sub) for sub in attribute.graphs)
    return count


def _external_files(path: Path) -> list[Path]:
    """Files holding the external data of the model at ``path`` (already validated by load_model)."""
    from bnfold.io.external import external_files_of

    return sorted(external_files_of(path))


def _disk_size(path: Path, extra: list[Path]) -> int:
    return path.stat().st_size + sum(item.stat().st_size for item in extra if item.is_file())


def _check(model_or_path: onnx.ModelProto | str, out: Path, *, written: bool = False) -> None:
    try:
        onnx.checker.check_model(model_or_path, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        state = "written, but" if written else "not written:"
        raise BnfoldError(f"{out}: {state} the folded model fails onnx.checker: {first}") from None


def _write(model: onnx.ModelProto, out: Path, *, external: bool, check: bool) -> None:
    from bnfold.io import save_model

    if check and not external:
        _check(model, out)
    save_model(model, out, external_data=external)
    if check and external:  # the checker reads models over 2 GB only from a file
        _check(str(out), out, written=True)


def _check_paths(input_path: Path, out: Path, *, force: bool, in_place: bool, json_path: str | None) -> None:
    from bnfold.io import check_output_path

    same = out.resolve() == input_path.resolve() or (
        out.exists() and input_path.exists() and os.path.samefile(out, input_path))
    if same and not in_place:
        raise BnfoldError(f"{out}: output is the same file as the input; use --in-place to allow it")
    check_output_path(out, overwrite=force or same, inputs=() if same else (input_path,))
    if json_path is not None:
        if Path(json_path).resolve() in (out.resolve(), input_path.resolve()):
            raise BnfoldError(f"{json_path}: the JSON report path equals the input or the output model")
        # Checked now, so that a bad report path fails before any work, not after OUT is written.
        check_output_path(json_path, overwrite=True)


def _fold(model: onnx.ModelProto, options: dict[str, Any], exclude: frozenset[str] = frozenset()):
    # Looked up at call time so that the fold pass is one module attribute (tests can wrap it).
    fold_module = importlib.import_module("bnfold.folding")
    return fold_module.fold(model, exclude=exclude, **options)


def _localize(model: onnx.ModelProto, folded: onnx.ModelProto, report: Any, fold_options: dict[str, Any],
              verify_options: dict[str, Any], verification: Any) -> list[str] | None:
    """Names of the BN folds that make verification fail, or None if they cannot be told apart.

    Starts from ``verification``'s first failing tensor: the fold whose BN output it is (or whose
    folded node produces it) is blamed, the model refolded without it and verified again, until
    verification passes. When a failing tensor names no fold, bisection over the remaining folds
    takes over.
    """
    from bnfold.verification import find_culprits, verify

    changed = [entry.bn for entry in report.entries if entry.status != "kept"]
    if not changed or len(set(changed)) != len(changed) or not all(changed):
        return None
    options = {**verify_options, "check_determinism": False}  # both models already passed that check
    by_tensor = _folds_by_tensor(model, folded, report)
    culprits: list[str] = []
    current = verification
    while current.first_failure is not None:
        first = current.first_failure
        blamed = by_tensor.get(first.name)
        if blamed is None or blamed in culprits:
            break
        culprits.append(blamed)
        candidate, _ = _fold(model, fold_options, frozenset(culprits))
        current = verify(model, candidate, **options)
    if current.ok:
        return culprits
    rest = [name for name in changed if name not in culprits]

    def fails(subset: frozenset[str]) -> bool:
        candidate, _ = _fold(model, fold_options, frozenset(changed) - subset | frozenset(culprits))
        return not verify(model, candidate, **options).ok

    found = culprits + find_culprits(rest, fails)
    return [name for name in changed if name in found] or None


def _folds_by_tensor(model: onnx.ModelProto, folded: onnx.ModelProto, report: Any) -> dict[str, str]:
    """Tensor name -> the BN whose fold computes it: the BN's output in IN, the outputs of the node
    it was folded into in OUT, and the renamed tensors of its tensor map (main graph only)."""
    bn_outputs = {node.name: node.output[0] for node in model.graph.node if node.name and node.output}
    folded_outputs = {node.name: list(node.output) for node in folded.graph.node if node.name}
    found: dict[str, str] = {}
    for entry in report.entries:
        if entry.status == "kept" or entry.graph not in ("", "main"):
            continue
        if entry.bn in bn_outputs:
            found.setdefault(bn_outputs[entry.bn], entry.bn)
        for name in folded_outputs.get(entry.into or "", []):
            found.setdefault(name, entry.bn)
        for news in entry.tensor_map.values():  # each original -> every new tensor computed from it
            for new in news:
                found.setdefault(new, entry.bn)
    return found


def _describe(report: Any, names: list[str]) -> str:
    into = {entry.bn: entry.into for entry in report.entries}
    return ", ".join(f"'{name}'" + (f" (into '{into[name]}')" if into.get(name) else "") for name in names)


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024**2:
        return f"{size / 1024:.1f} KiB"
    if size < 1024**3:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size / 1024**3:.2f} GiB"


def _kept_groups(report: Any) -> dict[str, list[Any]]:
    """Kept entries by their reason with quoted names blanked out (``'...'``), in report order."""
    groups: dict[str, list[Any]] = {}
    for entry in report.entries:
        if entry.status == "kept":
            groups.setdefault(_QUOTED.sub("'...'", entry.reason or ""), []).append(entry)
    return groups


def _kept_by_reason(report: Any) -> dict[str, list[str]]:
    """The names of the kept BNs by reason (``--json``'s ``kept_by_reason``)."""
    return {reason: [entry.bn for entry in entries] for reason, entries in _kept_groups(report).items()}


def _entry_lines(report: Any, verbose: bool) -> list[str]:
    """Verbose: one line per BN. Otherwise one line per kept BN, except that a reason shared by
    several BNs gets one line with the count."""
    if verbose:
        return [entry.line() for entry in report.entries]
    lines = []
    for reason, entries in _kept_groups(report).items():
        if len(entries) == 1:
            lines.append(entries[0].line())
        else:
            lines.append(f"kept {len(entries)} BatchNormalization: {reason} (names with --verbose or --json)")
    return lines


def _summary_lines(result: dict[str, Any], report: Any, *, verbose: bool = False) -> list[str]:
    lines = [f"{result['input']} -> {result['output']}"]
    if report.total == 0:
        lines.append(NO_BATCHNORM)
    else:
        line = f"BN folded {report.folded} of {report.total}"
        if report.decomposed:
            line += f" ({report.decomposed} decomposed into Mul + Add)"
        lines.append(line)
    lines += _entry_lines(report, verbose)
    lines += [f"note: {note}" for note in report.notes]
    if report.subnormals_flushed:
        lines.append(f"note: {report.subnormals_flushed} subnormal folded values flushed to zero")
    if result.get("kept_unfolded"):
        lines.append(f"kept unfolded after failed verification: {', '.join(result['kept_unfolded'])}")
    nodes, size = result["nodes"], result["size_bytes"]
    lines.append(f"nodes {nodes['before']} -> {nodes['after']}, file size {_human(size['before'])} -> {_human(size['after'])}")
    verification = result["verification"]
    if verification is None:
        lines.append("verification skipped (--no-verify)")
    else:
        how = "layer by layer" if verification["mode"] == "layers" else "outputs only"
        lines.append(f"verified {how} (onnxruntime, graph optimizations disabled): {result['verification_summary']}")
    lines.append(f"time {result['timing_s']['total']:.2f} s")
    return lines


def _load(source: Path, out: Path, stack: contextlib.ExitStack, *,
          hold_new: bool = False) -> tuple[onnx.ModelProto, bool, int, int]:
    """The model, whether OUT should use external data, IN's size on disk (with its data), and
    the model's serialized size in memory.

    External data is memory-mapped, not read (`bnfold.io.mapped`): folds read only the tensors
    they change, large folded tensors wait in a scratch file beside OUT, and the writer copies
    the rest file to file. With ``hold_new`` large folded weights of a model without external
    data stay arrays until written (`bnfold.io.mapped.Held`). All of it lives as long as ``stack``.
    """
    from bnfold.io.files import resolved
    from bnfold.io.mapped import open_model

    model = stack.enter_context(open_model(source, scratch_dir=resolved(out).parent, hold_new=hold_new)).model
    data_files = _external_files(source)  # recorded by load_model: no second parse
    size = _disk_size(source, data_files)
    # Without external data the file is the serialized model; with it, the model without its data.
    in_bytes = serialized_size(model) if data_files else source.stat().st_size
    return model, bool(data_files) or in_bytes > _PROTOBUF_LIMIT, size, in_bytes


def _verify(model: onnx.ModelProto, folded: onnx.ModelProto, report: Any, fold_options: dict[str, Any],
            verify_options: dict[str, Any], keep_failing_unfolded: bool, result: dict[str, Any]):
    """Verify ``folded``; on failure name the responsible folds and, if asked, refold without them."""
    from bnfold.verification import verify

    verification = verify(model, folded, **verify_options)
    if verification.ok:
        return folded, report, verification
    culprits = _localize(model, folded, report, fold_options, verify_options, verification) or []
    result["culprits"] = culprits
    if culprits and keep_failing_unfolded:
        retry, retry_report = _fold(model, fold_options, frozenset(culprits))
        retry_verification = verify(model, retry, **verify_options, check_determinism=False)
        if retry_verification.ok:
            result["kept_unfolded"] = culprits
            return retry, retry_report, retry_verification
    return folded, report, verification


def _failure_message(out: Path, verification: Any, report: Any, culprits: list[str], keep_failing_unfolded: bool) -> str:
    message = f"{out}: not written: verification failed: {verification.summary()}"
    if not culprits:
        return message + "; no single fold could be blamed"
    message += f"; responsible folds: {_describe(report, culprits)}"
    if not keep_failing_unfolded:
        message += "; --keep-failing-unfolded writes OUT with them unfolded"
    return message


def _timing(started: float, loaded: float, folded: float, verified: float, finished: float) -> dict[str, float]:
    return {"load": round(loaded - started, 6), "fold": round(folded - loaded, 6),
            "verify": round(verified - folded, 6), "save": round(finished - verified, 6),
            "total": round(finished - started, 6)}
