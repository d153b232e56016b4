"""PyTorch exports with `keep_initializers_as_inputs=True` and `export_modules_as_functions`, through
the CLI and the API: initializer inputs counted when removed, functions inlined on request."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.cli import main

torch = pytest.importorskip("torch")
nn = torch.nn


class ConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _trained(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial moving statistics
            module(torch.randn(shape) * 2 + 1)
    return module.eval()


def _export(module: nn.Module, x, path, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, **kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch_options")
    cnn = _trained(nn.Sequential(ConvBN(3, 4), ConvBN(4, 4)), (8, 3, 6, 6))
    prenorm = _trained(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), (8, 6))
    _export(cnn, torch.randn(1, 3, 6, 6), folder / "functions.onnx", do_constant_folding=False,
            export_modules_as_functions={ConvBN})
    _export(prenorm, torch.randn(2, 6), folder / "inputs.onnx", keep_initializers_as_inputs=True)
    return SimpleNamespace(folder=folder, cnn=cnn)  # cnn: the PyTorch reference of functions.onnx


def _cli(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return out


def test_initializer_inputs_cli_and_api(models, capsys):
    exports = models.folder
    source = exports / "inputs.onnx"
    model = onnx.load(source)
    assert len(model.graph.input) == 7  # x and the six parameters, as PyTorch listed them
    out = _cli(capsys, "convert", source, "-o", exports / "inputs.folded.onnx", "--force")
    assert "BN folded 1 of 1" in out
    assert "note: removed 6 graph inputs backed by initializers whose values were folded" in out
    assert [v.name for v in onnx.load(exports / "inputs.folded.onnx").graph.input] == [model.graph.input[0].name]
    result = bnfold.convert(source, exports / "inputs.kept.onnx", force=True, keep_initializer_inputs=True)
    assert result.report.folded == 0 and "removed" not in " ".join(result.lines())


def test_functions_cli_and_api(models, capsys):
    exports = models.folder
    source = exports / "functions.onnx"
    assert onnx.load(source).functions
    out = _cli(capsys, "convert", source, "-o", exports / "functions.kept.onnx", "--force")
    assert "BN folded 0 of 1" in out and "is a function input" in out and "--inline-functions" in out
    out = _cli(capsys, "convert", source, "-o", exports / "functions.folded.onnx", "--force", "--inline-functions")
    assert "BN folded 2 of 2" in out and "equivalent" in out
    folded = onnx.load(exports / "functions.folded.onnx")
    assert not folded.functions and all(n.op_type != "BatchNormalization" for n in folded.graph.node)
    result = bnfold.convert(source, exports / "functions.api.onnx", force=True, inline_functions=True)
    assert result.report.folded == 2 and result.verification.ok
    # onnxruntime agrees with PyTorch itself on the folded model (float32: 1e-5 is a few roundings
    # over two 3x3 convolutions of 3-4 channels).
    import onnxruntime

    x = np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float32)  # exported with batch 1
    session = onnxruntime.InferenceSession(str(exports / "functions.api.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = models.cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
