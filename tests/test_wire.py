"""`bnfold.io.wire`: the protobuf wire format as far as bnfold reads and writes it.

References are protobuf itself: its own varint encoder, its parser (a lifted model parses to the
right tensors) and its serializer (spliced pieces join into the bytes ``SerializeToString``
gives for the same model with every tensor loaded).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from onnx import TensorProto, helper, numpy_helper

from bnfold.io import wire


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """Initializers of every kind the wire code must tell apart: large and small raw_data, typed
    fields, a string tensor, fields after raw_data (doc_string, metadata_props), a segment, one
    already external, a Constant node's tensor (not an initializer)."""
    big = numpy_helper.from_array(rng.normal(size=(64, 33)).astype(np.float32), "big")
    big.doc_string = "after raw_data"
    entry = big.metadata_props.add()
    entry.key, entry.value = "k", "v"
    inits = [
        big,
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "small"),
        helper.make_tensor("typed", TensorProto.FLOAT, [600], rng.normal(size=600).tolist()),  # float_data
        helper.make_tensor("strings", TensorProto.STRING, [2], [b"a", b"b"]),
        numpy_helper.from_array(rng.integers(0, 9, size=(700,)).astype(np.int64), "ints"),
    ]
    segmented = numpy_helper.from_array(rng.normal(size=(400,)).astype(np.float32), "segmented")
    segmented.segment.begin, segmented.segment.end = 0, 400
    inits.append(segmented)
    external = TensorProto(name="external", data_type=TensorProto.FLOAT, dims=[500],
                           data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "2000")):
        item = external.external_data.add()
        item.key, item.value = key, value
    inits.append(external)
    constant = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.normal(size=(300,)).astype(np.float32), "c"))
    nodes = [constant, helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.doc_string = "after the graph"
    return model


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**31 - 1, 2**32, 2**63 - 1])
def test_varint_is_protobufs(value):
    assert wire.varint(value) == _VarintBytes(value)


def test_varint_refuses_negative_values():
    with pytest.raises(ValueError):
        wire.varint(-1)


def test_fields_walk_a_message_like_protobuf():
    model = _model(np.random.default_rng(0))
    data = model.SerializeToString()
    numbers = [number for number, *_ in wire.fields(data)]
    assert numbers == sorted(field.number for field, _ in model.ListFields())
    graph = next((payload, end) for number, _, _, payload, end in wire.fields(data) if number == 7)
    initializers = [data[p:e] for n, _, _, p, e in wire.fields(data, *graph) if n == 5]
    assert initializers == [tensor.SerializeToString() for tensor in model.graph.initializer]


@pytest.mark.parametrize("data", [b"\x08", b"\x0a\x05ab", b"\x0b", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                                  b"\x00\x01"], ids=["truncated varint", "short field", "group", "11-byte varint",
                                                     "field 0"])
def test_fields_refuse_malformed_input(data):
    with pytest.raises(ValueError):
        list(wire.fields(data))


def test_lift_takes_exactly_the_large_lone_raw_data_initializers():
    model = _model(np.random.default_rng(1))
    data = model.SerializeToString()
    light, lifted = wire.lift_initializers(memoryview(data), 1024, "<here>")
    names = [model.graph.initializer[i].name for i in lifted]
    # small: under 1 KiB; typed / strings: no raw_data; segmented and external: fields of their own.
    assert names == ["big", "ints"]
    parsed = onnx.ModelProto()
    parsed.ParseFromString(light)
    for position, (offset, length) in lifted.items():
        tensor = parsed.graph.initializer[position]
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.HasField("raw_data")
        assert {e.key: e.value for e in tensor.external_data} == {
            "location": "<here>", "offset": str(offset), "length": str(length)}
        assert data[offset:offset + length] == model.graph.initializer[position].raw_data
        # The bytes put back give the tensor as it was, field for field.
        tensor.raw_data = data[offset:offset + length]
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    assert parsed == model
    assert parsed.SerializeToString() == data


def test_lift_returns_none_when_nothing_qualifies():
    model = _model(np.random.default_rng(2))
    assert wire.lift_initializers(memoryview(model.SerializeToString()), 10**9, "<here>") is None


def test_model_pieces_join_into_protobufs_bytes():
    model = _model(np.random.default_rng(3))
    expected = model.SerializeToString()
    held = {}
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for position in (0, 4):  # "big" has fields after raw_data; "ints" has none
        tensor = model.graph.initializer[position]
        held[position] = memoryview(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "<held>"), ("offset", "0"), ("length", str(len(held[position])))):
            item = tensor.external_data.add()
            item.key, item.value = key, value
    pieces = wire.model_pieces(model, held)
    assert b"".join(bytes(piece) for piece in pieces) == expected == reference.SerializeToString()
    assert wire.pieces_size(pieces) == len(expected)


def test_write_pieces_resumes_partial_writes(tmp_path, monkeypatch):
    pieces = [b"abc", memoryview(b"0123456789" * 50), b"", b"xyz" * 300]
    real = os.writev

    def short(fd, buffers):  # at most 7 bytes per call, as a full pipe or a signal may leave it
        budget, taken = 7, []
        for buffer in buffers:
            if not budget:
                break
            taken.append(bytes(buffer[:budget]))
            budget -= len(taken[-1])
        return real(fd, taken)

    monkeypatch.setattr(os, "writev", short)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        wire.write_pieces(fd, pieces)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(bytes(piece) for piece in pieces)
