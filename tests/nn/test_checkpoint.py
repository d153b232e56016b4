"""Checkpoints: round trip, the documented format, and one clear error per kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bnfold.errors import BnfoldError
from bnfold.nn.batchnorm import BatchNorm
from bnfold.nn.checkpoint import load_checkpoint, save_checkpoint
from bnfold.nn.layers import Dense, LeakyReLU, ReLU
from bnfold.nn.model import Sequential, build_mlp
from bnfold.nn.optim import SGD
from bnfold.nn.training import train_epoch


def trained_model(**kwargs) -> Sequential:
    rng = np.random.default_rng(0)
    model = build_mlp((16, 8), rng=rng, **kwargs)
    x = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, size=40)
    train_epoch(model, x, y, optimizer=SGD(model, lr=0.1, momentum=0.9), batch_size=10, rng=rng)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"convention": "torch", "momentum": None, "activation": "leaky_relu"}, {"convention": "keras", "momentum": 0.5}],
    ids=["keras-default", "torch-cumulative-leaky", "keras-0.5"],
)
def test_round_trip_gives_identical_inference(tmp_path, kwargs):
    model = trained_model(**kwargs)
    bn = model.layers[1]
    assert not np.allclose(bn.moving_mean, 0)  # training moved the statistics: the test is not trivial
    path = save_checkpoint(model, tmp_path / "model.npz")
    loaded = load_checkpoint(path)
    x = np.random.default_rng(1).random((7, 64), dtype=np.float32)
    np.testing.assert_array_equal(loaded.forward(x, training=False), model.forward(x, training=False))
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for ours, theirs in zip(model.layers, loaded.layers):
        if isinstance(ours, BatchNorm):
            for name in ("convention", "axis", "momentum", "eps", "center", "scale", "debias"):
                assert getattr(theirs, name) == getattr(ours, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]  # no temporary file left


def test_format_is_the_documented_one(tmp_path):
    model = Sequential([Dense(3, 2, use_bias=False, rng=np.random.default_rng(0)), BatchNorm(2), LeakyReLU(0.2), Dense(2, 4, rng=np.random.default_rng(1)), ReLU()])
    save_checkpoint(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        keys = set(archive.files)
        meta = json.loads(str(archive["__meta__"]))
        assert archive["__meta__"].shape == () and archive["__meta__"].dtype.kind == "U"
    assert keys == {"__meta__", "0.weight", "1.gamma", "1.beta", "1.moving_mean", "1.moving_var", "3.weight", "3.bias"}
    assert meta == {
        "format": "bnfold.checkpoint",
        "version": 1,
        "layers": [
            {"type": "Dense", "in_features": 3, "out_features": 2, "use_bias": False},
            {"type": "BatchNorm", "num_features": 2, "convention": "keras", "axis": -1, "momentum": 0.99, "eps": 0.001, "center": True, "scale": True, "debias": False},
            {"type": "LeakyReLU", "alpha": 0.2},
            {"type": "Dense", "in_features": 2, "out_features": 4, "use_bias": True},
            {"type": "ReLU"},
        ],
    }


def rewrite(src: Path, dst: Path, *, meta=None, drop=(), **replace) -> Path:
    """Copy checkpoint `src` to `dst` with changed meta / arrays (keys with '.' passed via dict)."""
    with np.load(src, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    if meta is not None:
        arrays["__meta__"] = np.array(json.dumps(meta)) if not isinstance(meta, np.ndarray) else meta
    for key in drop:
        del arrays[key]
    arrays.update({key.replace("__", "."): value for key, value in replace.items()})
    np.savez(dst, **arrays)
    return dst


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_checkpoint(trained_model(), tmp_path / "good.npz")


def meta_of(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return json.loads(str(archive["__meta__"]))


def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(BnfoldError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_array(saved, tmp_path):
    expect_error(rewrite(saved, tmp_path / "bad.npz", drop=["0.weight"]), "missing array '0.weight'")


def test_wrong_shape(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "bad.npz", **{"1__moving_var": np.ones(5)})
    expect_error(bad, "'1.moving_var'", "shape (5,)", "expected (16,)")


def test_unknown_layer_type(saved, tmp_path):
    meta = meta_of(saved)
    meta["layers"][2] = {"type": "Conv"}
    expect_error(rewrite(saved, tmp_path / "bad.npz", meta=meta), "'__meta__'", "layer 2", "'Conv'")


def test_missing_meta_field(saved, tmp_path):
    meta = meta_of(saved)
    del meta["layers"][1]["eps"]
    expect_error(rewrite(saved, tmp_path / "bad.npz", meta=meta), "layer 1", "'eps'")


def test_missing_meta_and_bad_json_and_version(saved, tmp_path):
    expect_error(rewrite(saved, tmp_path / "a.npz", drop=["__meta__"]), "missing key '__meta__'")
    expect_error(rewrite(saved, tmp_path / "b.npz", meta=np.array("{not json")), "'__meta__'", "JSON")
    meta = meta_of(saved)
    meta["version"] = 2
    expect_error(rewrite(saved, tmp_path / "c.npz", meta=meta), "version 2")


def test_negative_variance_and_non_finite(saved, tmp_path):
    var = -np.ones(16)
    expect_error(rewrite(saved, tmp_path / "a.npz", **{"1__moving_var": var}), "'1.moving_var'", "negative")
    weight = np.full((64, 16), np.nan, dtype=np.float32)
    expect_error(rewrite(saved, tmp_path / "b.npz", **{"0__weight": weight}), "'0.weight'", "NaN")
    expect_error(rewrite(saved, tmp_path / "c.npz", **{"0__weight": np.ones((64, 16), dtype=np.int32)}), "'0.weight'", "dtype int32")


def test_inconsistent_widths_and_unexpected_keys(saved, tmp_path):
    meta = meta_of(saved)
    meta["layers"][3]["in_features"] = 15
    bad = rewrite(saved, tmp_path / "a.npz", meta=meta, **{"3__weight": np.ones((15, 8), dtype=np.float32)})
    expect_error(bad, "layer 3", "expects 15 features")
    expect_error(rewrite(saved, tmp_path / "b.npz", **{"9__weight": np.ones(2)}), "unexpected array '9.weight'")


def test_pickled_content_is_refused_not_loaded(saved, tmp_path):
    with np.load(saved, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["0.weight"] = np.array([{"evil": 1}], dtype=object)
    bad = tmp_path / "pickled.npz"
    np.savez(bad, **arrays)
    expect_error(bad, "pickle")


def test_not_an_npz(tmp_path):
    bad = tmp_path / "text.npz"
    bad.write_text("hello")
    expect_error(bad)
    expect_error(tmp_path / "absent.npz", "no such file")
