"""`convert --force` over an OUT that had an external-data file: the file no model uses any more goes."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from bnfold.io import save_model


def _conv_bn(channels: int, rng: np.random.Generator) -> onnx.ModelProto:
    # (channels, channels, 3, 3) float32 weights: 9 KiB for 16 channels, above the 1 KiB that goes external.
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (channels, channels, 3, 3)).astype(np.float32), "w")]
    for name, value in (("s", rng.uniform(0.5, 1.5, channels)), ("b", rng.normal(0, 0.5, channels)),
                        ("m", rng.normal(0, 0.5, channels)), ("v", rng.uniform(0.5, 2, channels))):
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data_files(folder):
    return sorted(p.name for p in folder.glob("out.onnx.*.data"))


def _convert(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "convert", *args])
    assert exit_info.value.code == 0


@pytest.fixture
def models(tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.onnx"
    save_model(_conv_bn(16, rng), big, external_data=True)  # IN with external data: OUT gets some too
    small = tmp_path / "small.onnx"
    onnx.save(_conv_bn(2, rng), small)
    return big, small


def test_force_with_a_model_without_external_data_removes_the_old_data_file(tmp_path, models):
    big, small = models
    out = tmp_path / "out.onnx"
    _convert(str(big), "-o", str(out))
    (old,) = _data_files(tmp_path)
    _convert(str(small), "-o", str(out), "--force")
    assert _data_files(tmp_path) == [], f"{old} left behind"
    onnx.checker.check_model(onnx.load(out))


def test_force_with_new_external_data_replaces_the_data_file(tmp_path, models):
    big, _ = models
    out = tmp_path / "out.onnx"
    _convert(str(big), "-o", str(out))
    (first,) = _data_files(tmp_path)
    other = tmp_path / "other.onnx"
    save_model(_conv_bn(16, np.random.default_rng(1)), other, external_data=True)
    _convert(str(other), "-o", str(out), "--force")
    (second,) = _data_files(tmp_path)
    assert second != first
    onnx.load(out)  # reads its data file


def test_a_data_file_another_model_still_uses_is_kept(tmp_path, models):
    """The healthy counterpart: a copy of the old OUT in the folder still names the data file."""
    big, small = models
    out = tmp_path / "out.onnx"
    _convert(str(big), "-o", str(out))
    (old,) = _data_files(tmp_path)
    shutil.copyfile(out, tmp_path / "backup.onnx")
    _convert(str(small), "-o", str(out), "--force")
    assert _data_files(tmp_path) == [old]
    backup = onnx.load(tmp_path / "backup.onnx")  # loads its external data: the file is still there
    assert numpy_helper.to_array(next(t for t in backup.graph.initializer if t.name.startswith("w"))).size > 0
