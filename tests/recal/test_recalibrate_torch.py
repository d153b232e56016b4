"""bnfold.recalibrate on PyTorch exports, against PyTorch itself:

- ``exact`` against PyTorch's own exact population statistics in eval mode, collected with forward
  hooks in float64, BN after BN (each measured with the BNs before it already set);
- ``batch`` against ``torch.optim.swa_utils.update_bn`` on the same model, data and batches.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from bnfold.population import batchnorm_nodes
from bnfold.recalibration import recalibrate

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
nn = torch.nn


def _model(fresh: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Linear(5, 4),
    )
    for module in model.modules() if not fresh else ():  # statistics far from the data's
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-2, 2)
            module.running_var.uniform_(0.2, 5)
    return model.eval()


def _export(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    # Without constant folding the exporter keeps BN nodes (with it, it folds Conv+BN itself).
    torch.onnx.export(model, (example,), buffer, dynamo=False, do_constant_folding=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def _bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _by_module(onnx_model: onnx.ModelProto, result) -> dict[str, object]:
    """Recalibration entries keyed by PyTorch module name (the exporter names the mean initializer
    ``<module>.running_mean``)."""
    return {node.input[3].removesuffix(".running_mean"): change
            for node, change in zip(batchnorm_nodes(onnx_model), result.changes)}


def _torch_population_statistics(model: nn.Module, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PyTorch's exact population statistics in eval mode: float64 copy, one forward hook per BN,
    BNs in module order, each set before the next is measured."""
    model = _copy(model).double().eval()
    stats = {}
    inputs = torch.from_numpy(x.astype(np.float64))
    for name, module in _bn_modules(model).items():
        seen = []
        handle = module.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(args[0].detach()))
        with torch.no_grad():
            model(inputs)
        handle.remove()
        values = seen[0]
        axes = [0, *range(2, values.dim())]
        mean = values.mean(dim=axes)
        var = values.var(dim=axes, unbiased=False)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        stats[name] = (mean.numpy(), var.numpy())
    return stats


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _data(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, 3, 9, 9)) * 1.5 + 0.5).astype(np.float32)


@pytest.mark.parametrize("batch_size, fresh", [(7, False), (200, False), (50, True)])
def test_exact_matches_pytorch_population_statistics(batch_size, fresh):
    """``fresh``: never-trained statistics (zeros and ones), which the exporter deduplicates into
    ``Identity`` nodes of one shared tensor: each BN gets its own, the Identity nodes go."""
    model = _model(fresh)
    x = _data(200)
    exported = _export(model, torch.from_numpy(x[:2]))
    assert len(batchnorm_nodes(exported)) == 3
    result = recalibrate(exported, x, batch_size=batch_size)
    reference = _torch_population_statistics(model, x)
    entries = _by_module(exported, result)
    assert set(entries) == set(reference)
    kept = [n.op_type for n in result.model.graph.node]
    assert kept == [n.op_type for n in exported.graph.node if n.op_type != "Identity"]
    for name, (mean, var) in reference.items():
        change = entries[name]
        # The goal against float64: mean within 1e-4 std, variance within 1e-4 relative.
        np.testing.assert_array_less(np.abs(change.mean - mean), 1e-4 * np.sqrt(var))
        np.testing.assert_allclose(change.var, var, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [16, 50])
def test_batch_method_matches_update_bn(batch_size):
    model = _model()
    x = _data(150)  # batches of 16: the last one holds 6 samples, weighted like the others
    exported = _export(model, torch.from_numpy(x[:2]))
    result = recalibrate(exported, x, method="batch", batch_size=batch_size)
    updated = _copy(model)
    loader = torch.utils.data.DataLoader(torch.from_numpy(x), batch_size=batch_size, shuffle=False)
    torch.optim.swa_utils.update_bn(loader, updated)
    entries = _by_module(exported, result)
    for name, module in _bn_modules(updated).items():
        change = entries[name]
        # Both float32 batch statistics, reduced in different orders: ~1e-6 relative apart.
        np.testing.assert_allclose(change.mean, module.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(change.var, module.running_var.numpy(), rtol=1e-4)
    # Healthy counterpart: update_bn differs from the exact statistics by more than that tolerance
    # (batch-dependent averages, unbiased variance), so the comparison above can fail.
    exact = _by_module(exported, recalibrate(exported, x))
    last = list(_bn_modules(updated))[-1]
    assert not np.allclose(exact[last].var, entries[last].var, rtol=1e-3)
