"""`bnfold.folding.fold_pass`: the patterns are imported statically, in the documented order."""

from __future__ import annotations

import ast
from pathlib import Path

from bnfold.folding import decomposed, fold_pass, into_consumer, into_producer


def test_patterns_in_order():
    # Rule 5: into the producer, into the consumer, decomposed chains, then decompose_rest.
    assert [p.name for p in fold_pass.PATTERNS] == ["linear-bn", "bn-into-consumer", "decomposed-bn", "decompose-rest"]
    assert list(fold_pass.PATTERNS) == [*into_producer.PATTERNS, *into_consumer.PATTERNS, *decomposed.PATTERNS]
    assert fold_pass.FoldBatchNormPass().patterns == list(fold_pass.PATTERNS)


def test_no_module_of_the_package_is_imported_by_name():
    # A pattern module that fails to import must fail loudly, never be skipped: no importlib.
    folder = Path(fold_pass.__file__).parent
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "importlib" not in imported, path.name
        assert not any(isinstance(node, ast.ImportFrom) and node.module == "importlib" for node in ast.walk(tree))
