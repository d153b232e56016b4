"""`bnfold.folding.casting`: float64 fold results cast once, overflow refused, subnormals flushed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto

from bnfold.folding.casting import cast_folded, flush_subnormals, smallest_normal
from bnfold.folding.patterns import Skip


@pytest.mark.parametrize(("elem_type", "dtype"), [(TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16),
                                                  (TensorProto.DOUBLE, np.float64)])
def test_cast_flushes_exactly_the_subnormals(elem_type, dtype):
    tiny = float(np.finfo(dtype).tiny)
    values = np.array([1.5, -tiny, tiny / 4, -tiny / 8, 0.0, 3 * tiny])
    cast, flushed = cast_folded(values, elem_type, "w")
    # Reference: the plain cast, with the values below the smallest normal (and not 0) set to 0.
    expected = values.astype(dtype)
    expected[(np.abs(expected) < tiny) & (expected != 0)] = 0
    assert cast.dtype == dtype and flushed == 2
    np.testing.assert_array_equal(cast, expected)


def test_bfloat16_subnormals_are_flushed():
    tiny = float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny)
    cast, flushed = cast_folded(np.array([tiny / 4, 1.0]), TensorProto.BFLOAT16, "w")
    assert flushed == 1 and cast.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(cast.astype(np.float32), [0.0, 1.0])


def test_overflow_and_unknown_types_are_skips():
    skip = cast_folded(np.array([1e6]), TensorProto.FLOAT16, "folded bias")
    assert isinstance(skip, Skip) and skip.reason.startswith("folded bias: folded value 1e+06 overflows float16")
    assert cast_folded(np.array([65000.0]), TensorProto.FLOAT16, "w")[1] == 0  # in range: cast
    unknown = cast_folded(np.array([1.0]), 12345, "w")
    assert isinstance(unknown, Skip) and "element type 12345" in unknown.reason


def test_integers_have_no_subnormals():
    assert smallest_normal(np.dtype(np.int64)) is None
    values = np.array([0, 1, -3])
    assert flush_subnormals(values) == 0 and values.tolist() == [0, 1, -3]
