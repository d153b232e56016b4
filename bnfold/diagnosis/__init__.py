"""The statistics doctor: what is wrong with a model's BatchNormalization statistics.

- `report`: `InspectReport`, `BNDiagnosis`, `Flag`; the table and the JSON.
- `records`: the checks from the file alone (parameters, dry run of the fold pass, never updated,
  invalid, training mode, warnings).
- `mixing`: the checks that run the model (samples that mix, runs that differ).
- `staleness`: moving statistics against the data's (``stale``).
- `drift_plot`: the ``--plot`` figure (matplotlib, optional extra ``plot``).
- `examine`: `inspect`, and `preflight` for ``bnfold convert``.
"""

from __future__ import annotations

from bnfold.diagnosis.examine import NO_RUN_FLAGS, inspect, preflight
from bnfold.diagnosis.report import WARNINGS, WRONG, BNDiagnosis, Flag, InspectReport

__all__ = ["inspect", "preflight", "InspectReport", "BNDiagnosis", "Flag", "WRONG", "WARNINGS", "NO_RUN_FLAGS"]
