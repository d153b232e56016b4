"""`bnfold.io`: validated loading, confined external data, pickle-free arrays, atomic writes."""

from __future__ import annotations

import os
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import io as bio
from bnfold.errors import BnfoldError


def _external(model: onnx.ModelProto, tensor_name: str, **entries: str) -> onnx.ModelProto:
    """Turn initializer `tensor_name` into an external reference with the given entries."""
    for tensor in model.graph.initializer:
        if tensor.name == tensor_name:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in entries.items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            return model
    raise KeyError(tensor_name)


def _weight(model: onnx.ModelProto, name: str = "gemm.W") -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# ------------------------------------------------------------------------------------------
# load_model: what is not a usable model


def test_load_valid_model_roundtrip(builders, save):
    model = builders.gemm_bn()
    loaded = bio.load_model(save(model))
    assert loaded.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("dir", "is a directory"),
        (b"", "file is empty"),
        (b"\xff" * 7 + os.urandom(256), "not a valid ONNX model"),
    ],
    ids=["missing", "directory", "empty", "random-bytes"],
)
def test_load_refuses_non_files(tmp_path, content, expected):
    path = tmp_path / "in.onnx"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(BnfoldError, match=expected) as info:
        bio.load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_load_refuses_special_files_without_reading(tmp_path, kind):
    """A named pipe would block forever and /dev/zero never ends: refused from stat alone."""
    if kind == "fifo":
        path = tmp_path / "pipe.onnx"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
    with pytest.raises(BnfoldError, match="not a regular file"):
        bio.load_model(path)
    with pytest.raises(BnfoldError, match="not a regular file"):
        bio.load_npz(path)


def test_load_refuses_file_over_protobuf_limit(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as handle:  # sparse: no disk space used
        handle.truncate(2**31 + 10)
    with pytest.raises(BnfoldError, match="more than an ONNX protobuf can hold"):
        bio.load_model(path)


def test_load_refuses_truncated_model(builders, tmp_path):
    data = builders.conv_bn().SerializeToString()
    # Every cut through the file either fails to parse or fails validation; none gets through.
    for cut in range(1, len(data), max(1, len(data) // 40)):
        path = tmp_path / "cut.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(BnfoldError):
            bio.load_model(path)


@pytest.mark.parametrize("kind", ["tensor", "graph", "node", "empty-model"])
def test_load_refuses_other_protobuf_messages(builders, tmp_path, kind):
    model = builders.gemm_bn()
    message = {
        "tensor": model.graph.initializer[0],
        "graph": model.graph,
        "node": model.graph.node[0],
        "empty-model": onnx.ModelProto(ir_version=8),
    }[kind]
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(message.SerializeToString())
    with pytest.raises(BnfoldError, match="not (a valid ONNX model|an ONNX model)"):
        bio.load_model(path)


def test_load_refuses_newer_ir_version(builders, save):
    model = builders.gemm_bn()
    model.ir_version = onnx.IR_VERSION + 1
    with pytest.raises(BnfoldError, match=f"IR version {onnx.IR_VERSION + 1} is newer"):
        bio.load_model(save(model), check=False)


@pytest.mark.parametrize(
    "domain, newest", [("", onnx.defs.onnx_opset_version()), ("ai.onnx.ml", onnx.defs.onnx_ml_opset_version())]
)
def test_load_refuses_unknown_opset(builders, save, domain, newest):
    model = builders.gemm_bn()
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3)) if domain else None
    for opset in model.opset_import:
        if opset.domain == domain:
            opset.version = newest + 1
    # The checker alone accepts an unknown opset of the default domain (onnx 1.23), so this is
    # bnfold's own check and must hold even with check=False.
    with pytest.raises(BnfoldError, match=f"opset {newest + 1} .* newer"):
        bio.load_model(save(model), check=False)


def test_custom_domain_opset_is_not_refused(builders, save):
    model = builders.gemm_bn()
    model.opset_import.append(helper.make_opsetid("com.example", 1000))
    bio.load_model(save(model))


def test_load_quotes_checker_failure(builders, save):
    model = builders.gemm_bn()
    model.graph.node[1].op_type = "BatchNormalisation"  # not an ONNX operator
    path = save(model)
    with pytest.raises(BnfoldError, match="fails onnx.checker: .*BatchNormalisation") as info:
        bio.load_model(path)
    assert "\n" not in str(info.value)
    bio.load_model(path, check=False)  # check=False leaves validation to the caller


def test_load_refuses_names_that_are_not_utf8(builders, tmp_path):
    model = builders.gemm_bn()
    model.graph.node[1].name = "bnXX"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString().replace(b"bnXX", b"bn\xff\xfe"))
    with pytest.raises(BnfoldError, match=r"b'bn\\xff\\xfe' is not valid UTF-8"):
        bio.load_model(path)
    assert bio.load_model(path, check=False).graph.node[1].name == b"bn\xff\xfe"


@pytest.mark.parametrize("field", ["graph.name", "graph.doc_string", "doc_string", "producer_name"])
def test_load_and_fold_refuse_other_strings_that_are_not_utf8(builders, tmp_path, field):
    """Found by the fuzzer: a graph name that is not UTF-8 passed the checks and then made the
    fold pass fail with UnicodeDecodeError when it copied the model."""
    from bnfold.folding import fold

    model = builders.gemm_bn()
    owner = model.graph if field.startswith("graph.") else model
    setattr(owner, field.split(".")[-1], "XXmarkXX")
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString().replace(b"XXmarkXX", b"XX\x8emarkX"))
    with pytest.raises(BnfoldError, match=r"not valid UTF-8"):
        bio.load_model(path)
    if field in ("graph.name", "producer_name"):  # fields the fold pass copies one by one
        with pytest.raises(BnfoldError, match=r"not valid UTF-8"):
            fold(bio.load_model(path, check=False))


@pytest.mark.parametrize("kind", ["missing-initializer", "cycle"])
def test_checker_refuses_dangling_inputs_and_cycles(builders, save, kind):
    if kind == "cycle":
        model = builders.cycle_model()
    else:
        model = builders.gemm_bn()
        model.graph.node[1].input[4] = "bn.var.missing"
    with pytest.raises(BnfoldError, match="topologically sorted"):
        bio.load_model(save(model))


# ------------------------------------------------------------------------------------------
# External data


def _external_model(builders, folder: Path, **entries) -> Path:
    model = builders.gemm_bn()
    weight = _weight(model)
    (folder / "w.bin").write_bytes(b"\x00" * 8 + weight.tobytes())
    entries = {"location": "w.bin", "offset": "8", "length": str(weight.nbytes), **entries}
    path = folder / "model.onnx"
    path.write_bytes(_external(model, "gemm.W", **entries).SerializeToString())
    return path


def test_external_data_inside_folder_is_loaded(builders, tmp_path):
    path = _external_model(builders, tmp_path)
    loaded = bio.load_model(path)
    np.testing.assert_array_equal(_weight(loaded), _weight(builders.gemm_bn()))
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)


def test_external_data_saved_by_onnx_is_loaded(builders, tmp_path):
    model = builders.conv_bn()
    path = tmp_path / "sub" / "m.onnx"
    path.parent.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the data of the model it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = bio.load_model(path)
    for a, b in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


@pytest.mark.parametrize(
    "entries, expected",
    [
        ({"location": "nothere.bin"}, "file is missing"),
        ({"location": ""}, "without a location"),
        ({"length": "9999"}, "does not match its shape"),
        ({"offset": "40"}, "too short"),
        ({"offset": "-1"}, "negative"),
        ({"offset": "eight"}, "not an integer"),
        ({"location": "../../etc/passwd"}, r"contains '\.\.'"),
        ({"location": "sub/../../w.bin"}, r"contains '\.\.'"),
        ({"location": "/etc/passwd"}, "absolute path"),
        ({"location": "."}, "not a regular file"),
    ],
    ids=["missing", "no-location", "length-mismatch", "too-short", "negative-offset", "bad-offset",
         "dotdot", "nested-dotdot", "absolute", "directory"],
)
def test_external_data_refused(builders, tmp_path, entries, expected):
    path = _external_model(builders, tmp_path, **entries)
    before = path.read_bytes()
    with pytest.raises(BnfoldError, match=expected) as info:
        bio.load_model(path)
    assert "gemm.W" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before


def test_external_data_file_too_short(builders, tmp_path):
    path = _external_model(builders, tmp_path)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:-4])
    with pytest.raises(BnfoldError, match="too short"):
        bio.load_model(path)


def test_external_data_symlink_out_of_folder_refused(builders, tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    _external_model(builders, outside)  # a genuine w.bin, but in another folder
    path = _external_model(builders, inside)
    (inside / "w.bin").unlink()
    (inside / "w.bin").symlink_to(outside / "w.bin")
    with pytest.raises(BnfoldError, match="outside the model's folder"):
        bio.load_model(path)
    (inside / "w.bin").unlink()
    (inside / "link").symlink_to(outside, target_is_directory=True)
    path2 = _external_model(builders, inside, location="link/w.bin")
    (inside / "w.bin").unlink()
    with pytest.raises(BnfoldError, match="outside the model's folder"):
        bio.load_model(path2)


def test_external_data_symlink_inside_folder_allowed(builders, tmp_path):
    path = _external_model(builders, tmp_path)
    (tmp_path / "w.bin").rename(tmp_path / "real.bin")
    (tmp_path / "w.bin").symlink_to("real.bin")
    np.testing.assert_array_equal(_weight(bio.load_model(path)), _weight(builders.gemm_bn()))


def test_model_reached_through_symlink_uses_its_real_folder(builders, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    path = _external_model(builders, real)
    (tmp_path / "alias.onnx").symlink_to(path)
    np.testing.assert_array_equal(_weight(bio.load_model(tmp_path / "alias.onnx")), _weight(builders.gemm_bn()))


# ------------------------------------------------------------------------------------------
# .npz without pickle


class _Trap:
    """Unpickling this object creates `marker` (proof that unpickling happened)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_npz_roundtrip(tmp_path):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "k": np.int64(3)}
    np.savez(tmp_path / "a.npz", **arrays)
    loaded = bio.load_npz(tmp_path / "a.npz")
    assert set(loaded) == {"x", "k"}
    np.testing.assert_array_equal(loaded["x"], arrays["x"])


def test_npz_with_pickled_object_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _Trap(marker)
    np.savez(tmp_path / "evil.npz", x=np.zeros(2, np.float32), evil=payload)
    with pytest.raises(BnfoldError, match="pickled objects"):
        bio.load_npz(tmp_path / "evil.npz")
    assert not marker.exists()
    # The trap is real: plain pickle would have run it.
    pickle.loads(pickle.dumps(_Trap(marker)))
    assert marker.exists()


def test_raw_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(BnfoldError, match="not a valid .npz"):
        bio.load_npz(tmp_path / "evil.npz")
    assert not marker.exists()


def test_npz_declaring_huge_array_is_refused_before_allocation(tmp_path):
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(b"\x00" * 16)
    with pytest.raises(BnfoldError, match="declares shape"):
        bio.load_npz(path)


@pytest.mark.parametrize("content", [b"PK\x03\x04garbage", b"\x93NUMPY not an npz", b"hello"])
def test_npz_garbage_is_refused(tmp_path, content):
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(BnfoldError, match="bad.npz"):
        bio.load_npz(tmp_path / "bad.npz")


def test_npz_member_that_is_not_an_array_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(BnfoldError, match="not a .npy array"):
        bio.load_npz(tmp_path / "odd.npz")


# ------------------------------------------------------------------------------------------
# Atomic writes


class _Boom(Exception):
    pass


@pytest.mark.parametrize("failure", [_Boom, KeyboardInterrupt])
def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp(tmp_path, failure):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(failure):
        with bio.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise failure()
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_atomic_path_replace_failure_is_bnfold_error(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(BnfoldError, match="could not be written"):
        with bio.atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_atomic_path_gives_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with bio.atomic_path(tmp_path / "new.onnx") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(umask)
    # mkstemp creates 0o600 files; a model others must read gets 0o666 & ~umask like open() would.
    assert stat.S_IMODE((tmp_path / "new.onnx").stat().st_mode) == 0o644


def test_atomic_path_unwritable_folder(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    for bad in (tmp_path / "nodir" / "out.onnx", tmp_path / "file" / "out.onnx"):
        with pytest.raises(BnfoldError, match="cannot write in"):
            with bio.atomic_path(bad):
                pytest.fail("must not be reached")


@pytest.mark.parametrize("failure", [_Boom, KeyboardInterrupt])
def test_save_model_interrupted_mid_write_keeps_previous_output(builders, tmp_path, monkeypatch, failure):
    target = tmp_path / "out.onnx"
    bio.save_model(builders.gemm_bn(), target)
    previous = target.read_bytes()
    real_write = Path.write_bytes

    def write_half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise failure()

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    with pytest.raises(failure):
        bio.save_model(builders.conv_bn(), target)
    monkeypatch.undo()
    assert target.read_bytes() == previous
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_save_model_with_external_data_roundtrip_and_replace(builders, tmp_path, monkeypatch):
    monkeypatch.setattr(bio.writing, "_EXTERNAL_MIN_BYTES", 64)  # the test models' tensors are small
    target = tmp_path / "out.onnx"
    first, second = builders.conv_bn(), builders.conv_bn(np.random.default_rng(7))
    bio.save_model(first, target, external_data=True)
    sidecars = [name for name in os.listdir(tmp_path) if name.endswith(".data")]
    assert len(sidecars) == 1 and sidecars[0].startswith("out.onnx.")
    stored = onnx.load_model(str(target), load_external_data=False)
    assert stored.graph.initializer[0].data_location == TensorProto.EXTERNAL
    assert bio.load_model(target).SerializeToString() == first.SerializeToString()
    bio.save_model(second, target, external_data=True)
    assert bio.load_model(target).SerializeToString() == second.SerializeToString()
    # The previous sidecar is removed once nothing refers to it; no temporary file is left.
    assert [n for n in os.listdir(tmp_path) if n != "out.onnx" and not n.endswith(".data")] == []
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".data")]) == 1


def test_save_model_with_external_data_interrupted_keeps_previous_model_loadable(builders, tmp_path, monkeypatch):
    monkeypatch.setattr(bio.writing, "_EXTERNAL_MIN_BYTES", 64)
    target = tmp_path / "out.onnx"
    first = builders.conv_bn()
    bio.save_model(first, target, external_data=True)
    before = sorted(os.listdir(tmp_path))
    real_write = Path.write_bytes

    def fail_on_model(self, data):
        if self.name.startswith(".out.onnx.") and not self.name.endswith(".data.tmp") and ".data." not in self.name:
            raise KeyboardInterrupt()
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_model)
    with pytest.raises(KeyboardInterrupt):
        bio.save_model(builders.conv_bn(np.random.default_rng(7)), target, external_data=True)
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert sorted(os.listdir(tmp_path)) == before
    assert bio.load_model(target).SerializeToString() == first.SerializeToString()


# ------------------------------------------------------------------------------------------
# check_output_path


def test_output_equal_to_input_refused_also_through_links(builders, save, tmp_path):
    src = save(builders.gemm_bn())
    (tmp_path / "sym.onnx").symlink_to(src)
    os.link(src, tmp_path / "hard.onnx")
    for out in (src, tmp_path / "sym.onnx", tmp_path / "hard.onnx", tmp_path / "." / src.name):
        with pytest.raises(BnfoldError, match="same file as the input"):
            bio.check_output_path(out, overwrite=True, inputs=(src,))


@pytest.mark.parametrize("loaded_first", [True, False])
def test_output_equal_to_inputs_external_data_refused(builders, tmp_path, loaded_first):
    path = _external_model(builders, tmp_path)
    if loaded_first:
        bio.load_model(path)
    with pytest.raises(BnfoldError, match="external data file of the input"):
        bio.check_output_path(tmp_path / "w.bin", overwrite=True, inputs=(path,))
    bio.check_output_path(tmp_path / "other.bin", overwrite=True, inputs=(path,))


def test_output_path_rules(tmp_path, is_root):
    (tmp_path / "exists.onnx").write_bytes(b"x")
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(BnfoldError, match="already exists; use --force"):
        bio.check_output_path(tmp_path / "exists.onnx", overwrite=False)
    assert bio.check_output_path(tmp_path / "exists.onnx", overwrite=True) == tmp_path / "exists.onnx"
    with pytest.raises(BnfoldError, match="is a directory"):
        bio.check_output_path(tmp_path, overwrite=True)
    with pytest.raises(BnfoldError, match="does not exist"):
        bio.check_output_path(tmp_path / "no" / "out.onnx", overwrite=False)
    with pytest.raises(BnfoldError, match="not a folder"):
        bio.check_output_path(tmp_path / "afile" / "out.onnx", overwrite=False)
    if not is_root:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BnfoldError, match="not writable"):
            bio.check_output_path(locked / "out.onnx", overwrite=False)


def test_save_with_external_data_handles_typed_fields_and_spares_unrelated_files(builders, tmp_path, monkeypatch):
    monkeypatch.setattr(bio.writing, "_EXTERNAL_MIN_BYTES", 64)
    model = builders.gemm_bn()
    values = np.arange(40, dtype=np.float32)
    # float_data instead of raw_data: the other way ONNX stores a tensor.
    model.graph.initializer.append(helper.make_tensor("typed", TensorProto.FLOAT, [40], values.tolist(), raw=False))
    target = tmp_path / "out.onnx"
    (tmp_path / "out.onnx.mine.data").write_bytes(b"a user's file that only looks like a data file")
    bio.save_model(model, target, external_data=True)
    bio.save_model(builders.gemm_bn(np.random.default_rng(3)), target, external_data=True)
    bio.save_model(model, target, external_data=True)
    loaded = bio.load_model(target)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[-1]), values)
    data_files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".data"))
    assert len(data_files) == 2 and "out.onnx.mine.data" in data_files, data_files


def test_external_data_folder_swapped_for_symlink_after_check_is_refused(builders, tmp_path, monkeypatch):
    """The race: the location is checked, then a folder on its path becomes a link leading out."""
    import bnfold.io.external as external

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\x00" * 8 + _weight(builders.gemm_bn()).tobytes())
    model_dir = tmp_path / "model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "sub" / "w.bin").write_bytes((outside / "w.bin").read_bytes())
    path = _external_model(builders, model_dir, location="sub/w.bin")
    real_check = external._check_external_location

    def check_then_swap(*args):
        target = real_check(*args)
        (model_dir / "sub" / "w.bin").unlink()
        (model_dir / "sub").rmdir()
        (model_dir / "sub").symlink_to(outside, target_is_directory=True)
        return target

    monkeypatch.setattr(external, "_check_external_location", check_then_swap)
    with pytest.raises(BnfoldError, match="cannot be opened"):
        bio.load_model(path)


def test_npz_over_memory_limit_is_refused_before_inflating(tmp_path, monkeypatch):
    # 64 MiB of zeros deflate to ~64 KiB: the declared size, not the file size, must decide.
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros(16 * 1024**2, np.float32))
    assert path.stat().st_size < 1024**2
    with pytest.raises(BnfoldError, match="more than the limit of 1048576"):
        bio.load_npz(path, max_bytes=1024**2)
    assert bio.load_npz(path)["x"].shape == (16 * 1024**2,)


def test_npz_keys_and_dtypes_match_numpy(tmp_path):
    arrays = {"a": np.arange(5, dtype=np.int16), "b.c": np.ones((2, 2), np.float16), "s": np.array("text")}
    np.savez(tmp_path / "m.npz", **arrays)
    loaded = bio.load_npz(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as reference:
        assert sorted(loaded) == sorted(reference.files)
        for key in reference.files:
            assert loaded[key].dtype == reference[key].dtype
            np.testing.assert_array_equal(loaded[key], reference[key])


def test_external_location_that_is_not_utf8_is_refused(builders, tmp_path):
    """Protobuf hands out a non-UTF-8 location as bytes; found by tools/fuzz_convert.py."""
    path = _external_model(builders, tmp_path, location="wXbin")
    path.write_bytes(path.read_bytes().replace(b"wXbin", b"w\xffbin"))
    for check in (True, False):
        with pytest.raises(BnfoldError, match="not valid UTF-8"):
            bio.load_model(path, check=check)
