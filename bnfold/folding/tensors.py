"""ONNX tensors <-> NumPy arrays, and ONNX element types <-> NumPy dtypes.

The common numeric types are read as read-only views of ``raw_data`` and written as ``raw_data``
in one copy: a model's weights are never converted value by value. Everything else (strings,
``int32_data``-style fields, big-endian hosts) goes through ``onnx.numpy_helper``.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.io.mapped import external_array, spill

__all__ = ["RAW_DTYPES", "np_dtype", "elem_type_of", "tensor_to_array", "array_to_tensor"]

#: Element types whose ``raw_data`` is the little-endian bytes of this NumPy dtype (ONNX IR spec).
RAW_DTYPES: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT64: np.dtype(np.uint64),
    TensorProto.BOOL: np.dtype(np.bool_),
}

_LITTLE_ENDIAN = sys.byteorder == "little"


@functools.lru_cache(maxsize=None)
def np_dtype(elem_type: int) -> np.dtype | None:
    """NumPy dtype of an ONNX element type (ml_dtypes' bfloat16 for BFLOAT16), or None."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):  # UNDEFINED and codes this onnx version does not know
        return None


@functools.lru_cache(maxsize=None)
def elem_type_of(dtype: np.dtype) -> int:
    """ONNX element type of a NumPy dtype (raises ``KeyError`` / ``ValueError`` if it has none)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; a read-only view of ``raw_data`` for the common numeric types.

    External data of a model opened with `bnfold.io.mapped.open_model` is a read-only view of
    the memory-mapped file: nothing is read until the values are used.
    """
    dtype = RAW_DTYPES.get(tensor.data_type)
    if tensor.data_location == TensorProto.EXTERNAL:
        if dtype is not None and _LITTLE_ENDIAN:
            return external_array(tensor, dtype)
        # Other element types: their bytes, decoded as if they had been loaded.
        loaded = TensorProto()
        loaded.CopyFrom(tensor)
        loaded.ClearField("data_location")
        del loaded.external_data[:]
        loaded.raw_data = external_array(tensor, np.dtype(np.uint8)).tobytes()
        return numpy_helper.to_array(loaded)
    if dtype is not None and tensor.HasField("raw_data") and _LITTLE_ENDIAN:
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def array_to_tensor(
    array: np.ndarray, name: str, elem_type: int | None = None, *, into: onnx.TensorProto | None = None
) -> onnx.TensorProto:
    """A TensorProto holding ``array`` as ``raw_data``, written once.

    ``into``: an empty tensor to fill (e.g. ``graph.initializer.add()``), which saves copying
    the bytes again when the tensor is appended to a graph.
    """
    array = np.asarray(array)
    if elem_type is None:
        elem_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor = TensorProto() if into is None else into
    if elem_type in RAW_DTYPES and _LITTLE_ENDIAN:
        tensor.name = name
        tensor.data_type = elem_type
        tensor.dims.extend(array.shape)
        values = np.ascontiguousarray(array, dtype=RAW_DTYPES[elem_type])
        # A large initializer of a model opened from disk goes to a scratch file, not memory.
        if into is None or not spill(tensor, values):
            tensor.raw_data = values.tobytes()
    else:
        tensor.CopyFrom(numpy_helper.from_array(array, name))
    return tensor
