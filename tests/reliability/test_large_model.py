"""A model over protobuf's 2 GiB limit, with external data: load, fold, verify, write, reload.

Slow (about a minute, 3 GiB of memory at the peak, mostly onnxruntime): run with ``pytest -m slow``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.slow

# Three Gemm -> BN layers of 14,000 x 14,000 float32 weights: 784 MB each, 2.35 GB in all.
_WIDTH = 14_000
_LAYERS = 3


def _build(folder):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(_LAYERS):
        weight = rng.standard_normal((_WIDTH, _WIDTH), dtype=np.float32)
        weight *= np.float32(1 / np.sqrt(_WIDTH))
        inits.append(numpy_helper.from_array(weight, f"fc{i}.weight"))
        del weight
        for role, value in (("scale", rng.uniform(0.5, 1.5, _WIDTH)), ("bias", rng.standard_normal(_WIDTH)),
                            ("mean", rng.standard_normal(_WIDTH) * 0.1), ("var", rng.uniform(0.5, 2.0, _WIDTH))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{i}.{role}"))
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight"], [f"g{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"g{i}", *(f"bn{i}.{r}" for r in
                                      ("scale", "bias", "mean", "var"))], [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", _WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", _WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "large.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="large.onnx.data", size_threshold=1024)
    return path


def test_convert_model_over_2gb_with_external_data(tmp_path):
    src = _build(tmp_path)
    data_size = (tmp_path / "large.onnx.data").stat().st_size
    assert data_size > 2**31  # really over protobuf's limit
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "bnfold", "convert", str(src), "-o", str(out), "--json", str(report)],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    assert "BN folded 3 of 3" in result.stdout, result.stdout
    assert "equivalent" in result.stdout, result.stdout
    sidecars = list(out.parent.glob("folded.onnx.*.data"))
    assert len(sidecars) == 1 and sidecars[0].stat().st_size > 2**31
    # The written model loads (external data resolved beside it) and has no BN left.
    folded = onnx.load_model(str(out), load_external_data=False)
    assert not any(node.op_type == "BatchNormalization" for node in folded.graph.node)
    assert all(t.data_location == TensorProto.EXTERNAL for t in folded.graph.initializer if t.name.startswith("fc"))
    onnx.checker.check_model(str(out))
    # The input is untouched: still its two files, the data file the same size.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["large.onnx", "large.onnx.data", "report.json"]
    assert (tmp_path / "large.onnx.data").stat().st_size == data_size
