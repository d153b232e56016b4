"""What the fold pass did, BN by BN.

Every BatchNormalization node of the model (in the main graph, in control-flow bodies and in
model-local functions) gets one `FoldEntry`: ``folded`` into a neighbouring linear node,
``decomposed`` into a Mul + Add by constants, or ``kept`` with the reason it could not be folded
exactly. ``tensor_map`` maps each original weight / bias / BN parameter name to the names of the
tensors of the output computed from it (`bnfold.folding.finish`), so users can match checkpoints
to the folded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FoldEntry", "FoldReport", "Status", "NO_BATCHNORM"]

#: What the summaries say when a model has no BatchNormalization (nor a decomposed one) at all.
NO_BATCHNORM = ("no BatchNormalization: nothing to fold (PyTorch's and tf2onnx's exporters fold Conv+BN"
                " themselves by default)")

Status = Literal["folded", "kept", "decomposed"]


@dataclass
class FoldEntry:
    """The outcome for one BatchNormalization node (or one decomposed BN pattern).

    Attributes
    ----------
    bn : str
        Name of the BN node (for decomposed patterns: the first node of the pattern).
    graph : str
        Name of the graph or function holding it; nested bodies read ``"main/If_0.then_branch"``.
    status : {"folded", "kept", "decomposed"}
    into : str or None
        Name of the node that absorbed the BN (``status == "folded"``).
    reason : str or None
        Why the BN was kept (``status == "kept"``); ``None`` otherwise.
    tensor_map : dict of str to list of str
        Original tensor name -> names of every new tensor computed from it (e.g. a BN's ``var``
        -> the folded weight and the folded bias).
    """

    bn: str
    graph: str
    status: Status
    into: str | None = None
    reason: str | None = None
    tensor_map: dict[str, list[str]] = field(default_factory=dict)

    def line(self) -> str:
        """One human-readable line: ``BatchNormalization 'bn1': folded into 'conv1'``."""
        where = "" if self.graph in ("", "main") else f" (in {self.graph})"
        head = f"BatchNormalization '{self.bn}'{where}"
        if self.status == "folded":
            return f"{head}: folded into '{self.into}'"
        if self.status == "decomposed":
            target = f" into '{self.into}'" if self.into else ""
            return f"{head}: decomposed{target} (Mul + Add by constants)"
        return f"{head}: kept: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable view (what ``dataclasses.asdict`` gives, without its generic deep
        copy, which costs 80 us per entry: the fields are strings and a map of string lists)."""
        return {"bn": self.bn, "graph": self.graph, "status": self.status, "into": self.into,
                "reason": self.reason, "tensor_map": {name: list(news) for name, news in self.tensor_map.items()}}


@dataclass
class FoldReport:
    """All `FoldEntry` records of one `bnfold.folding.fold` call, plus model-level notes.

    Attributes
    ----------
    entries : list of FoldEntry
    notes : list of str
        Model-level changes, e.g. ``"raised IR version 3 -> 4"``.
    subnormals_flushed : int
        Folded values that were subnormal in their dtype and were set to zero (subnormal
        arithmetic is several times slower on CPUs).
    switches : list of bnfold.folding.switches.ResolvedSwitch
        The ``If`` nodes replaced by the branch their condition selects, by switch input
        (also in ``notes``).
    """

    entries: list[FoldEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    subnormals_flushed: int = 0
    switches: list[Any] = field(default_factory=list)

    @property
    def folded(self) -> int:
        """Number of BNs folded into a neighbour (decomposed ones are counted separately)."""
        return sum(entry.status == "folded" for entry in self.entries)

    @property
    def decomposed(self) -> int:
        """Number of BNs rewritten as Mul + Add by constants."""
        return sum(entry.status == "decomposed" for entry in self.entries)

    @property
    def kept(self) -> int:
        """Number of BNs left unchanged."""
        return sum(entry.status == "kept" for entry in self.entries)

    @property
    def total(self) -> int:
        """Number of BNs seen."""
        return len(self.entries)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable view."""
        return {
            "folded": self.folded,
            "decomposed": self.decomposed,
            "kept": self.kept,
            "total": self.total,
            "subnormals_flushed": self.subnormals_flushed,
            "notes": list(self.notes),
            "switches": [switch.to_dict() for switch in self.switches],
            "entries": [entry.to_dict() for entry in self.entries],
        }

    def lines(self) -> list[str]:
        """Human-readable summary: a count line, one line per BN, then the notes."""
        if not self.entries:
            out = [NO_BATCHNORM]
            out.extend(f"note: {note}" for note in self.notes)
            return out
        out = [f"BatchNormalization folded: {self.folded} of {self.total}"]
        if self.decomposed:
            out[0] += f" ({self.decomposed} decomposed into Mul + Add)"
        out.extend(entry.line() for entry in self.entries)
        out.extend(f"note: {note}" for note in self.notes)
        if self.subnormals_flushed:
            out.append(f"note: {self.subnormals_flushed} subnormal folded values flushed to zero")
        return out
