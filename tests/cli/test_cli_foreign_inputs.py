"""A model of another framework where an ONNX file is expected: one line naming the converter."""

from __future__ import annotations

from pathlib import Path

import pytest

import bnfold
from bnfold.cli import main
from bnfold.errors import BnfoldError


def _make(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    if name == "saved":  # a SavedModel folder: saved_model.pb plus variables/
        (path / "variables").mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"\x0a\x02\x08\x01not onnx")
    else:
        path.write_bytes(b"PK\x03\x04 not an onnx model")
    return path


CASES = [
    ("saved", "TensorFlow SavedModel folder", "tf2onnx.convert --saved-model"),
    ("model.keras", "Keras model file", "format='onnx'"),
    ("weights.h5", "Keras/HDF5 model file", "format='onnx'"),
    ("frozen.pb", "frozen GraphDef", "tf2onnx.convert --graphdef"),
    ("net.pt", "PyTorch file", "torch.onnx.export"),
    ("ckpt.npz", "not an ONNX file", "bnfold export"),
]


@pytest.mark.parametrize(("name", "kind", "converter"), CASES)
def test_cli_names_the_converter(tmp_path, capsys, name, kind, converter):
    path = _make(tmp_path, name)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(path), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"bnfold: error: {path}: ")
    assert kind in err and converter in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(("name", "kind", "converter"), CASES[:3])
def test_api_names_the_converter(tmp_path, name, kind, converter):
    path = _make(tmp_path, name)
    with pytest.raises(BnfoldError, match=converter.replace("(", r"\(").replace(".", r"\.")):
        bnfold.verify(path, path)


def test_saved_model_pb_points_to_its_folder(tmp_path, capsys):
    path = _make(tmp_path, "saved") / "saved_model.pb"
    with pytest.raises(SystemExit):
        main(["convert", str(path), "-o", str(tmp_path / "out.onnx")])
    assert f"--saved-model {path.parent} " in capsys.readouterr().err


def test_plain_folder_and_bad_onnx_keep_their_usual_errors(tmp_path, capsys):
    """The healthy counterpart: only files recognisably from another framework get the hint."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.onnx").write_bytes(b"PK\x03\x04 not an onnx model")
    for name, expected in (("folder", "is a directory"), ("bad.onnx", "not a valid ONNX model")):
        with pytest.raises(SystemExit):
            main(["convert", str(tmp_path / name), "-o", str(tmp_path / "out.onnx")])
        err = capsys.readouterr().err
        assert expected in err and "tf2onnx" not in err and "torch" not in err


def test_onnx_model_with_a_foreign_suffix_still_loads(tmp_path):
    """The hint is consulted only after loading failed: an ONNX file named .pb is still read."""
    import shutil

    source = sorted(p for p in (Path(__file__).parents[2] / "models").glob("*.onnx") if "folded" not in p.name)[0]
    path = tmp_path / "model.pb"
    shutil.copyfile(source, path)
    assert bnfold.verify(path, path).ok
