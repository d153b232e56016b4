"""A one-file model read in place and folded weights held as arrays (`convert --no-verify`).

`bnfold.io.mapped` rules 4 and 5: the input's large initializers stay in the memory-mapped file,
new large tensors stay NumPy arrays, and `bnfold.io.save_model` splices both into OUT. The
reference is the in-memory path (`bnfold.io.load_model` reads every byte, `bnfold.folding.fold`,
`bnfold.io.save_model` serializes with protobuf): OUT must be the same bytes, and every input
must be refused with the same message, since `onnx.checker` sees stand-ins for the tensors
left in the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import io as bio
from bnfold.conversion import convert
from bnfold.errors import BnfoldError
from bnfold.folding import fold
from bnfold.folding.tensors import tensor_to_array
from bnfold.io import mapped, models, wire


@pytest.fixture
def small(monkeypatch):
    """Read in place from any size, hold and lift from 256 bytes: every path runs on small models."""
    monkeypatch.setattr(models, "IN_PLACE_MIN_BYTES", 0)
    monkeypatch.setattr(mapped, "HOLD_MIN_BYTES", 256)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the in-place reader and of the spliced writer (proof they ran)."""
    calls = {"lift": 0, "pieces": 0}
    lift, pieces = wire.lift_initializers, wire.model_pieces

    def counted_lift(*args, **kwargs):
        found = lift(*args, **kwargs)
        calls["lift"] += found is not None
        return found

    def counted_pieces(*args, **kwargs):
        calls["pieces"] += 1
        return pieces(*args, **kwargs)

    monkeypatch.setattr(wire, "lift_initializers", counted_lift)
    monkeypatch.setattr(wire, "model_pieces", counted_pieces)
    return calls


def _bn(nodes, inits, rng, x, y, name, channels):
    for role, value in (("scale", rng.uniform(0.5, 1.5, channels)), ("bias", rng.normal(0, 1, channels)),
                        ("mean", rng.normal(0, 0.1, channels)), ("var", rng.uniform(0.5, 2.0, channels))):
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}.{role}"))
    nodes.append(helper.make_node("BatchNormalization", [x, *(f"{name}.{r}" for r in ("scale", "bias", "mean", "var"))],
                                  [y], name=name))


def _model(rng: np.random.Generator, channels: int = 8, blocks: int = 4) -> onnx.ModelProto:
    """Conv -> BN blocks, with what makes a fold keep or share tensors: a weight shared by two
    Convs (folded into a copy each), a BN whose input has a second reader (kept: its weight and
    statistics are copied unchanged), a Gemm -> BN head, doc strings and metadata on tensors."""
    nodes, inits = [], []
    shared = numpy_helper.from_array(rng.normal(0, 0.2, (channels, channels, 3, 3)).astype(np.float32), "shared.W")
    shared.doc_string = "a weight two Convs read"
    inits.append(shared)
    x = "x"
    for i in range(blocks):
        weight = "shared.W" if i < 2 else f"conv{i}.W"
        if i >= 2:
            inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (channels, channels, 3, 3)).astype(np.float32),
                                                 weight))
        nodes.append(helper.make_node("Conv", [x, weight], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        _bn(nodes, inits, rng, f"c{i}", f"b{i}", f"bn{i}", channels)
        x = f"r{i}"
        nodes.append(helper.make_node("Relu", [f"b{i}"], [x], name=f"relu{i}"))
    nodes.append(helper.make_node("Sigmoid", [f"c{blocks - 1}"], ["side"], name="side"))  # bn{last} kept
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"]))
    head = numpy_helper.from_array(rng.normal(0, 0.3, (channels, 40)).astype(np.float32), "head.W")
    entry = head.metadata_props.add()
    entry.key, entry.value = "origin", "test"
    inits += [head, numpy_helper.from_array(rng.normal(0, 0.1, 40).astype(np.float32), "head.C")]
    nodes.append(helper.make_node("Gemm", ["f", "head.W", "head.C"], ["g"], name="head", alpha=0.5, beta=2.0))
    _bn(nodes, inits, rng, "g", "y", "bnh", 40)
    graph = helper.make_graph(
        nodes, "in_place", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", channels, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    return model


def _reference(src: Path, out: Path) -> bytes:
    folded, _ = fold(bio.load_model(src))
    bio.save_model(folded, out)
    return out.read_bytes()


def test_convert_no_verify_writes_the_bytes_of_the_in_memory_path(tmp_path, small, spy):
    src = tmp_path / "in.onnx"
    onnx.save(_model(np.random.default_rng(0)), str(src))
    before = src.read_bytes()
    result = convert(src, tmp_path / "out.onnx", verify=False)
    assert spy == {"lift": 1, "pieces": 1}
    assert result.data["bn_folded"] == 4 and result.data["bn_total"] == 5, result.lines()
    assert (tmp_path / "out.onnx").read_bytes() == _reference(src, tmp_path / "ref.onnx")
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "ref.onnx"]


def test_default_thresholds_on_a_model_over_a_mebibyte(tmp_path, spy):
    src = tmp_path / "in.onnx"
    onnx.save(_model(np.random.default_rng(1), channels=128, blocks=4), str(src))  # 576 KiB per weight
    assert src.stat().st_size > models.IN_PLACE_MIN_BYTES
    convert(src, tmp_path / "out.onnx", verify=False)
    assert spy == {"lift": 1, "pieces": 1}
    assert (tmp_path / "out.onnx").read_bytes() == _reference(src, tmp_path / "ref.onnx")


def test_in_place_over_the_input_itself(tmp_path, small, spy):
    """``--in-place``: OUT replaces the file that is still mapped; the map keeps reading the old one."""
    src = tmp_path / "model.onnx"
    onnx.save(_model(np.random.default_rng(2)), str(src))
    expected = _reference(src, tmp_path / "ref.onnx")
    convert(src, None, in_place=True, verify=False)
    assert spy["lift"] == 1 and src.read_bytes() == expected


def test_verified_and_checked_conversions_read_the_file_whole(tmp_path, small, spy):
    """A session or the checker of OUT needs the model in protobuf: nothing is left in place."""
    src = tmp_path / "in.onnx"
    onnx.save(_model(np.random.default_rng(3)), str(src))
    convert(src, tmp_path / "a.onnx", verify=True)
    convert(src, tmp_path / "b.onnx", verify=False, check=True)
    assert spy == {"lift": 0, "pieces": 0}
    expected = _reference(src, tmp_path / "ref.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == expected


def test_with_external_data_as_well(tmp_path, small, spy):
    """Some tensors in a data file, others inline: both stay on disk; OUT as the in-memory path."""
    model = _model(np.random.default_rng(4))
    onnx.save_model(model, str(tmp_path / "in.onnx"), save_as_external_data=True, location="in.onnx.data",
                    size_threshold=1500)
    src = tmp_path / "in.onnx"
    (tmp_path / "out").mkdir()
    convert(src, tmp_path / "out" / "stream.onnx", verify=False)
    folded, _ = fold(bio.load_model(src))
    bio.save_model(folded, tmp_path / "out" / "memory.onnx", external_data=True)
    assert spy["lift"] == 1

    def files(stem):
        return {p.name.replace(stem, "OUT"): p.read_bytes().replace(stem.encode(), b"OUT")
                for p in sorted((tmp_path / "out").glob(f"{stem}*"))}

    assert files("stream.onnx") == files("memory.onnx")


def test_values_are_read_through_the_map(tmp_path, small):
    model = _model(np.random.default_rng(5))
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    with mapped.open_model(src, hold_new=True) as opened:
        left = [t for t in opened.model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert {t.name for t in left} == {"shared.W", "conv2.W", "conv3.W", "head.W"}
        for tensor in opened.model.graph.initializer:
            values = tensor_to_array(tensor)
            np.testing.assert_array_equal(values, expected[tensor.name])
            if tensor in left:
                assert not values.flags.writeable and opened.owns(values)


def _with_weight(nodes, inits, *, ir_version=8, inputs=None, opset=17):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _weight(name="w", shape=(64, 64)):
    return numpy_helper.from_array(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), name)


def _invalid_models():
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    short = _weight()
    short.raw_data = short.raw_data[:-4]  # one value short of its shape
    string_raw = TensorProto(name="s", data_type=TensorProto.STRING, dims=[2048], raw_data=b"x" * 2048)
    wrong_type = _weight()
    wrong_type.data_type = 0  # UNDEFINED
    return {
        "unknown op": _with_weight([helper.make_node("NoSuchOp", ["x", "w"], ["y"])], [_weight()]),
        "raw_data too short": _with_weight([matmul], [short]),
        "string in raw_data": _with_weight([matmul], [_weight(), string_raw]),
        "undefined type": _with_weight([matmul], [wrong_type]),
        "IR 3 initializer not an input": _with_weight([matmul], [_weight()], ir_version=3, opset=8),
        "not in SSA form": _with_weight([matmul, helper.make_node("Relu", ["x"], ["y"])], [_weight()]),
        "undefined input": _with_weight([helper.make_node("MatMul", ["x", "nowhere"], ["y"])], [_weight()]),
        "duplicate initializer and a big one": _with_weight(
            [matmul], [_weight(), _weight("w2"), _weight("w2")]),
    }


@pytest.mark.parametrize("name", sorted(_invalid_models()))
def test_in_place_load_refuses_with_the_checkers_message(tmp_path, small, name):
    path = tmp_path / "bad.onnx"
    path.write_bytes(_invalid_models()[name].SerializeToString())
    with pytest.raises(BnfoldError) as full:
        bio.load_model(path)
    with pytest.raises(BnfoldError) as in_place:
        models.load_model_mapped(path, in_place="<bnfold-input test>")
    assert str(in_place.value) == str(full.value)
    assert "fails onnx.checker" in str(full.value)


def test_in_place_load_accepts_what_the_checker_accepts(tmp_path, small):
    path = tmp_path / "good.onnx"
    model = _with_weight([helper.make_node("MatMul", ["x", "w"], ["y"])], [_weight()])
    path.write_bytes(model.SerializeToString())
    loaded, sources = models.load_model_mapped(path, in_place="<bnfold-input test>")
    try:
        assert loaded.graph.initializer[0].data_location == TensorProto.EXTERNAL
        assert list(sources) == ["<bnfold-input test>"]
    finally:
        for fd, _ in sources.values():
            os.close(fd)


def test_a_failing_stand_in_check_is_settled_by_the_file(tmp_path, small, monkeypatch):
    """Were the stand-ins ever refused while the file passes, the file's verdict is taken."""
    path = tmp_path / "good.onnx"
    model = _with_weight([helper.make_node("MatMul", ["x", "w"], ["y"])], [_weight()])
    path.write_bytes(model.SerializeToString())
    seen = []
    real = onnx.checker.check_model

    def picky(proto, *args, **kwargs):
        seen.append(len(proto))
        if len(seen) == 1:
            raise onnx.checker.ValidationError("stand-in refused")
        return real(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", picky)
    loaded, sources = models.load_model_mapped(path, in_place="<bnfold-input test>")
    for fd, _ in sources.values():
        os.close(fd)
    assert seen == [seen[0], path.stat().st_size] and seen[0] < path.stat().st_size // 4


def test_file_system_that_cannot_map_reads_the_file(tmp_path, small, monkeypatch, spy):
    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    src = tmp_path / "in.onnx"
    onnx.save(_model(np.random.default_rng(6)), str(src))
    expected = _reference(src, tmp_path / "ref.onnx")
    monkeypatch.setattr(models.mmap, "mmap", no_mmap)
    convert(src, tmp_path / "out.onnx", verify=False)
    assert spy["lift"] == 0 and (tmp_path / "out.onnx").read_bytes() == expected


def test_output_over_the_protobuf_limit_goes_to_external_data(tmp_path, small, monkeypatch):
    """Held and in-place tensors joined past 2 GiB: written with external data instead, as a
    model loaded whole would be (limit lowered here to the size of this model)."""
    from bnfold import conversion
    from bnfold.io import writing

    src = tmp_path / "in.onnx"
    onnx.save(_model(np.random.default_rng(7)), str(src))
    limit = src.stat().st_size * 3 // 4  # IN is over half the limit; OUT (a copy of the shared weight) over it
    monkeypatch.setattr(writing, "PROTOBUF_LIMIT", limit)
    monkeypatch.setattr(conversion, "_PROTOBUF_LIMIT", limit)
    convert(src, tmp_path / "out.onnx", verify=False)
    data = list(tmp_path.glob("out.onnx.*.data"))
    assert len(data) == 1
    import onnxruntime as ort

    x = np.random.default_rng(8).normal(size=(2, 8, 5, 5)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_failure_while_writing_pieces_keeps_the_previous_output(tmp_path, small, spy, monkeypatch, failure):
    """The spliced writer writes through the same atomic replacement: a failure half-way leaves
    the previous OUT as it was and no temporary file."""
    src = tmp_path / "in.onnx"
    onnx.save(_model(np.random.default_rng(9)), str(src))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    before = src.read_bytes()
    real, calls = os.writev, []

    def failing(fd, buffers):
        calls.append(len(buffers))
        if len(calls) == 1:
            real(fd, [bytes(buffers[0][:10])])  # some bytes land first
        raise failure

    monkeypatch.setattr(os, "writev", failing)
    expected = BnfoldError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        convert(src, out, force=True, verify=False)
    assert spy["pieces"] == 1 and calls
    assert out.read_bytes() == b"previous output" and src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]
