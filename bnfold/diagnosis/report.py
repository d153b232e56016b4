"""What `bnfold.inspect` found: one `BNDiagnosis` per BN, model-level flags, the checks that ran.

Flags come in two levels. ``wrong`` flags (`WRONG`) mean the model computes something other than
inference-mode batch normalization with good statistics; ``bnfold inspect`` exits 1 on any of
them. ``warning`` flags are worth knowing but do not change the exit code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Flag", "BNDiagnosis", "InspectReport", "WRONG", "WARNINGS"]

Level = Literal["wrong", "warning"]

#: The names of the flags that make ``bnfold inspect`` exit 1, as printed.
WRONG = ("never updated", "invalid", "batch statistics", "not deterministic", "stale")
#: The names of the warnings (exit 0 on their own).
WARNINGS = ("huge fold scale", "float16", "dead channels", "training switch")


@dataclass
class Flag:
    """One finding: ``name`` (one of `WRONG` or `WARNINGS`), its level, and what exactly was seen."""

    name: str
    level: Level
    detail: str

    def text(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass
class BNDiagnosis:
    """One BatchNormalization node, or one decomposed BN (a per-channel Mul/Add chain) of the fold pass.

    Attributes
    ----------
    name, graph : str
        The node's name (``<BatchNormalization -> y>`` when unnamed) and the graph holding it, as
        in `bnfold.folding.FoldReport` (``main``, ``main/If_0.then_branch``, ``function:f``).
    kind : {"BatchNormalization", "decomposed"}
    channels : int or None
    epsilon : float or None
    mean, var : dict or None
        ``{"min": .., "max": ..}`` of the moving mean / variance (None when not constant, or for a
        decomposed BN, whose statistics are merged into its scale).
    scale : dict or None
        ``{"min": .., "max": ..}`` of ``|gamma| / sqrt(var + eps)`` (the factor a fold multiplies
        weights by); for a decomposed BN its collapsed per-channel scale.
    convert : str
        What ``bnfold convert`` would do: ``folded into 'conv1'``, ``decomposed`` or ``kept: <reason>``.
    flags : list of Flag
    drift : dict or None
        With data (`bnfold.diagnosis.staleness.drift`): per channel ``mean_shift``
        (|moving mean - data mean| / data std) and ``var_ratio`` (moving / data variance), as
        lists, the largest shift, the ratio furthest from 1, and the data's own mean and variance.
    """

    name: str
    graph: str
    kind: str
    channels: int | None = None
    epsilon: float | None = None
    mean: dict[str, float] | None = None
    var: dict[str, float] | None = None
    scale: dict[str, float] | None = None
    convert: str = ""
    flags: list[Flag] = field(default_factory=list)
    drift: dict[str, Any] | None = None
    input: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.graph in ("", "main") else f"{self.name} (in {self.graph})"

    def add(self, name: str, detail: str) -> None:
        self.flags.append(Flag(name, "wrong" if name in WRONG else "warning", detail))


@dataclass
class InspectReport:
    """Everything `bnfold.inspect` found.

    Attributes
    ----------
    model : str
        Path or label of the model.
    bns : list of BNDiagnosis
    flags : list of Flag
        Model-level findings (cross-sample dependence, non-determinism, training switches), each
        naming the tensor or input where it was seen.
    checks : dict of str to str
        For each check, what was run or why it could not run (``batch statistics``,
        ``not deterministic``, ``stale``).
    fold_error : str or None
        Why ``bnfold convert`` would refuse the model outright (an invalid BN), if it would.
    switches : list of dict
        Training switches (an ``If`` on a constant or initializer-backed input) with their input,
        default and what each value selects.
    """

    model: str
    bns: list[BNDiagnosis] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    fold_error: str | None = None
    switches: list[dict[str, Any]] = field(default_factory=list)
    #: Position in ``bns`` -> the BN's constant parameters (`BatchNormParams`), for the stale check.
    _parameters: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    def all_flags(self) -> list[tuple[str, Flag]]:
        """``(where, flag)`` for every flag: BN flags under the BN's label, model flags under ``model``."""
        found = [(bn.label, flag) for bn in self.bns for flag in bn.flags]
        return found + [("model", flag) for flag in self.flags]

    @property
    def wrong(self) -> list[tuple[str, Flag]]:
        return [(where, flag) for where, flag in self.all_flags() if flag.level == "wrong"]

    @property
    def warnings(self) -> list[tuple[str, Flag]]:
        return [(where, flag) for where, flag in self.all_flags() if flag.level == "warning"]

    @property
    def ok(self) -> bool:
        """No ``wrong`` flag (``bnfold inspect`` exits 0)."""
        return not self.wrong

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "bn_total": len(self.bns),
            "wrong": sorted({flag.name for _, flag in self.wrong}),
            "warnings": sorted({flag.name for _, flag in self.warnings}),
            "fold_error": self.fold_error,
            "checks": dict(self.checks),
            "flags": [asdict(flag) for flag in self.flags],
            "switches": list(self.switches),
            "bns": [asdict(bn) for bn in self.bns],
        }

    def table(self) -> list[str]:
        """The per-BN table, columns aligned."""
        header = ["BN", "channels", "eps", "moving mean", "moving var", "convert", "flags"]
        rows = [_row(bn) for bn in self.bns]
        if any(bn.drift is not None for bn in self.bns):  # with data: the drift, before the flags
            header[-1:-1] = ["mean shift", "var ratio"]
            for row, bn in zip(rows, self.bns):
                row[-1:-1] = _drift_cells(bn.drift)
        rows = [header] + rows
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]).rstrip()
                for row in rows]

    def lines(self) -> list[str]:
        """What ``bnfold inspect`` prints: the table, flag details, the checks, a summary line."""
        out = self.table() if self.bns else [
            "no BatchNormalization (and no decomposed BN) in the model: no statistics to inspect (exporters"
            " fold Conv+BN themselves unless told not to, e.g. PyTorch's do_constant_folding=False)"]
        details = [f"{flag.level}: {where}: {flag.text()}" for where, flag in self.all_flags()]
        details += [f"{bn.label}: {bn.convert}" for bn in self.bns if bn.convert.startswith("kept")]
        if details:
            out.append("")
            out.extend(details)
        if self.fold_error:
            out.append(f"convert would refuse the model: {self.fold_error}")
        out.append("")
        out.extend(f"check {name}: {state}" for name, state in self.checks.items())
        out.append(self.summary())
        return out

    def summary(self) -> str:
        folds = sum(bn.convert.startswith(("folded", "decomposed")) for bn in self.bns)
        wrong = sorted({flag.name for _, flag in self.wrong})
        warnings = sorted({flag.name for _, flag in self.warnings})
        line = f"{len(self.bns)} BN, {folds} would fold; "
        line += ("WRONG: " + ", ".join(wrong)) if wrong else "no wrong statistics found"
        if warnings:
            line += "; warnings: " + ", ".join(warnings)
        return line


def _range(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    low, high = summary["min"], summary["max"]
    return f"{low:.3g}" if low == high else f"[{low:.3g}, {high:.3g}]"


def _row(bn: BNDiagnosis) -> list[str]:
    name = bn.label if bn.kind == "BatchNormalization" else f"{bn.label} (decomposed)"
    eps = "-" if bn.epsilon is None else f"{bn.epsilon:.3g}"
    channels = "-" if bn.channels is None else str(bn.channels)
    flags = ", ".join(dict.fromkeys(flag.name for flag in bn.flags)) or "-"
    return [name, channels, eps, _range(bn.mean), _range(bn.var), _short(bn.convert), flags]


def _drift_cells(drift: dict[str, Any] | None) -> list[str]:
    if drift is None:
        return ["-", "-"]
    return [f"{drift['max_mean_shift']:.3g} std", f"{drift['worst_var_ratio']:.3g}"]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
