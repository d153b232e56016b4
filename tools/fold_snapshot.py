"""Fingerprints of every fold the test suite runs, to prove a refactoring changes no result.

Used as a pytest plugin, it wraps `bnfold.folding.fold_pass.FoldBatchNormPass.run` (every entry
point, ``bnfold.fold``, ``bnfold.folding.fold``, ``convert``, goes through it) and records, per
input model and options, the SHA-256 of the folded model's deterministic serialization and of its
report (``to_dict()``, and the text lines), or the error message when the fold refuses the model::

    BNFOLD_FOLD_SNAPSHOT=before.json PYTHONPATH=tools python -m pytest -q -p fold_snapshot \
        --hypothesis-seed=0 tests
    (change the code)
    BNFOLD_FOLD_SNAPSHOT=after.json PYTHONPATH=tools python -m pytest -q -p fold_snapshot \
        --hypothesis-seed=0 tests
    python tools/fold_snapshot.py before.json after.json

The comparison passes if every input folded in both runs gives the same folded model and the same
report apart from the tensor maps (whose policy can change on purpose: it says how many differ); it
prints how many inputs were compared and how many ran in one run only (random inputs of tests
that are not seeded), and how many differ once the reports' tensor maps are left out (the folded
model and the rest of the report).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from typing import Any

__all__ = ["fingerprint", "compare"]

_RECORDS: dict[str, set[str]] = {}
_TESTS: dict[str, set[str]] = {}
_MAPS: dict[str, list] = {}
_UNHASHABLE = {"count": 0}
_CURRENT = {"test": ""}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ROOT = {"path": ""}


def _without_root(model) -> None:
    """Replace the test tree's folder in node metadata (PyTorch's ``dynamo=True`` exporter records
    the source file of each ``forward`` there), so that two checkouts compare equal."""
    import onnx

    graphs = [model.graph, *model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            for prop in node.metadata_props:
                prop.value = prop.value.replace(_ROOT["path"], "<root>")
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)


def _serialized(model) -> bytes | None:
    # Tensors an open model keeps out of protobuf (memory-mapped, held arrays, deferred folds)
    # refer to locations named at random: fingerprint their bytes instead, as they will be written.
    from bnfold.io.writing import _inlined

    model = _inlined(model)
    try:
        data = model.SerializeToString(deterministic=True)
    except Exception:  # noqa: BLE001 - over 2 GiB or invalid UTF-8: not fingerprinted
        return None
    if _ROOT["path"] and _ROOT["path"].encode() in data:
        copy = type(model)()
        copy.CopyFrom(model)
        _without_root(copy)
        data = copy.SerializeToString(deterministic=True)
    return data


def fingerprint(result: Any = None, error: BaseException | None = None) -> str:
    """One string describing a fold's outcome: hashes of model and report, or the error."""
    if error is not None:
        return f"error {type(error).__name__}: {error}"
    model, report = result
    data = _serialized(model)
    as_dict = report.to_dict()
    tensor_maps = [entry.pop("tensor_map") for entry in as_dict["entries"]]
    report_text = json.dumps(as_dict, sort_keys=True) + "\n" + "\n".join(report.lines())
    model_hash = "unserializable" if data is None else _sha(data)
    maps = _sha(json.dumps(tensor_maps, sort_keys=True).encode())
    return f"model {model_hash} report {_sha(report_text.encode())} tensor_map {maps}"


def _install() -> None:
    from bnfold.folding import fold_pass

    original = fold_pass.FoldBatchNormPass.run

    def run(self, model):
        data = _serialized(model) if hasattr(model, "SerializeToString") else None
        if data is None:
            _UNHASHABLE["count"] += 1
            return original(self, model)
        options = self.options
        key = _sha(data + repr((options.decompose_rest, options.keep_initializer_inputs,
                                sorted(options.exclude))).encode())
        _TESTS.setdefault(key, set()).add(_CURRENT["test"])
        try:
            result = original(self, model)
        except Exception as exc:
            _RECORDS.setdefault(key, set()).add(fingerprint(error=exc))
            raise
        _RECORDS.setdefault(key, set()).add(fingerprint(result))
        _MAPS[key] = [entry.tensor_map for entry in result[1].entries]
        return result

    fold_pass.FoldBatchNormPass.run = run


def _dump() -> None:
    path = os.environ.get("BNFOLD_FOLD_SNAPSHOT")
    if not path:
        return
    records = {key: sorted(values) for key, values in sorted(_RECORDS.items())}
    tests = {key: sorted(values) for key, values in sorted(_TESTS.items())}
    with open(path, "w") as handle:
        json.dump({"records": records, "tests": tests, "tensor_maps": _MAPS, "not_fingerprinted": _UNHASHABLE["count"]},
                  handle, indent=0)


def pytest_configure(config) -> None:  # noqa: D103 - pytest hook
    _ROOT["path"] = str(config.rootpath)
    _install()
    atexit.register(_dump)


def pytest_runtest_setup(item) -> None:  # noqa: D103 - pytest hook
    _CURRENT["test"] = item.nodeid


def _without_tensor_map(outcomes: list[str]) -> list[str]:
    return [outcome.split(" tensor_map ")[0] for outcome in outcomes]


def compare(before: dict, after: dict, *, tensor_map: bool = True) -> tuple[int, int, int, list[str]]:
    """``(compared, only_before, only_after, differing keys)``; ``tensor_map=False`` compares the
    folded models and the reports without their tensor maps."""
    a, b = before["records"], after["records"]
    common = sorted(set(a) & set(b))
    if tensor_map:
        differing = [key for key in common if a[key] != b[key]]
    else:
        differing = [key for key in common if _without_tensor_map(a[key]) != _without_tensor_map(b[key])]
    return len(common), len(set(a) - set(b)), len(set(b) - set(a)), differing


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _map_contains(later: list[dict], earlier: list[dict]) -> bool:
    """True if each entry's map has the same originals and names every new tensor named earlier."""
    return len(later) == len(earlier) and all(
        set(new) == set(old) and all(set(_as_list(old[name])) <= set(_as_list(new[name])) for name in old)
        for new, old in zip(later, earlier)
    )


def main(argv: list[str]) -> int:
    before, after = (json.load(open(path)) for path in argv[:2])
    compared, only_before, only_after, differing = compare(before, after)
    outcomes = sum(len(v) for k, v in before["records"].items() if k in after["records"])
    print(f"inputs compared: {compared} ({outcomes} outcomes); only before: {only_before}; only after: "
          f"{only_after}; not fingerprinted: {before['not_fingerprinted']} / {after['not_fingerprinted']}")
    for name, one, other in (("before", before, after), ("after", after, before)):
        alone = sorted({test for key in set(one["records"]) - set(other["records"])
                        for test in one.get("tests", {}).get(key, ["?"])})
        if alone:
            print(f"tests whose inputs ran only {name}: " + ", ".join(alone))
    maps = compare(before, after, tensor_map=False)[3]
    for key in maps[:10]:
        print(f"DIFFERENT {key[:16]}: {before['records'][key]} != {after['records'][key]}")
    print("bit-identical" if not differing else f"{len(differing)} inputs fold differently")
    if differing and "tensor_maps" in before and "tensor_maps" in after:
        kept = sum(_map_contains(after["tensor_maps"][key], before["tensor_maps"][key]) for key in differing)
        print(f"tensor maps of the later run that name every tensor the earlier one did: {kept} of {len(differing)}")
    print(f"folded models and reports without their tensor maps: {len(maps)} inputs differ"
          f" ({len(differing) - len(maps)} differ in their tensor maps only)")
    return 1 if maps else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
