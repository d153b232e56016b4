"""Model-local functions: inline them before folding, or point to the option that does.

PyTorch's ``export_modules_as_functions`` writes each chosen module as a model-local function
(``ModelProto.functions``). A BN inside a function body usually cannot fold there: its input or
parameters arrive as function inputs, known only at the call site. Inlining the functions first
(``onnx.inliner.inline_local_functions``) puts every BN in the graph next to its producer and
its constant parameters, where it folds like any other.
"""

from __future__ import annotations

import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.report import FoldReport

__all__ = ["inline_functions", "hint_inline", "INLINE_HINT"]

INLINE_HINT = "pass --inline-functions (API: inline_functions=True) to inline model-local functions so that it can fold"


def inline_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with its model-local functions inlined, and the names of those functions.

    ``model`` is not modified; without functions it is returned as is.
    """
    if not model.functions:
        return model, []
    import onnx.inliner

    names = [f"{f.domain}.{f.name}" if f.domain else f.name for f in model.functions]
    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # the C++ inliner reports malformed functions as generic errors
        raise BnfoldError(f"cannot inline the model-local functions {', '.join(names)}: {exc}") from None
    return inlined, names


def hint_inline(report: FoldReport) -> None:
    """Append `INLINE_HINT` to the reason of every BN kept inside a model-local function."""
    for entry in report.entries:
        if entry.status == "kept" and entry.graph.startswith("function:") and entry.reason:
            entry.reason += f" ({INLINE_HINT})"
