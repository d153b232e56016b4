"""Saving and loading a `Sequential` model as an ``.npz`` checkpoint (never pickle).

Format (version 1)::

    __meta__          0-d unicode array, JSON:
                      {"format": "bnfold.checkpoint", "version": 1, "layers": [<layer>, ...]}
    <i>.weight        Dense i: (in_features, out_features)
    <i>.bias          Dense i with use_bias: (out_features,)
    <i>.gamma, <i>.beta, <i>.moving_mean, <i>.moving_var
                      BatchNorm i: (num_features,) each

where each ``<layer>`` is one of::

    {"type": "Dense", "in_features": 64, "out_features": 128, "use_bias": false}
    {"type": "BatchNorm", "num_features": 128, "convention": "keras", "axis": -1,
     "momentum": 0.99, "eps": 0.001, "center": true, "scale": true, "debias": false}
    {"type": "ReLU"}
    {"type": "LeakyReLU", "alpha": 0.01}

Everything needed for inference is stored. Optimizer state and any training-only counters of a
BN (cumulative or debiased averages) are not: a loaded model predicts exactly as the saved one,
but continued training restarts those averages.

Loading goes through `bnfold.io.load_npz` (``allow_pickle=False``) and checks everything it
reads: a bad checkpoint raises `BnfoldError` naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io import atomic_path, load_npz
from bnfold.nn.layers import Dense, LeakyReLU, ReLU
from bnfold.nn.model import Sequential

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT", "VERSION"]

log = logging.getLogger(__name__)

FORMAT = "bnfold.checkpoint"
VERSION = 1
META_KEY = "__meta__"
_BN_ARRAYS = ("gamma", "beta", "moving_mean", "moving_var")


def _layer_meta(layer: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from bnfold.nn.batchnorm import BatchNorm

    if isinstance(layer, Dense):
        meta = {"type": "Dense", "in_features": layer.in_features, "out_features": layer.out_features, "use_bias": layer.bias is not None}
        arrays = {"weight": layer.weight}
        if layer.bias is not None:
            arrays["bias"] = layer.bias
        return meta, arrays
    if isinstance(layer, BatchNorm):
        meta = {
            "type": "BatchNorm",
            "num_features": int(layer.num_features),
            "convention": layer.convention,
            "axis": int(layer.axis),
            "momentum": None if layer.momentum is None else float(layer.momentum),
            "eps": float(layer.eps),
            "center": bool(layer.center),
            "scale": bool(layer.scale),
            "debias": bool(getattr(layer, "debias", False)),
        }
        return meta, {name: np.asarray(getattr(layer, name)) for name in _BN_ARRAYS}
    if isinstance(layer, LeakyReLU):
        return {"type": "LeakyReLU", "alpha": layer.alpha}, {}
    if isinstance(layer, ReLU):
        return {"type": "ReLU"}, {}
    raise BnfoldError(f"cannot save layer of type {type(layer).__name__}: checkpoints hold Dense, BatchNorm, ReLU, LeakyReLU")


def save_checkpoint(model: Sequential, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (``.npz``) atomically; return the path.

    Callers decide on overwriting first (`bnfold.io.check_output_path`).
    """
    path = Path(path)
    layers_meta = []
    arrays: dict[str, np.ndarray] = {}
    for index, layer in enumerate(model.layers):
        meta, layer_arrays = _layer_meta(layer)
        layers_meta.append(meta)
        arrays.update({f"{index}.{name}": np.ascontiguousarray(value) for name, value in layer_arrays.items()})
    meta_json = json.dumps({"format": FORMAT, "version": VERSION, "layers": layers_meta})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file object keeps numpy from appending ".npz"
            np.savez(handle, **{META_KEY: np.array(meta_json)}, **arrays)
    log.info("saved checkpoint %s (%d layers)", path, len(model.layers))
    return path


class _Reader:
    """Checked access to the arrays of one checkpoint; errors name the file and the key."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.arrays = arrays
        self.used = {META_KEY}

    def fail(self, message: str) -> BnfoldError:
        return BnfoldError(f"{self.path}: {message}")

    def array(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.arrays:
            raise self.fail(f"missing array '{key}'")
        value = self.arrays[key]
        self.used.add(key)
        if value.dtype.kind != "f":
            raise self.fail(f"array '{key}' has dtype {value.dtype}, expected floating point")
        if value.shape != shape:
            raise self.fail(f"array '{key}' has shape {value.shape}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise self.fail(f"array '{key}' contains NaN or infinite values")
        return value.copy()

    def meta(self) -> list[dict[str, Any]]:
        if META_KEY not in self.arrays:
            raise self.fail(f"missing key '{META_KEY}' (not a bnfold checkpoint)")
        raw = self.arrays[META_KEY]
        if raw.shape != () or raw.dtype.kind != "U":
            raise self.fail(f"key '{META_KEY}' must be a 0-d unicode array, got dtype {raw.dtype} shape {raw.shape}")
        try:
            meta = json.loads(str(raw))
        except json.JSONDecodeError as exc:
            raise self.fail(f"key '{META_KEY}' is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self.fail(f"key '{META_KEY}': format is not '{FORMAT}'")
        if meta.get("version") != VERSION:
            raise self.fail(f"key '{META_KEY}': unsupported version {meta.get('version')!r} (this bnfold reads version {VERSION})")
        layers = meta.get("layers")
        if not isinstance(layers, list) or not all(isinstance(entry, dict) for entry in layers):
            raise self.fail(f"key '{META_KEY}': 'layers' must be a list of objects")
        return layers


def _field(reader: _Reader, index: int, entry: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    if name not in entry:
        raise reader.fail(f"key '{META_KEY}': layer {index} ({entry.get('type')}) is missing '{name}'")
    value = entry[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise reader.fail(f"key '{META_KEY}': layer {index} field '{name}' has invalid value {value!r}")
    return value


def _positive(reader: _Reader, index: int, entry: dict[str, Any], name: str) -> int:
    value = _field(reader, index, entry, name, (int,))
    if value < 1:
        raise reader.fail(f"key '{META_KEY}': layer {index} field '{name}' must be >= 1, got {value}")
    return value


def _build_dense(reader: _Reader, index: int, entry: dict[str, Any]) -> Dense:
    n_in = _positive(reader, index, entry, "in_features")
    n_out = _positive(reader, index, entry, "out_features")
    use_bias = _field(reader, index, entry, "use_bias", (bool,))
    weight = reader.array(f"{index}.weight", (n_in, n_out))
    layer = Dense(n_in, n_out, use_bias=use_bias, rng=np.random.default_rng(0), dtype=weight.dtype)
    layer.weight = weight
    layer.dweight = np.zeros_like(weight)
    if use_bias:
        layer.bias = reader.array(f"{index}.bias", (n_out,)).astype(weight.dtype, copy=False)
        layer.dbias = np.zeros_like(layer.bias)
    return layer


def _build_batchnorm(reader: _Reader, index: int, entry: dict[str, Any]) -> Any:
    from bnfold.nn.batchnorm import BatchNorm

    channels = _positive(reader, index, entry, "num_features")
    kwargs = {
        "convention": _field(reader, index, entry, "convention", (str,)),
        "axis": _field(reader, index, entry, "axis", (int,)),
        "momentum": _field(reader, index, entry, "momentum", (int, float, type(None))),
        "eps": _field(reader, index, entry, "eps", (int, float)),
        "center": _field(reader, index, entry, "center", (bool,)),
        "scale": _field(reader, index, entry, "scale", (bool,)),
        "debias": _field(reader, index, entry, "debias", (bool,)),
    }
    try:
        layer = BatchNorm(channels, **kwargs)
    except (TypeError, ValueError) as exc:
        raise reader.fail(f"key '{META_KEY}': layer {index} (BatchNorm) is invalid: {exc}") from None
    for name in _BN_ARRAYS:
        key = f"{index}.{name}"
        value = reader.array(key, (channels,))
        if name == "moving_var" and np.any(value < 0):
            raise reader.fail(f"array '{key}' has negative entries (min {float(value.min())})")
        try:
            setattr(layer, name, value)
        except BnfoldError as exc:
            raise reader.fail(f"array '{key}': {exc}") from None
    return layer


def _build_layer(reader: _Reader, index: int, entry: dict[str, Any]) -> Any:
    kind = entry.get("type")
    if kind == "Dense":
        return _build_dense(reader, index, entry)
    if kind == "BatchNorm":
        return _build_batchnorm(reader, index, entry)
    if kind == "ReLU":
        return ReLU()
    if kind == "LeakyReLU":
        alpha = _field(reader, index, entry, "alpha", (int, float))
        try:
            return LeakyReLU(alpha)
        except ValueError as exc:
            raise reader.fail(f"key '{META_KEY}': layer {index}: {exc}") from None
    raise reader.fail(f"key '{META_KEY}': layer {index} has unknown type {kind!r} (expected Dense, BatchNorm, ReLU, LeakyReLU)")


def _check_widths(reader: _Reader, layers: list[Any]) -> None:
    width = None
    for index, layer in enumerate(layers):
        expected = getattr(layer, "in_features", None) or getattr(layer, "num_features", None)
        if expected is not None and width is not None and expected != width:
            raise reader.fail(f"key '{META_KEY}': layer {index} ({type(layer).__name__}) expects {expected} features, the layer before produces {width}")
        width = getattr(layer, "out_features", None) or getattr(layer, "num_features", None) or width


def load_checkpoint(path: str | os.PathLike) -> Sequential:
    """Load a checkpoint written by `save_checkpoint`.

    Raises
    ------
    BnfoldError
        Not a readable ``.npz``, pickled content, missing or malformed ``__meta__``, unknown layer
        type, missing array, wrong shape or dtype, non-finite values, negative moving variance,
        mismatched layer widths, or arrays no layer uses. The message names file and key.
    """
    path = Path(path)
    reader = _Reader(path, load_npz(path))
    layers = [_build_layer(reader, index, entry) for index, entry in enumerate(reader.meta())]
    unused = sorted(set(reader.arrays) - reader.used)
    if unused:
        raise reader.fail(f"unexpected array '{unused[0]}' (no layer of that index and kind uses it)")
    _check_widths(reader, layers)
    log.info("loaded checkpoint %s (%d layers)", path, len(layers))
    return Sequential(layers)
