"""A model written as pieces: protobuf's bytes for the small parts, arrays' bytes for big tensors.

A model whose large new tensors are `bnfold.io.mapped.Held` arrays refers to them instead of
holding them. `model_pieces` serializes that small model once and splices each held tensor's
bytes into it, as the ``raw_data`` field (number 9) of its ``TensorProto`` inside the main
graph's ``initializer`` field: the concatenation of the pieces is the model as protobuf would
serialize it with every tensor loaded, byte for byte (protobuf writes known fields in
field-number order; a held tensor carries no unknown fields), without the whole model ever
sitting in memory as one buffer. `write_pieces` writes them with ``writev``.

`lift_initializers` is the way in: a model file's large initializers become references to their
own bytes in the file (external data with a location no file has), so that parsing the rest
copies no weight; `bnfold.io.mapped` then reads those bytes where they lie.

Only the wire format's structure is read here (field numbers, wire types, lengths): the
protobuf encoding guide's "Message Structure" section.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import onnx

__all__ = ["fields", "varint", "lift_initializers", "model_pieces", "pieces_size", "write_pieces"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH = 7        # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9    # TensorProto.raw_data
_TENSOR_SEGMENT = 3     # TensorProto.segment
_TENSOR_VALUES = (4, 5, 6, 7, 10, 11)  # float_data, int32_data, string_data, int64_data, double_data, uint64_data
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1           # TensorProto.DataLocation.EXTERNAL

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))  # buffers per writev
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16  # POSIX's minimum

Piece = bytes | memoryview


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError(f"varint of a negative value: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def fields(data: memoryview | bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields of one message encoded in ``data[start:end]``, in order:
    ``(number, wire type, field start, payload start, field end)``. Groups (wire types 3 and 4,
    which ONNX does not use) and malformed input raise ``ValueError``."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            payload = pos
            _, pos = _read_varint(data, pos, end)
        elif wire_type == _LEN:
            length, payload = _read_varint(data, pos, end)
            pos = payload + length
        elif wire_type == _I64:
            payload, pos = pos, pos + 8
        elif wire_type == _I32:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"wire type {wire_type} (field {number}) is not supported")
        if pos > end or number == 0:
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire_type, field_start, payload, pos


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _tensor_pieces(tensor: onnx.TensorProto, data: memoryview) -> list[Piece]:
    """``tensor`` (a reference to held bytes) as the ``initializer`` field of a graph, with
    ``data`` as its ``raw_data``: the fields numbered below 9 first, then raw_data, then the rest."""
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    loaded.ClearField("data_location")
    del loaded.external_data[:]
    light = loaded.SerializeToString()
    split = next((start for number, _, start, _, _ in fields(light) if number > _TENSOR_RAW_DATA), len(light))
    raw_key = _key(_TENSOR_RAW_DATA, _LEN) + varint(len(data))
    size = len(light) + len(raw_key) + len(data)
    head = _key(_GRAPH_INITIALIZER, _LEN) + varint(size) + light[:split] + raw_key
    return [head, data, light[split:]] if split < len(light) else [head, data]


def model_pieces(model: onnx.ModelProto, held: Mapping[int, memoryview]) -> list[Piece]:
    """The serialized model with ``held[i]`` as the ``raw_data`` of ``model.graph.initializer[i]``.

    ``model``'s initializers at those positions are external references with no data of their
    own (`bnfold.io.mapped.Held`); the pieces join into the model protobuf would write if those
    tensors held ``raw_data`` and no external reference.
    """
    data = model.SerializeToString()
    view = memoryview(data)
    pieces: list[Piece] = []
    last = 0
    for number, wire_type, start, payload, end in fields(view):
        if number != _MODEL_GRAPH or wire_type != _LEN:
            continue
        graph = _graph_pieces(view, payload, end, model.graph, held)
        pieces.append(view[last:start])
        pieces.append(_key(_MODEL_GRAPH, _LEN) + varint(pieces_size(graph)))
        pieces.extend(graph)
        last = end
    pieces.append(view[last:])
    return [piece for piece in pieces if len(piece)]


def _graph_pieces(view: memoryview, start: int, end: int, graph: onnx.GraphProto,
                  held: Mapping[int, memoryview]) -> list[Piece]:
    pieces: list[Piece] = []
    last, index = start, 0
    for number, wire_type, field_start, _, field_end in fields(view, start, end):
        if number != _GRAPH_INITIALIZER or wire_type != _LEN:
            continue
        if index in held:
            pieces.append(view[last:field_start])
            pieces.extend(_tensor_pieces(graph.initializer[index], held[index]))
            last = field_end
        index += 1
    if index != len(graph.initializer):
        raise AssertionError(f"found {index} initializers in the serialized graph, not {len(graph.initializer)}")
    pieces.append(view[last:end])
    return pieces


def pieces_size(pieces: Sequence[Piece]) -> int:
    return sum(len(piece) for piece in pieces)


def write_pieces(fd: int, pieces: Sequence[Piece]) -> None:
    """Write ``pieces`` one after another at ``fd``'s position (``writev``, partial writes resumed)."""
    queue = [memoryview(piece).cast("B") for piece in pieces if len(piece)]
    position = 0
    while position < len(queue):
        batch = queue[position:position + _IOV_MAX]
        written = os.writev(fd, batch) if hasattr(os, "writev") else os.write(fd, batch[0])
        for piece in batch:
            if written < len(piece):
                queue[position] = piece[written:]
                break
            written -= len(piece)
            position += 1



def lift_initializers(data: memoryview, min_bytes: int, location: str) -> tuple[bytes, dict[int, tuple[int, int]]] | None:
    """``data`` (a serialized ``ModelProto``, e.g. a memory-mapped model file) with the
    ``raw_data`` of each main-graph initializer of ``min_bytes`` or more replaced by an external
    reference ``location`` / offset / length to where those bytes lie in ``data``.

    Returns ``(the new bytes, {initializer position: (offset, length)})``, or None if no
    initializer qualifies. A tensor qualifies when its only value is one non-empty ``raw_data``
    field and it has no ``segment``, ``external_data`` or ``data_location`` of its own: putting
    its bytes back as ``raw_data`` then gives the tensor exactly as it was.
    """
    pieces: list[Piece] = []
    lifted: dict[int, tuple[int, int]] = {}
    last = position = 0
    for number, wire_type, start, payload, end in fields(data):
        if number != _MODEL_GRAPH or wire_type != _LEN:
            continue
        graph: list[Piece] = []
        inner = payload
        for field_number, field_wire, field_start, tensor_start, tensor_end in fields(data, payload, end):
            if field_number != _GRAPH_INITIALIZER or field_wire != _LEN:
                continue
            position += 1
            raw = _lone_raw_data(data, tensor_start, tensor_end) if tensor_end - tensor_start >= min_bytes else None
            if raw is None:
                continue
            raw_field, raw_start, raw_end = raw
            tensor = [data[tensor_start:raw_field], data[raw_end:tensor_end],
                      _reference(location, raw_start, raw_end - raw_start)]
            graph += [data[inner:field_start], _key(_GRAPH_INITIALIZER, _LEN) + varint(pieces_size(tensor)), *tensor]
            inner = tensor_end
            lifted[position - 1] = (raw_start, raw_end - raw_start)
        if graph:
            graph.append(data[inner:end])
            pieces += [data[last:start], _key(_MODEL_GRAPH, _LEN) + varint(pieces_size(graph)), *graph]
            last = end
    if not lifted:
        return None
    pieces.append(data[last:])
    return b"".join(pieces), lifted


def _lone_raw_data(data: memoryview, start: int, end: int) -> tuple[int, int, int] | None:
    """``(field start, bytes start, end)`` of the tensor's one ``raw_data``, if it qualifies."""
    found = None
    for number, wire_type, field_start, payload, field_end in fields(data, start, end):
        if number == _TENSOR_RAW_DATA:
            if found is not None or wire_type != _LEN or field_end == payload:
                return None
            found = (field_start, payload, field_end)
        elif number in _TENSOR_VALUES or number in (_TENSOR_SEGMENT, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None
    return found


def _entry(key: str, value: str) -> bytes:
    body = b"".join(_key(number, _LEN) + varint(len(text)) + text
                    for number, text in ((1, key.encode()), (2, value.encode())))
    return _key(_TENSOR_EXTERNAL_DATA, _LEN) + varint(len(body)) + body


def _reference(location: str, offset: int, length: int) -> bytes:
    """``external_data`` {location, offset, length} and ``data_location = EXTERNAL``, encoded."""
    return (_entry("location", location) + _entry("offset", str(offset)) + _entry("length", str(length))
            + _key(_TENSOR_DATA_LOCATION, _VARINT) + varint(_EXTERNAL))
