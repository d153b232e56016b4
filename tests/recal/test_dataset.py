"""bnfold.dataset: .npz / .npy / arrays as one data set, streamed by batches; one-line errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bnfold.dataset import ArraySpec, open_dataset
from bnfold.errors import BnfoldError

SPEC = [ArraySpec("x", np.dtype(np.float32), ("N", 3, 2))]
TWO = [ArraySpec("a", np.dtype(np.float32), ("N", 2)), ArraySpec("b", np.dtype(np.int64), (None, 1))]


def _x(n, start=0):
    return (np.arange(start * 6, (start + n) * 6, dtype=np.float32)).reshape(n, 3, 2)


def _rows(dataset, batch_size):
    return np.concatenate([feeds["x"] for feeds in dataset.batches(batch_size)])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_several_files_are_one_data_set_streamed_in_order(tmp_path, save, batch_size):
    save(tmp_path / "a.npz", x=_x(5), y=np.arange(5))
    save(tmp_path / "b.npz", x=_x(8, 5), y=np.arange(5, 13))
    np.save(tmp_path / "c.npy", _x(2, 13))
    dataset = open_dataset([tmp_path / "a.npz", tmp_path / "b.npz"], SPEC, labels="y")
    assert len(dataset) == 13
    np.testing.assert_array_equal(_rows(dataset, batch_size), _x(13))
    np.testing.assert_array_equal(dataset.labels(), np.arange(13))
    single = open_dataset([tmp_path / "b.npz", tmp_path / "c.npy"], SPEC)  # single array for a single input
    np.testing.assert_array_equal(_rows(single, batch_size), _x(10, 5))
    # A second pass over a compressed member restarts the stream.
    np.testing.assert_array_equal(_rows(dataset, batch_size), _x(13))


def test_shards_are_batch_aligned_and_pickle_small(tmp_path):
    np.savez(tmp_path / "a.npz", x=_x(10))
    memory = {"x": _x(1000)}
    for data in (tmp_path / "a.npz", memory):
        dataset = open_dataset(data, SPEC)
        shards = dataset.shards(3, 4)
        sizes = [len(s) for s in shards]
        assert sum(sizes) == len(dataset) and all(size % 4 == 0 for size in sizes[:-1])
        rebuilt = np.concatenate([_rows(pickle.loads(pickle.dumps(s)), 3) for s in shards])
        np.testing.assert_array_equal(rebuilt, _rows(dataset, 5))
    big = open_dataset(memory, SPEC).shards(4, 10)[0]
    assert len(pickle.dumps(big)) < _x(1000).nbytes / 2  # only the shard's rows travel


def test_uncompressed_members_are_memory_mapped(tmp_path):
    np.savez(tmp_path / "a.npz", x=_x(4))
    dataset = open_dataset(tmp_path / "a.npz", SPEC)
    assert dataset._sources[0].arrays["x"].offset is not None
    np.savez_compressed(tmp_path / "b.npz", x=_x(4))
    assert open_dataset(tmp_path / "b.npz", SPEC)._sources[0].arrays["x"].offset is None


def test_floating_data_is_cast_and_fortran_order_is_read(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.asfortranarray(_x(4).astype(np.float64)))
    dataset = open_dataset(tmp_path / "a.npz", SPEC)
    feeds = dataset.batch(1, 3)
    assert feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], _x(4)[1:3])


def test_two_inputs_by_name():
    data = {"a": np.ones((3, 2), np.float32), "b": np.arange(3).reshape(3, 1), "extra": np.zeros(7)}
    feeds = open_dataset(data, TWO).batch(0, 3)
    assert set(feeds) == {"a", "b"}
    np.testing.assert_array_equal(feeds["b"], [[0], [1], [2]])


@pytest.mark.parametrize("arrays, specs, labels, message", [
    ({"a": np.ones((3, 2), np.float32)}, TWO, None, r"no array for model input 'b' \(arrays: 'a'\); save"),
    ({"w": _x(3), "z": _x(3)}, SPEC, None, r"no array for model input 'x' \(arrays: 'w', 'z'\); save the samples under the input's name: np.savez\(path, \*\*\{'x': x\}\)"),
    ({"x": _x(3)}, SPEC, "y", r"no labels array 'y'"),
    ({"x": _x(3), "y": np.zeros(3)}, SPEC, "y", r"labels must be a 1-D integer array"),
    ({"x": _x(3), "y": np.zeros(4, int)}, SPEC, "y", r"different numbers of rows \(3 and 4 in 'y'\)"),
    ({"x": np.zeros((3, 2, 3), np.float32)}, SPEC, None, r"array 'x' has shape \(3, 2, 3\); model input 'x' takes \(N, 3, 2\)"),
    ({"x": np.zeros((3, 6), np.float32)}, SPEC, None, r"has shape \(3, 6\)"),
    ({"x": np.zeros((3, 3, 2), np.uint8)}, SPEC, None, r"has dtype uint8; model input 'x' takes float32"),
    ({"x": np.zeros((0, 3, 2), np.float32)}, SPEC, None, r"no samples \(0 rows\)"),
])
def test_bad_data_is_one_line_error(tmp_path, arrays, specs, labels, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(BnfoldError, match=message) as info:
        open_dataset(path, specs, labels=labels)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_pickled_objects_and_non_archives_are_refused(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BnfoldError, match="pickled objects"):
        open_dataset(tmp_path / "o.npz", SPEC)
    (tmp_path / "t.npz").write_text("hello")
    with pytest.raises(BnfoldError, match="not a valid .npz"):
        open_dataset(tmp_path / "t.npz", SPEC)
    with pytest.raises(BnfoldError, match="no such file"):
        open_dataset(tmp_path / "missing.npz", SPEC)
