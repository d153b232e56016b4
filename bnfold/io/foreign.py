"""Files from other frameworks passed where an ONNX model is expected: say which converter to use.

Recognised by name and layout only, and consulted only after the file failed to load as ONNX, so
an ONNX model with an unusual name still loads. Each hint is one line naming the converter.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["foreign_format_hint"]

_KERAS_EXPORT = ("export it with Keras 3: keras.models.load_model(path).export('model.onnx', format='onnx'),"
                 " or through tf2onnx (see the README's TensorFlow/Keras section)")
_TF2ONNX_SAVED = "python -m tf2onnx.convert --saved-model {path} --output model.onnx"
_TORCH_EXPORT = ("load the model in PyTorch and export it: torch.onnx.export(model, (example_input,), 'model.onnx')"
                 " (see the README's PyTorch section)")


def foreign_format_hint(path: Path) -> str | None:
    """A one-line error for a file or folder that is a model of another framework, else None."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return f"{path}: a TensorFlow SavedModel folder, not an ONNX file: convert it first with " + \
                _TF2ONNX_SAVED.format(path=path)
        return None
    if suffix == ".keras":
        return f"{path}: a Keras model file, not an ONNX file: {_KERAS_EXPORT}"
    if suffix in (".h5", ".hdf5"):
        return f"{path}: a Keras/HDF5 model file, not an ONNX file: {_KERAS_EXPORT}"
    if suffix in (".pb", ".pbtxt"):
        if path.name.startswith("saved_model."):
            return (f"{path}: part of a TensorFlow SavedModel, not an ONNX file: convert the folder with "
                    + _TF2ONNX_SAVED.format(path=path.parent))
        return (f"{path}: a TensorFlow graph (frozen GraphDef), not an ONNX file: convert it first with"
                f" python -m tf2onnx.convert --graphdef {path} --inputs NAME:0 --outputs NAME:0 --output model.onnx")
    if suffix == ".tflite":
        return (f"{path}: a TensorFlow Lite model, not an ONNX file: convert it first with"
                f" python -m tf2onnx.convert --tflite {path} --output model.onnx")
    if suffix in (".pt", ".pth", ".pt2", ".ckpt", ".bin", ".safetensors"):
        return f"{path}: a PyTorch file, not an ONNX file: {_TORCH_EXPORT}"
    if suffix == ".npz":
        return (f"{path}: not an ONNX file; a checkpoint of `bnfold train` becomes one with:"
                f" bnfold export {path} -o model.onnx")
    return None
