"""`bnfold.folding.tensors`: TensorProto <-> NumPy, against onnx.numpy_helper as the reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from bnfold.folding.tensors import (
    RAW_DTYPES,
    array_to_tensor,
    elem_type_of,
    np_dtype,
    tensor_to_array,
)


@pytest.mark.parametrize("elem_type", sorted(RAW_DTYPES))
def test_round_trip_matches_numpy_helper(elem_type):
    rng = np.random.default_rng(elem_type)
    array = (rng.standard_normal((3, 4)) * 50).astype(RAW_DTYPES[elem_type])
    tensor = array_to_tensor(array, "t")
    assert tensor.HasField("raw_data") and tensor.data_type == elem_type and list(tensor.dims) == [3, 4]
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), array)
    back = tensor_to_array(tensor)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


def test_raw_data_is_read_as_a_read_only_view():
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    view = tensor_to_array(tensor)
    assert not view.flags.writeable  # folds must never write into a model's weights
    with pytest.raises(ValueError):
        view[0, 0] = 1


def test_typed_fields_and_other_types_go_through_numpy_helper():
    floats = TensorProto(name="f", data_type=TensorProto.FLOAT, dims=[2], float_data=[1.5, -2.0])
    np.testing.assert_array_equal(tensor_to_array(floats), [1.5, -2.0])
    bf16 = np.array([1.0, 2.5], dtype=ml_dtypes.bfloat16)
    tensor = array_to_tensor(bf16, "b", TensorProto.BFLOAT16)
    np.testing.assert_array_equal(tensor_to_array(tensor).astype(np.float32), [1.0, 2.5])


def test_into_fills_the_given_tensor():
    target = TensorProto()
    result = array_to_tensor(np.ones(2, np.float16), "h", into=target)
    assert result is target and target.name == "h" and target.data_type == TensorProto.FLOAT16


def test_dtypes():
    assert np_dtype(TensorProto.FLOAT) == np.float32
    assert np_dtype(TensorProto.BFLOAT16) == ml_dtypes.bfloat16
    assert np_dtype(TensorProto.UNDEFINED) is None and np_dtype(12345) is None
    assert elem_type_of(np.dtype(np.float16)) == TensorProto.FLOAT16
