"""Real models for the interop tests: built, trained a few steps, exported once per session.

PyTorch models are exported with the classic TorchScript exporter (``dynamo=False``, with and
without its own constant folding) and with the ``torch.export`` based exporter
(``dynamo=True``, with and without its built-in ONNX optimizer). Keras 3 models are exported with
``model.export(format="onnx")`` under ``KERAS_BACKEND=torch``.

Every model is trained for a few steps in training mode on random data whose mean and spread are
far from 0 and 1, so that the moving statistics that inference uses are non-trivial, and then
switched to inference mode. Frameworks are imported lazily, inside the fixtures, so that this
file loads without them; the test modules skip themselves with ``pytest.importorskip``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

# Keras picks its backend once, at import: this must be set before anything imports keras.
os.environ["KERAS_BACKEND"] = "torch"

#: Exporter variants: name -> keyword arguments of ``torch.onnx.export``.
TORCH_EXPORTERS: dict[str, dict] = {
    # What users get by default from the classic exporter. In eval mode it already fuses
    # Conv+BN itself (TorchScript eval peephole) but leaves BN after Gemm/MatMul/ConvTranspose.
    "classic": {"dynamo": False},
    # Without constant folding every BN stays, and MatMul weights arrive as Transpose(initializer).
    "classic-nofold": {"dynamo": False, "do_constant_folding": False},
    # The torch.export based exporter without its optimizer: BN parameters and computed zero
    # conv biases (Shape -> Expand -> CastLike -> Expand) as the raw translation writes them.
    "dynamo": {"dynamo": True, "optimize": False},
    # The torch.export based exporter as users call it (its optimizer already folds BN that
    # follows Conv/Gemm, but not BN in front of a linear layer).
    "dynamo-opt": {"dynamo": True},
    # A model exported in training mode (torch.onnx.TrainingMode.TRAINING): BN nodes with
    # training_mode=1 and running mean/variance outputs, which must never be folded.
    "classic-train": {"dynamo": False, "training": "TRAINING"},
}


@dataclasses.dataclass(frozen=True)
class TorchCase:
    """A PyTorch model to export.

    ``kept`` is how many of its BN modules cannot be folded exactly (and which reason, as a
    substring of the report's reason, explains it); every other BN must be folded.
    """

    build: Callable[[], "object"]
    input_shape: tuple[int, ...]
    n_bn: int
    kept: int = 0
    kept_reason: str | None = None


def _torch_cases() -> dict[str, TorchCase]:
    from torch import nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn1(self.conv1(x)).relu()
            return (self.bn2(self.conv2(h)) + x).relu()

    class LinearPermuteBN(nn.Module):
        # Linear on (N, L, C), then BatchNorm1d over the channels: (N, C, L) after a permute.
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x).transpose(1, 2)).relu().mean(-1)

    return {
        "linear-permute-bn": TorchCase(LinearPermuteBN, (3, 5, 8), n_bn=1),
        "mlp": TorchCase(
            lambda: nn.Sequential(
                nn.Linear(8, 6, bias=True), nn.BatchNorm1d(6), nn.ReLU(),
                nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
                nn.Linear(5, 3),
            ),
            (3, 8), n_bn=2,
        ),
        "cnn": TorchCase(
            lambda: nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 6, 3, stride=2, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
            ),
            (3, 3, 8, 8), n_bn=2,
        ),
        "depthwise-grouped": TorchCase(
            lambda: nn.Sequential(
                nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 6, 1, groups=2, bias=True), nn.BatchNorm2d(6),
            ),
            (3, 4, 6, 6), n_bn=2,
        ),
        "convtranspose-groups": TorchCase(
            lambda: nn.Sequential(
                nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
                nn.BatchNorm2d(6), nn.ReLU(),
                nn.ConvTranspose2d(6, 3, 2, groups=3, bias=True), nn.BatchNorm2d(3),
            ),
            (3, 4, 4, 4), n_bn=2,
        ),
        "conv1d": TorchCase(
            lambda: nn.Sequential(
                nn.Conv1d(3, 5, 3, dilation=2, padding=2, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
                nn.Conv1d(5, 4, 2, stride=2), nn.BatchNorm1d(4),
            ),
            (3, 3, 12), n_bn=2,
        ),
        "conv3d": TorchCase(
            lambda: nn.Sequential(
                # Both with a bias: for a bias-free Conv3d, the dynamo=True exporter of
                # torch 2.13 without its optimizer writes a zero bias of shape (C_out, 2),
                # which onnxruntime rejects ("bias must be a 1D tensor"), before any folding.
                nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(4),
                nn.ReLU(), nn.Conv3d(4, 4, 1, groups=2), nn.BatchNorm3d(4),
            ),
            (3, 2, 3, 5, 5), n_bn=2,
        ),
        "residual": TorchCase(Residual, (3, 4, 6, 6), n_bn=2),
        "bn-before-linear": TorchCase(
            lambda: nn.Sequential(
                nn.BatchNorm1d(8), nn.Linear(8, 6, bias=True), nn.ReLU(),
                nn.BatchNorm1d(6), nn.Linear(6, 3, bias=False),
            ),
            (3, 8), n_bn=2,
        ),
        "bn-before-conv": TorchCase(
            lambda: nn.Sequential(
                nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2, bias=True), nn.ReLU(),
                nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1, bias=False),
            ),
            (3, 4, 7, 7), n_bn=2, kept=1, kept_reason="pads are non-zero",
        ),
    }


@dataclasses.dataclass
class Exported:
    """An exported model with the input it was checked on and the framework's own output."""

    model: onnx.ModelProto
    inputs: dict[str, np.ndarray]
    expected: list[np.ndarray]


def _train_torch(module, input_shape: tuple[int, ...], rng: np.random.Generator, steps: int = 6):
    """A few SGD steps in training mode so that running statistics, gamma and beta move."""
    import torch

    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    batch = (16,) + tuple(input_shape[1:])
    for _ in range(steps):
        x = torch.from_numpy((2.0 * rng.standard_normal(batch) + 1.0).astype(np.float32))
        loss = (module(x) - 0.5).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    return module


def _assert_nontrivial_torch(module) -> None:
    """Guard: moving statistics far from their initial (0, 1), else the tests prove little."""
    from torch import nn

    for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        mean = bn.running_mean.numpy()
        var = bn.running_var.numpy()
        assert np.abs(mean).max() > 0.05 and np.abs(var - 1.0).max() > 0.05, (mean, var)


def _export_torch(module, x: np.ndarray, path: Path, exporter: str) -> onnx.ModelProto:
    import torch

    kwargs = dict(TORCH_EXPORTERS[exporter])
    if "training" in kwargs:
        kwargs["training"] = getattr(torch.onnx.TrainingMode, kwargs["training"])
    # The exporters are chatty (progress lines on stdout, deprecation warnings): keep the test
    # output readable.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(module, (torch.from_numpy(x),), str(path), input_names=["x"],
                              output_names=["y"], verbose=False, **kwargs)
        finally:
            logging.disable(previous)
    return onnx.load(str(path))


@pytest.fixture(scope="session")
def torch_cases() -> dict[str, TorchCase]:
    return _torch_cases()


@pytest.fixture(scope="session")
def torch_export(tmp_path_factory, torch_cases) -> Callable[[str, str], Exported]:
    """``torch_export(case, exporter)``: the exported model, built, trained and exported once."""
    import torch

    modules: dict[str, tuple[object, np.ndarray, np.ndarray]] = {}
    exported: dict[tuple[str, str], Exported] = {}
    folder = tmp_path_factory.mktemp("torch-models")

    def get(name: str, exporter: str) -> Exported:
        if name not in modules:
            case = torch_cases[name]
            rng = np.random.default_rng(sum(map(ord, name)))
            # torch initializes parameters from its global generator: fork it so the seed
            # stays local to this model.
            with torch.random.fork_rng():
                torch.manual_seed(int(rng.integers(2**31)))
                module = _train_torch(case.build(), case.input_shape, rng)
            _assert_nontrivial_torch(module)
            x = (2.0 * rng.standard_normal(case.input_shape) + 1.0).astype(np.float32)
            with torch.no_grad():
                y = module(torch.from_numpy(x)).numpy()
            modules[name] = (module, x, y)
        if (name, exporter) not in exported:
            module, x, y = modules[name]
            if "training" in TORCH_EXPORTERS[exporter]:
                # A training-mode trace runs BN in training mode, which updates the running
                # statistics: export a copy so the cached module and its output stay valid.
                module = copy.deepcopy(module)
            model = _export_torch(module, x, folder / f"{name}.{exporter}.onnx", exporter)
            exported[name, exporter] = Exported(model, {"x": x}, [y])
        return exported[name, exporter]

    return get


# ------------------------------------------------------------------------------------- Keras

@dataclasses.dataclass(frozen=True)
class KerasCase:
    """A Keras model to export; ``n_bn`` BatchNormalization layers, all foldable, and ``n_conv``
    channels-last convolutions."""

    build: Callable[[], "object"]
    input_shape: tuple[int, ...]
    n_bn: int
    n_conv: int = 0


def _keras_cases() -> dict[str, KerasCase]:
    import keras
    from keras import layers

    def init(seed: int):
        return keras.initializers.GlorotUniform(seed=seed)

    def bn():
        # momentum 0.8 instead of Keras' 0.99 so that a few steps move the moving statistics
        # well away from (0, 1).
        return layers.BatchNormalization(momentum=0.8)

    def dense_model():
        inp = keras.Input((8,))
        x = layers.Dense(6, kernel_initializer=init(1))(inp)
        x = layers.ReLU()(bn()(x))
        x = layers.Dense(5, use_bias=False, kernel_initializer=init(2))(x)
        x = layers.ReLU()(bn()(x))
        out = layers.Dense(3, kernel_initializer=init(3))(x)
        return keras.Model(inp, out)

    def conv_model():
        inp = keras.Input((7, 7, 3))
        x = layers.Conv2D(4, 3, use_bias=False, kernel_initializer=init(4))(inp)
        x = layers.ReLU()(bn()(x))
        x = layers.Conv2D(6, 3, padding="same", strides=2, kernel_initializer=init(5))(x)
        x = layers.ReLU()(bn()(x))
        x = layers.GlobalAveragePooling2D()(x)
        out = layers.Dense(2, kernel_initializer=init(6))(x)
        return keras.Model(inp, out)

    def sequence_model():
        # Dense on (N, T, C) is a rank-3 MatMul whose BN (axis -1) is the MatMul's output axis.
        inp = keras.Input((5, 8))
        x = layers.Dense(6, kernel_initializer=init(7))(inp)
        x = layers.ReLU()(bn()(x))
        x = layers.Conv1D(4, 3, use_bias=False, kernel_initializer=init(8))(x)
        x = bn()(x)
        x = layers.Flatten()(x)
        out = layers.Dense(2, kernel_initializer=init(9))(x)
        return keras.Model(inp, out)

    def depthwise_model():
        # DepthwiseConv2D's bias is added through Reshape(b, Concat(1, 1, 1, Gather(Shape(x), 3))):
        # a constant only once the static channel dimension of x is read from its shape.
        inp = keras.Input((7, 7, 3))
        x = layers.DepthwiseConv2D(3, padding="same", depthwise_initializer=init(10))(inp)
        x = layers.ReLU()(bn()(x))
        x = layers.SeparableConv2D(5, 3, depthwise_initializer=init(11), pointwise_initializer=init(12))(x)
        x = layers.ReLU()(bn()(x))
        x = layers.GlobalAveragePooling2D()(x)
        out = layers.Dense(2, kernel_initializer=init(13))(x)
        return keras.Model(inp, out)

    return {
        "keras-dense": KerasCase(dense_model, (8,), n_bn=2),
        "keras-depthwise": KerasCase(depthwise_model, (7, 7, 3), n_bn=2, n_conv=3),  # separable = 2 convs
        "keras-conv": KerasCase(conv_model, (7, 7, 3), n_bn=2, n_conv=2),
        "keras-sequence": KerasCase(sequence_model, (5, 8), n_bn=2, n_conv=1),
    }


def _train_keras(model, input_shape: tuple[int, ...], rng: np.random.Generator, steps: int = 8):
    n_out = model.outputs[0].shape[-1]
    x = (2.0 * rng.standard_normal((16 * steps,) + input_shape) + 1.0).astype(np.float32)
    y = rng.standard_normal((16 * steps, n_out)).astype(np.float32)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model


def _assert_nontrivial_keras(model) -> None:
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            mean = np.asarray(layer.moving_mean)
            var = np.asarray(layer.moving_variance)
            assert np.abs(mean).max() > 0.05 and np.abs(var - 1.0).max() > 0.05, (mean, var)


@pytest.fixture(scope="session")
def keras_cases() -> dict[str, KerasCase]:
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported with backend {keras.backend.backend()!r}, not torch")
    return _keras_cases()


@pytest.fixture(scope="session")
def keras_export(tmp_path_factory, keras_cases) -> Callable[[str], Exported]:
    """``keras_export(case)``: the model exported with ``model.export(format="onnx")``."""
    exported: dict[str, Exported] = {}
    folder = tmp_path_factory.mktemp("keras-models")

    def get(name: str) -> Exported:
        if name not in exported:
            case = keras_cases[name]
            rng = np.random.default_rng(sum(map(ord, name)))
            path = folder / f"{name}.onnx"
            # Keras (torch backend) and the exporter warn about NumPy 2 copy semantics and
            # tracing; none of it concerns these models.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                model = _train_keras(case.build(), case.input_shape, rng)
                _assert_nontrivial_keras(model)
                x = (2.0 * rng.standard_normal((3,) + case.input_shape) + 1.0).astype(np.float32)
                y = np.asarray(model(x, training=False).detach().cpu().numpy())
                model.export(str(path), format="onnx", verbose=False)
            onnx_model = onnx.load(str(path))
            (input_name,) = [i.name for i in onnx_model.graph.input]
            exported[name] = Exported(onnx_model, {input_name: x}, [y])
        return exported[name]

    return get


# ------------------------------------------------------------------------------ onnxruntime

def run_onnxruntime(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` with onnxruntime, graph optimizations disabled (they fuse BN themselves)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.fixture(scope="session")
def ort_run() -> Callable[[onnx.ModelProto, dict[str, np.ndarray]], list[np.ndarray]]:
    return run_onnxruntime
