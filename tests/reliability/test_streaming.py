"""Tensors streamed: external data mapped (not read), folded weights in blocks, file-to-file copies.

The reference for every result is the in-memory path (`bnfold.io.load_model` reads all data,
`bnfold.folding.fold` folds whole arrays, `bnfold.io.save_model` writes from memory): the
streamed path must give the same bytes, byte for byte, and refuse the same inputs.
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
from bnfold.folding import algebra, chunked, fold
from bnfold.folding.algebra import check_representable, fold_affine
from bnfold.folding.tensors import tensor_to_array
from bnfold.io import mapped, writing


def _save_external(model: onnx.ModelProto, path: Path, threshold: int = 0) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the data of the model it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, location=f"{path.name}.data",
                    size_threshold=threshold)
    return path


def _mixed_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv(+bias) -> BN, Gemm(transB, alpha, beta, C) -> BN, MatMul -> BN, float32; with an
    unchanged weight and tensors of 1,000 to 1,100 bytes around the 1 KiB external-data rule."""
    inits, nodes = [], []

    def add(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))

    def bn(x, y, prefix, channels):
        for role, value in (("scale", rng.uniform(0.5, 1.5, channels)), ("bias", rng.normal(0, 1, channels)),
                            ("mean", rng.normal(0, 0.1, channels)), ("var", rng.uniform(0.5, 2.0, channels))):
            add(f"{prefix}.{role}", value.astype(np.float32))
        nodes.append(helper.make_node("BatchNormalization", [x, *(f"{prefix}.{r}" for r in
                                      ("scale", "bias", "mean", "var"))], [y], name=prefix))

    add("conv.W", rng.normal(0, 0.5, (16, 3, 3, 3)).astype(np.float32))
    add("conv.b", rng.normal(0, 0.1, 16).astype(np.float32))
    nodes.append(helper.make_node("Conv", ["x", "conv.W", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]))
    bn("c", "cb", "bn0", 16)
    nodes.append(helper.make_node("GlobalAveragePool", ["cb"], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"]))
    add("gemm.W", rng.normal(0, 0.3, (250, 16)).astype(np.float32))  # 16,000 bytes, transB
    add("gemm.C", rng.normal(0, 0.1, 250).astype(np.float32))        # 1,000 bytes: near the rule
    nodes.append(helper.make_node("Gemm", ["f", "gemm.W", "gemm.C"], ["g"], name="gemm", transB=1,
                                  alpha=0.75, beta=1.5))
    bn("g", "gb", "bn1", 250)
    add("mm.W", rng.normal(0, 0.1, (250, 260)).astype(np.float32))
    nodes.append(helper.make_node("MatMul", ["gb", "mm.W"], ["m"], name="mm"))
    bn("m", "mb", "bn2", 260)
    add("keep.W", rng.normal(0, 0.1, (260, 7)).astype(np.float32))    # not folded: copied as is
    nodes.append(helper.make_node("MatMul", ["mb", "keep.W"], ["y"], name="keep"))
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _files(folder: Path, stem: str) -> dict[str, bytes]:
    """The model and its data files, the model's own name replaced so that two outputs compare
    (names of equal length: protobuf length prefixes stay equal)."""
    found = {}
    for item in sorted(folder.glob(f"{stem}*")):
        found[item.name.replace(stem, "OUT")] = item.read_bytes().replace(stem.encode(), b"OUT")
    return found


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 KiB, spilling (or deferring) from 8 KiB, hashing in a second thread from 1 KiB:
    every code path of the streamed fold and write runs on small models."""
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(mapped, "SPILL_MIN_BYTES", 8192)
    monkeypatch.setattr(writing, "_OVERLAP_MIN", 1024)


# ------------------------------------------------------------------------------------------
# the whole command: streamed output == in-memory output, byte for byte


@pytest.mark.parametrize("verify", [False, True], ids=["no-verify", "verify"])
def test_convert_streamed_writes_the_bytes_of_the_in_memory_path(tmp_path, small_blocks, verify):
    src = _save_external(_mixed_model(np.random.default_rng(0)), tmp_path / "in.onnx")
    out = tmp_path / "out" / "streamed.onnx"
    out.parent.mkdir()
    result = convert(src, out, verify=verify)
    assert result.data["bn_folded"] == 3, result.lines()
    # Reference: everything in memory, outside any open model (the path every release used).
    reference, _ = fold(bio.load_model(src))
    bio.save_model(reference, tmp_path / "out" / "inmemory.onnx", external_data=True)
    streamed, expected = _files(out.parent, "streamed.onnx"), _files(out.parent, "inmemory.onnx")
    assert streamed == expected
    assert len(streamed) == 2  # the model and one data file: no scratch or temporary file left
    assert result.data["size_bytes"]["after"] == sum(p.stat().st_size for p in out.parent.glob("streamed.onnx*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data", "out"]


def test_convert_streamed_output_runs_like_the_input(tmp_path, small_blocks):
    import onnxruntime as ort

    src = _save_external(_mixed_model(np.random.default_rng(1)), tmp_path / "in.onnx")
    out = tmp_path / "folded.onnx"
    convert(src, out, verify=False)
    x = np.random.default_rng(2).normal(size=(2, 3, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Folding reassociates float32 arithmetic: a few ulps of outputs of magnitude ~1.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_convert_streamed_failed_verification_leaves_nothing(tmp_path, small_blocks):
    """OUT is staged before verification: a failure must remove the staged model and data file."""
    from bnfold.errors import VerificationError

    src = _save_external(_mixed_model(np.random.default_rng(0)), tmp_path / "in.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    # Zero tolerance: folding changes float32 rounding, so the outputs differ in the last bits.
    with pytest.raises(VerificationError):
        convert(src, out, rtol=0.0, atol=0.0)
    assert list(out.parent.iterdir()) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_verify_of_a_folded_open_model_runs_from_a_temporary_copy(tmp_path, small_blocks):
    """Without a staged file (e.g. the bisection's candidates), onnxruntime gets a temporary copy
    beside the output, removed afterwards."""
    from bnfold.verification import verify

    src = _save_external(_mixed_model(np.random.default_rng(7)), tmp_path / "in.onnx")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with mapped.open_model(src, scratch_dir=scratch) as opened:
        folded, _ = fold(opened.model)
        report = verify(opened.model, folded)
    assert report.ok, report.summary()
    assert list(scratch.iterdir()) == []


def test_convert_in_memory_model_is_not_streamed(tmp_path, small_blocks):
    """A model without external data keeps today's path: no scratch, no data file."""
    src = tmp_path / "in.onnx"
    onnx.save(_mixed_model(np.random.default_rng(3)), str(src))
    convert(src, tmp_path / "out.onnx", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


# ------------------------------------------------------------------------------------------
# open_model: the same refusals as load_model, nothing read


def _external_gemm(builders, folder: Path, **entries) -> Path:
    model = builders.gemm_bn()
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "gemm.W")
    (folder / "w.bin").write_bytes(b"\x00" * 8 + weight.tobytes())
    entries = {"location": "w.bin", "offset": "8", "length": str(weight.nbytes), **entries}
    for tensor in model.graph.initializer:
        if tensor.name == "gemm.W":
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in entries.items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "entries, expected",
    [
        ({"location": "nothere.bin"}, "file is missing"),
        ({"length": "9999"}, "does not match its shape"),
        ({"offset": "40"}, "too short"),
        ({"offset": "-1"}, "negative"),
        ({"location": "../../etc/passwd"}, r"contains '\.\.'"),
        ({"location": "/etc/passwd"}, "absolute path"),
        ({"location": "."}, "not a regular file"),
    ],
    ids=["missing", "length-mismatch", "too-short", "negative-offset", "dotdot", "absolute", "directory"],
)
def test_open_model_refuses_what_load_model_refuses(builders, tmp_path, entries, expected):
    path = _external_gemm(builders, tmp_path, **entries)
    with pytest.raises(BnfoldError, match=expected) as info, mapped.open_model(path):
        pass
    assert "gemm.W" in str(info.value) and str(path) in str(info.value)


def test_open_model_refuses_a_symlink_out_of_the_folder(builders, tmp_path):
    outside, inside = tmp_path / "outside", tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    _external_gemm(builders, outside)
    path = _external_gemm(builders, inside)
    (inside / "w.bin").unlink()
    (inside / "w.bin").symlink_to(outside / "w.bin")
    with pytest.raises(BnfoldError, match="outside the model's folder"), mapped.open_model(path):
        pass


def test_open_model_maps_without_reading_and_reads_on_demand(builders, tmp_path):
    path = _external_gemm(builders, tmp_path)
    expected = bio.load_model(path)
    with mapped.open_model(path) as opened:
        tensor = next(t for t in opened.model.graph.initializer if t.name == "gemm.W")
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data
        values = tensor_to_array(tensor)
        assert not values.flags.writeable
        np.testing.assert_array_equal(values, numpy_helper.to_array(expected.graph.initializer[0]))
        del values
    # Outside the block the data is gone again: the fold's own message, not a crash.
    with pytest.raises(BnfoldError, match="external data that was not loaded"):
        tensor_to_array(tensor)


def test_release_drops_mapped_pages_from_this_process(tmp_path):
    if not hasattr(os, "posix_fadvise") or not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    weight = np.random.default_rng(0).normal(size=(2048, 4096)).astype(np.float32)  # 32 MiB
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(weight, "w")]))
    path = _save_external(model, tmp_path / "m.onnx")

    def rss_file() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:"))) * 1024

    with mapped.open_model(path) as opened:
        values = tensor_to_array(opened.model.graph.initializer[0])
        before = rss_file()
        assert float(values.sum(dtype=np.float64)) == pytest.approx(float(weight.sum(dtype=np.float64)))
        touched = rss_file()
        mapped.release(values)
        released = rss_file()
        np.testing.assert_array_equal(values[:3], weight[:3])  # still readable: faulted in again
    # Reading 32 MiB maps (nearly) all of it; releasing unmaps it from this process.
    assert touched - before > 24 * 1024**2
    assert touched - released > 24 * 1024**2


# ------------------------------------------------------------------------------------------
# the block-by-block weight equals the whole-array formula


def _whole(weight, scale, axis, dtype, alpha=None):
    """The reference: algebra.fold_affine on the whole array, then GraphIndex.cast_folded's rules."""
    w = weight if alpha is None else alpha * np.asarray(weight, dtype=np.float64)
    w64, _ = fold_affine(w, None, scale, np.zeros_like(scale), axis=axis)
    reason = check_representable(w64, dtype)
    if reason is not None:
        return reason
    cast = w64.astype(dtype)
    tiny = float(algebra._finfo(np.dtype(dtype)).tiny)
    probe = cast.astype(np.float32) if cast.dtype.kind != "f" else cast
    flush = (probe < tiny) & (probe > -tiny) & (probe != 0)
    cast[flush] = 0
    return cast, int(flush.sum())


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
@pytest.mark.parametrize("axis, alpha", [(0, None), (1, None), (0, 0.37), (1, -2.5)])
def test_scale_and_cast_is_bit_identical_to_the_whole_array(monkeypatch, dtype, axis, alpha):
    import ml_dtypes  # noqa: F401 - registers bfloat16

    monkeypatch.setattr(chunked, "BLOCK_BYTES", 1000)  # about 2 rows per block: many blocks
    rng = np.random.default_rng(4)
    dtype = np.dtype(dtype)
    weight = rng.normal(0, 1, (33, 61)).astype(dtype)
    weight[3, :5] = np.float32(2e-39) if dtype.kind == "V" or dtype == np.float32 else 0  # subnormals
    scale = rng.uniform(1e-3, 3, weight.shape[axis])
    scale[1] = 1e-6  # pushes values towards subnormal in float16
    got = chunked.scale_and_cast(weight, scale, axis=axis, dtype=dtype, alpha=alpha)
    want_array, want_flushed = _whole(weight, scale, axis, dtype, alpha)
    assert got.array.dtype == want_array.dtype
    assert got.array.tobytes() == want_array.tobytes()
    assert got.flushed == want_flushed


@pytest.mark.parametrize("bad", ["overflow", "nan", "inf"])
def test_scale_and_cast_reports_what_check_representable_reports(monkeypatch, bad):
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 256)
    weight = np.ones((40, 5), np.float16)
    scale = np.ones(40)
    scale[30] = {"overflow": 1e6, "nan": np.nan, "inf": np.inf}[bad]
    scale[2] = 7e4  # a smaller overflow in an earlier block: the message names the peak
    got = chunked.scale_and_cast(weight, scale, axis=0, dtype=np.float16)
    assert isinstance(got, str)
    assert got == _whole(weight, scale, 0, np.float16)


def test_scale_and_cast_of_a_healthy_weight_has_no_reason():
    got = chunked.scale_and_cast(np.ones((4, 3), np.float16), np.full(4, 2.0), axis=0, dtype=np.float16)
    assert not isinstance(got, str) and got.flushed == 0
    np.testing.assert_array_equal(got.array, np.full((4, 3), 2.0, np.float16))


# ------------------------------------------------------------------------------------------
# the writer: content-named data file, sizes decided as for loaded tensors


@pytest.mark.parametrize("how", ["deferred", "spilled"])
def test_deferred_spilled_and_mapped_tensors_are_written_like_loaded_ones(tmp_path, small_blocks, monkeypatch, how):
    if how == "spilled":  # what happens to large folded weights that cannot be deferred
        monkeypatch.setattr(mapped, "defers", lambda array: False)
    src = _save_external(_mixed_model(np.random.default_rng(5)), tmp_path / "in.onnx")
    with mapped.open_model(src, scratch_dir=tmp_path) as opened:
        folded, report = fold(opened.model)
        assert report.folded == 3
        prefix = "<bnfold-deferred" if how == "deferred" else "<bnfold-scratch"
        moved = [t.name for t in folded.graph.initializer if any(e.value.startswith(prefix) for e in t.external_data)]
        assert sorted(moved) == ["gemm.W_folded", "mm.W_folded"]  # >= 8 KiB; the 1.7 KiB Conv weight stays
        scratch = list(tmp_path.glob(".bnfold-scratch.*"))
        assert len(scratch) == (how == "spilled")
        # A later reader (e.g. a second fold into the same weight) sees the folded values.
        again = tensor_to_array(next(t for t in folded.graph.initializer if t.name == "mm.W_folded"))
        bio.save_model(folded, tmp_path / "a.onnx", external_data=True)
    assert not any(path.exists() for path in scratch)  # removed with the open model
    reference, _ = fold(bio.load_model(src))
    bio.save_model(reference, tmp_path / "b.onnx", external_data=True)
    assert _files(tmp_path, "a.onnx") == _files(tmp_path, "b.onnx")
    want = next(numpy_helper.to_array(t) for t in reference.graph.initializer if t.name == "mm.W_folded")
    assert again.tobytes() == want.tobytes()


def test_save_refuses_external_tensors_of_no_open_model(tmp_path):
    src = _save_external(_mixed_model(np.random.default_rng(6)), tmp_path / "in.onnx")
    with mapped.open_model(src) as opened:
        model = opened.model
    with pytest.raises(BnfoldError, match="still refers to external data"):
        bio.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data"]


def test_atomic_path_final_name_is_decided_after_the_block(tmp_path):
    name = []
    with bio.atomic_path(tmp_path / "x.data", final_name=lambda: name[0]) as tmp:
        tmp.write_bytes(b"content")
        name.append("x.1234.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.1234.data"]
    with pytest.raises(RuntimeError), bio.atomic_path(tmp_path / "y.data", final_name=lambda: "y.5678.data") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.1234.data"]


@pytest.mark.parametrize("missing", [("preadv",), ("preadv", "pread", "pwrite")], ids=["macos", "windows"])
def test_streamed_write_without_positional_io(tmp_path, small_blocks, monkeypatch, missing):
    """Platforms without os.preadv (macOS) or positional I/O at all (Windows) write the same bytes."""
    src = _save_external(_mixed_model(np.random.default_rng(8)), tmp_path / "in.onnx")
    reference, _ = fold(bio.load_model(src))
    bio.save_model(reference, tmp_path / "memory.onnx", external_data=True)
    for name in missing:
        monkeypatch.delattr(os, name)
    # Keep one tensor on disk unchanged and one small one inline: both read back through the fallback.
    convert(src, tmp_path / "stream.onnx", verify=False)
    assert _files(tmp_path, "stream.onnx") == _files(tmp_path, "memory.onnx")


def test_file_system_that_cannot_map_files_reads_the_bytes(tmp_path, small_blocks, monkeypatch):
    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    src = _save_external(_mixed_model(np.random.default_rng(9)), tmp_path / "in.onnx")
    reference, _ = fold(bio.load_model(src))
    bio.save_model(reference, tmp_path / "memory.onnx", external_data=True)
    monkeypatch.setattr(mapped.mmap, "mmap", no_mmap)
    convert(src, tmp_path / "stream.onnx", verify=False)
    assert _files(tmp_path, "stream.onnx") == _files(tmp_path, "memory.onnx")


def test_verify_of_files_with_external_data_reads_no_tensor_itself(tmp_path, monkeypatch):
    """`bnfold verify A B` hands onnxruntime the files: bnfold reads none of their data."""
    from bnfold.io import external
    from bnfold.verification import verify

    src = _save_external(_mixed_model(np.random.default_rng(10)), tmp_path / "in.onnx")
    out = tmp_path / "folded.onnx"
    convert(src, out, verify=False)

    def refuse(*args, **kwargs):
        raise AssertionError("external data read into memory")

    monkeypatch.setattr(external, "load_external_data", refuse)
    report = verify(src, out)
    assert report.ok, report.summary()
    assert report.reference == str(src) and report.candidate == str(out)
    # The same check still refuses unsafe files (the rules of bnfold.io.external, applied unread).
    (tmp_path / "in.onnx.data").write_bytes(b"short")
    with pytest.raises(BnfoldError, match="too short"):
        verify(src, out)
