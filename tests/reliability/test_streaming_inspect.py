"""`inspect` and `recalibrate` of models with external data: the data stays on disk, results equal.

The reference for every result is the in-memory path (the model loaded with its data, or a
float64 NumPy computation of the folded weight); the streamed path must give the same report
and the same recalibrated model. Blocks and the deferral threshold are made small
(``small_blocks``) so that models of a few MB take every streamed code path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.io
from bnfold.diagnosis import inspect
from bnfold.diagnosis.records import FLOAT16_TINY
from bnfold.folding import chunked
from bnfold.io import mapped
from bnfold.recalibration import recalibrate, recalibrate_file

_K, _N = 600, 500  # 1.2 MB float32 weights


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 KiB (many per weight), deferring folded weights from 64 KiB."""
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(mapped, "SPILL_MIN_BYTES", 64 * 1024)


def _bn(prefix: str, x: str, y: str, gamma: np.ndarray, rng: np.random.Generator):
    channels = gamma.size
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), f"{prefix}.{role}") for role, v in (
        ("scale", gamma), ("bias", rng.normal(0, 1, channels)), ("mean", rng.normal(0, 0.1, channels)),
        ("var", rng.uniform(0.5, 2.0, channels)))]
    node = helper.make_node("BatchNormalization", [x, *(i.name for i in inits)], [y], name=prefix)
    return node, inits


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """Gemm -> BN (healthy), Gemm -> BN whose folded weight is mostly subnormal in float16
    (weights ~1e-3 times a scale ~1e-2), MatMul -> BN whose folded weight overflows float16 in
    a few channels (weights ~10 times a scale ~1e4): three float16 verdicts of the folded weight."""
    weights = {"fc0.W": rng.normal(0, 0.05, (_K, _N)), "fc1.W": rng.normal(0, 1e-3, (_N, _N)),
               "fc2.W": rng.normal(0, 10.0, (_N, _N))}
    loud = np.ones(_N)
    loud[:3] = 1e4
    gammas = {"bn0": rng.uniform(0.5, 1.5, _N), "bn1": np.full(_N, 1e-2), "bn2": loud}
    nodes, inits = [], [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    x = "x"
    for i, op in enumerate(("Gemm", "Gemm", "MatMul")):
        nodes.append(helper.make_node(op, [x, f"fc{i}.W"], [f"h{i}"], name=f"fc{i}"))
        node, more = _bn(f"bn{i}", f"h{i}", f"y{i}", gammas[f"bn{i}"], rng)
        nodes.append(node)
        inits += more
        x = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", _K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", _N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the data of the model it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=1024)
    return path


@pytest.fixture
def on_disk(tmp_path) -> tuple[onnx.ModelProto, Path]:
    model = _model(np.random.default_rng(0))
    return model, _save_external(model, tmp_path / "model.onnx")


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Blocks of deferred folded weights computed; materializing a whole one fails the test."""
    calls: list[int] = []
    arrays = chunked.Deferred.arrays

    def counting(self):
        for item in arrays(self):
            calls.append(item[1].shape[0])
            yield item

    def whole(self):
        raise AssertionError("a deferred folded weight was materialized whole")

    monkeypatch.setattr(chunked.Deferred, "arrays", counting)
    monkeypatch.setattr(chunked.Deferred, "materialize", whole)
    return calls


# ------------------------------------------------------------------------------------------
# inspect


def test_inspect_of_external_data_reports_what_the_in_memory_path_reports(on_disk, small_blocks, counted):
    _, path = on_disk
    streamed = inspect(path, label="m")
    in_memory = inspect(onnx.load(str(path)), label="m")  # onnx.load reads every tensor into memory
    assert streamed.to_dict() == in_memory.to_dict()
    assert [bn.convert for bn in streamed.bns] == ["folded into 'fc0'", "folded into 'fc1'", "folded into 'fc2'"]
    # The folded weights were never whole: each came block by block from the fold's own arithmetic
    # (64 KiB of float64 = 16 rows of 500), and the in-memory run deferred nothing.
    assert len(counted) >= 3 * (_N // 16) and max(counted) <= 16


def test_inspect_float16_counts_match_a_float64_reference(on_disk, small_blocks, counted):
    """The streamed float16 verdicts against NumPy on the whole arrays: folded weight
    ``W * gamma / sqrt(var + eps)`` (float64, cast to float32), elements whose original weight is
    below float16's normal range left out. Counts are integers: compared exactly."""
    model, path = on_disk
    report = inspect(path, run=False)
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    texts = {bn.name: [flag.detail for flag in bn.flags if flag.name == "float16"] for bn in report.bns}
    for i in range(3):
        scale = values[f"bn{i}.scale"] / np.sqrt(values[f"bn{i}.var"] + 1e-5)
        weight = values[f"fc{i}.W"]
        folded = np.abs((weight * scale[None, :]).astype(np.float32).astype(np.float64))
        folded[np.abs(weight) < FLOAT16_TINY] = 0.0
        subnormal = int(np.count_nonzero((folded > 0) & (folded < FLOAT16_TINY)))
        if i == 0:  # healthy: a few subnormal values (below the 1% that is reported), no overflow
            assert texts["bn0"] == [] and folded.max() < 65504 and subnormal < 0.01 * folded.size
        elif i == 1:
            assert subnormal > 0.01 * folded.size
            assert texts["bn1"] == [(f"folded weight 'fc1.W_folded': {subnormal} of {folded.size} value(s)"
                                     f" subnormal in float16 (smallest {folded[folded > 0].min():.3g}"
                                     f" < {FLOAT16_TINY:.3g}): slow on CPUs")], texts
        else:
            assert texts["bn2"] == [(f"folded weight 'fc2.W_folded' reaches {folded.max():.3g}, which"
                                     " overflows float16 (max 65504)")], texts


# ------------------------------------------------------------------------------------------
# recalibrate


def _data(path: Path, rng: np.random.Generator) -> Path:
    np.savez(path, x=rng.normal(0, 1, (40, _K)).astype(np.float32))
    return path


def _tensors(path: Path) -> dict[str, np.ndarray]:
    loaded = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}


@pytest.mark.parametrize("method", ["exact", "batch"])
@pytest.mark.parametrize("workers", [None, 2], ids=["here", "executor"])
def test_recalibrate_external_data_reads_in_place_and_writes_external_data(on_disk, tmp_path, monkeypatch,
                                                                           method, workers):
    _, path = on_disk
    data = _data(tmp_path / "data.npz", np.random.default_rng(1))
    # The reference: the model in memory, written in one file.
    expected = recalibrate(onnx.load(str(path)), str(data), method=method, batch_size=16)
    reference = tmp_path / "reference.onnx"
    bnfold.io.save_model(expected.model, reference)

    def refuse(*args, **kwargs):
        raise AssertionError("the input was loaded with its data")

    monkeypatch.setattr(bnfold.io, "load_model", refuse)
    out = tmp_path / "out" / "recal.onnx"
    out.parent.mkdir()
    with ThreadPoolExecutor(workers) if workers else _Nothing() as executor:
        result, _ = recalibrate_file(path, out, str(data), method=method, batch_size=16, executor=executor)
    monkeypatch.undo()
    for change, want in zip(result.changes, expected.changes):
        # Same float32 runs over the same batches, merged in the same order: equal bit for bit.
        assert np.array_equal(change.mean, want.mean) and np.array_equal(change.var, want.var)
    written = onnx.load(str(out), load_external_data=False)
    external = {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert {"fc0.W", "fc1.W", "fc2.W"} <= external  # IN had external data: so has OUT
    assert len(list(out.parent.glob("recal.onnx.*.data"))) == 1
    got, want = _tensors(out), _tensors(reference)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[name], want[name]) for name in want)


def test_recalibrate_in_memory_input_writes_one_file(tmp_path):
    """The healthy counterpart: IN without external data gives OUT without external data."""
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(np.random.default_rng(0)), str(path))
    data = _data(tmp_path / "data.npz", np.random.default_rng(1))
    out = tmp_path / "recal.onnx"
    recalibrate_file(path, out, str(data), batch_size=16)
    written = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in written.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "model.onnx", "recal.onnx"]


def test_recalibrate_and_fold_external_data(on_disk, tmp_path):
    """``--fold``: the recalibrated model is staged beside OUT and folded; nothing is left there."""
    _, path = on_disk
    data = _data(tmp_path / "data.npz", np.random.default_rng(1))
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    _, converted = recalibrate_file(path, out, str(data), batch_size=16, fold=True)
    assert converted.ok
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".data")) == ["folded.onnx"]
    written = onnx.load(str(out))
    assert not any(node.op_type == "BatchNormalization" for node in written.graph.node)


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
