"""Layer-by-layer verification: a wrong middle layer the outputs hide, inputs, batches, memory groups.

The proof network is a deep random CNN whose middle block is a residual branch with a tiny BN
gamma (like a zero-initialised residual, early in training): its output barely depends on that
block. Scaling the weights of the Conv that absorbed the middle BN by 1.5 moves the logits by
about 1e-6 of their scale (below float32's rtol 1e-4), but the BN's own tensor by a third of its
scale: outputs-only verification passes the wrong model, layer by layer fails and names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.folding
import bnfold.verification
from bnfold.conversion import convert
from bnfold.errors import BnfoldError, VerificationError
from bnfold.folding import fold
from bnfold.testing import run_cli as bnfold_cli
from bnfold.verification import verify

BLOCKS = 8
MIDDLE = 4
WIDTH = 8


def deep_net(seed: int = 0) -> onnx.ModelProto:
    """x (N, 4, 8, 8) -> 8 x [Conv 3x3 -> BN -> Relu] -> global pool -> Gemm -> logits (N, 10).

    Block ``MIDDLE`` is a residual branch instead: ``h = h + BN(Conv(h))`` with gamma and beta
    around 1e-6, so that the logits are insensitive to it.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h, channels = "x", 4
    for k in range(BLOCKS):
        out = channels if k == MIDDLE else WIDTH
        gain = 1e-6 if k == MIDDLE else 1.0
        w = rng.normal(0, np.sqrt(2 / (9 * channels)), (out, channels, 3, 3))
        params = {
            f"w{k}": w,
            f"gamma{k}": gain * rng.uniform(0.5, 1.5, out),
            f"beta{k}": gain * rng.normal(0, 0.2, out),
            f"mean{k}": rng.normal(0, 0.3, out),
            f"var{k}": rng.uniform(0.5, 2.0, out),
        }
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in params.items()]
        nodes.append(helper.make_node("Conv", [h, f"w{k}"], [f"conv{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"conv{k}", f"gamma{k}", f"beta{k}", f"mean{k}",
                                                             f"var{k}"], [f"bn{k}_out"], name=f"bn{k}"))
        if k == MIDDLE:
            nodes.append(helper.make_node("Add", [h, f"bn{k}_out"], [f"res{k}"], name=f"add{k}"))
            h = f"res{k}"
        else:
            nodes.append(helper.make_node("Relu", [f"bn{k}_out"], [f"relu{k}"], name=f"relu{k}"))
            h, channels = f"relu{k}", out
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (channels, 10)).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc_b"))
    nodes += [
        helper.make_node("GlobalAveragePool", [h], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scale_folded_weight(folded: onnx.ModelProto, report, bn: str, factor: float = 1.5) -> onnx.ModelProto:
    """Scale the weight of the node that absorbed ``bn`` (in place) and return the model."""
    entry = next(e for e in report.entries if e.bn == bn and e.status == "folded")
    node = next(n for n in folded.graph.node if n.name == entry.into)
    init = next(i for i in folded.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return folded


def tampered_pair() -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]:
    model = deep_net()
    folded, report = fold(model)
    assert report.folded == BLOCKS
    wrong, wrong_report = fold(model)
    return model, folded, scale_folded_weight(wrong, wrong_report, f"bn{MIDDLE}")




def test_tampered_middle_fold_fails_layer_by_layer_and_passes_outputs_only() -> None:
    model, folded, wrong = tampered_pair()
    layered = verify(model, wrong, batch=4)
    assert not layered.ok
    first = layered.first_failure
    assert first.name == f"bn{MIDDLE}_out"
    assert first.reference_node == f"BatchNormalization 'bn{MIDDLE}'"
    assert first.candidate_node == f"Conv 'conv{MIDDLE}'"
    # The BN output is W'x + b' with b' around 1e-6: scaling W' by 1.5 changes it by a third of its scale.
    assert 0.05 < first.rel < 0.6
    # Every earlier tensor passed: the failure is located, not smeared.
    names = [item.name for item in layered.layers]
    assert all(item.ok for item in layered.layers[:names.index(first.name)])
    # The gap: the logits move by far less than rtol 1e-4 of their scale, so outputs alone pass.
    outputs_only = verify(model, wrong, batch=4, outputs_only=True)
    assert outputs_only.ok and outputs_only.mode == "outputs"
    assert [item.name for item in outputs_only.layers] == ["logits"]
    assert outputs_only.outputs[0].rel < 1e-5
    # The same network folded correctly passes layer by layer.
    healthy = verify(model, folded, batch=4)
    assert healthy.ok and healthy.first_failure is None
    # Every tensor of the folded model is compared: 8 BN outputs (kept names), Relus, Add, head.
    assert f"bn{MIDDLE}_out" in [item.name for item in healthy.layers]
    assert len(healthy.layers) == len({n for node in folded.graph.node for n in node.output})


def test_cli_names_the_first_failing_tensor_on_the_terminal_and_json_has_every_tensor(tmp_path: Path) -> None:
    model, folded, wrong = tampered_pair()
    ref, bad, good = tmp_path / "ref.onnx", tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(model, ref)
    onnx.save(wrong, bad)
    onnx.save(folded, good)
    report_path = tmp_path / "r.json"
    code, stdout, stderr = bnfold_cli("verify", ref, bad, "--batch", 3, "--json", report_path)
    assert code == 1
    first_line = next(line for line in stdout.splitlines() if line.startswith("first tensor "))
    assert f"'bn{MIDDLE}_out'" in first_line and f"BatchNormalization 'bn{MIDDLE}' in the reference" in first_line
    assert f"Conv 'conv{MIDDLE}' in the candidate" in first_line and "max abs error" in first_line
    assert f"the first is 'bn{MIDDLE}_out'" in stdout.splitlines()[-1]
    assert f"first 'bn{MIDDLE}_out'" in stderr
    report = json.loads(report_path.read_text())
    assert report["mode"] == "layers" and report["first_failing_tensor"] == f"bn{MIDDLE}_out"
    # 8 BN outputs (kept by the folded Convs), 7 Relus, the residual Add, pool, flatten, logits.
    assert report["tensors_compared"] == len(report["tensors"]) == 2 * BLOCKS + 3
    assert {"name", "reference_node", "candidate_node", "max_abs", "rel", "tol", "ok"} <= set(report["tensors"][0])
    assert bnfold_cli("verify", ref, bad, "--batch", 3, "--outputs-only")[0] == 0
    code, stdout, _ = bnfold_cli("verify", ref, good, "--batch", 3)
    assert code == 0 and "layer by layer" in stdout
    compared = next(line for line in stdout.splitlines() if line.startswith("compared "))
    assert compared.startswith(f"compared {report['tensors_compared']} tensors layer by layer (1 output) on 3 samples")


def test_convert_blames_the_fold_of_the_first_failing_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "deep.onnx"
    onnx.save(deep_net(), source)
    real_fold = bnfold.folding.fold

    def wrong_fold(model, **kwargs):
        folded, report = real_fold(model, **kwargs)
        if any(e.bn == f"bn{MIDDLE}" and e.status == "folded" for e in report.entries):
            scale_folded_weight(folded, report, f"bn{MIDDLE}")
        return folded, report

    calls = []
    real_verify = bnfold.verification.verify

    def counting_verify(*args, **kwargs):
        calls.append(kwargs.get("check_determinism", True))
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(bnfold.folding, "fold", wrong_fold)
    monkeypatch.setattr(bnfold.verification, "verify", counting_verify)
    with pytest.raises(VerificationError, match=f"responsible folds: 'bn{MIDDLE}'") as info:
        convert(source, tmp_path / "out.onnx")
    assert info.value.report.first_failure.name == f"bn{MIDDLE}_out"
    # One check, then one re-verification without the fold the first failing tensor names
    # (bisection over 8 folds would need at least 6); only the first checks determinism.
    assert calls == [True, False]
    assert not (tmp_path / "out.onnx").exists()
    # Outputs only, the same wrong fold would have been written: the gap this closes.
    result = convert(source, tmp_path / "out.onnx", outputs_only=True)
    assert result.ok and (tmp_path / "out.onnx").exists()


def _static_batch_model(batch: int | str = 1) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(np.full(3, 2.0, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_option_on_a_static_batch_says_the_static_size_is_used() -> None:
    report = verify(_static_batch_model(), _static_batch_model(), batch=4)
    assert report.ok and report.samples == 1 and report.inputs["x"]["shape"] == [1, 3]
    assert report.notes == ["the batch dimension is static ('x' [1, 3]): the model's batch size 1 is used,"
                            " not --batch 4"]
    assert any(line == f"note: {report.notes[0]}" for line in report.lines())
    # Healthy counterparts: the default batch, and a symbolic batch dimension, say nothing.
    assert verify(_static_batch_model(), _static_batch_model()).notes == []
    symbolic = verify(_static_batch_model("N"), _static_batch_model("N"), batch=4)
    assert symbolic.notes == [] and symbolic.samples == 4


def _parameter_input_model() -> onnx.ModelProto:
    """(x - mean) / sqrt(var): mean and var left as graph inputs, like tf2onnx's Keras normalization."""
    graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "mean"], ["centred"]), helper.make_node("Sqrt", ["var"], ["std"]),
         helper.make_node("Div", ["centred", "std"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("var", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_that_look_like_parameters_are_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "norm.onnx"
    onnx.save(_parameter_input_model(), path)
    code, stdout, stderr = bnfold_cli("verify", path, path, "--batch", 2)
    assert code == 0, stderr
    warnings = [line for line in stdout.splitlines() if line.startswith("warning: ")]
    assert [line.split("'")[1] for line in warnings] == ["mean", "var"]
    assert "looks like a parameter" in warnings[0] and "--inputs" in warnings[0]
    assert "random values (seed 0" in stdout
    # Real values given: no warning, and the report says where the inputs came from.
    data = tmp_path / "in.npz"
    np.savez(data, x=np.ones((2, 3), np.float32), mean=np.zeros(3, np.float32), var=np.ones(3, np.float32))
    code, stdout, _ = bnfold_cli("verify", path, path, "--inputs", data)
    assert code == 0 and "warning" not in stdout and f"inputs: from {data}" in stdout


def test_many_samples_stream_in_batches_with_the_same_result(tmp_path: Path) -> None:
    model, folded, _ = tampered_pair()
    x = np.random.default_rng(5).standard_normal((300, 4, 8, 8)).astype(np.float32)
    report = verify(model, folded, {"x": x})
    assert report.ok and report.samples == 300 and report.batches == 5 and report.batch_rows == 64
    assert report.outputs[0].shape == (300, 10)
    # Independent reference: both models run once on all 300 samples by onnxruntime directly.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]
    b = ort.InferenceSession(folded.SerializeToString(), options).run(None, {"x": x})[0]
    out = report.outputs[0]
    assert out.max_abs == pytest.approx(float(np.max(np.abs(a - b))), rel=1e-6, abs=1e-12)
    assert out.scale == pytest.approx(float(np.max(np.abs(a))), rel=1e-7)
    assert out.size == a.size


def test_memory_limit_splits_tensors_into_groups_and_refuses_what_cannot_fit() -> None:
    model, folded, wrong = tampered_pair()
    free = verify(model, wrong, batch=16)
    # Inputs take 16 KiB; 40 KiB leaves room for a few 8x8x8 tensors (2 KiB per sample) at a time.
    tight = verify(model, wrong, batch=16, max_bytes=56 * 1024)
    assert free.groups == 1 and free.batches == 1
    assert tight.groups > 1 or tight.batches > 1
    assert [(t.name, t.ok) for t in tight.layers] == [(t.name, t.ok) for t in free.layers]
    # Same samples, other batches: onnxruntime computes each sample alike (rel 1e-5 allows for a
    # kernel that sums in another order at another batch size).
    for t, f in zip(tight.layers, free.layers):
        assert t.max_abs == pytest.approx(f.max_abs, rel=1e-5, abs=1e-9) and t.scale == pytest.approx(f.scale, rel=1e-5)
    with pytest.raises(BnfoldError, match="lower --batch or raise --max-memory"):
        verify(model, folded, batch=16, max_bytes=16 * 1024 + 1000)


def _dropout_model(training: bool) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Dropout", ["r", "ratio", "mode"], ["d"], name="dropout"),
         helper.make_node("Identity", ["d"], ["y"], name="out")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
         numpy_helper.from_array(np.array(training), "mode")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_candidate_that_is_not_deterministic_is_refused_and_a_deterministic_one_passes() -> None:
    message = (r"^candidate model is not deterministic: two runs on the same input differ at 'd' \(Dropout or"
               r" random ops in training mode\? export in inference mode\)$")
    with pytest.raises(BnfoldError, match=message):
        verify(_dropout_model(False), _dropout_model(True), batch=4)
    with pytest.raises(BnfoldError, match="^reference model is not deterministic"):
        verify(_dropout_model(True), _dropout_model(False), batch=4, outputs_only=True)
    assert verify(_dropout_model(False), _dropout_model(False), batch=4).ok


@pytest.mark.filterwarnings("ignore")  # the exporter warns about training mode, which is the point
def test_pytorch_training_mode_export_with_dropout_is_refused_by_verify_and_convert(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    with torch.no_grad():  # a non-zero beta, so that the Dropout's input is not all zero
        net[1].bias.uniform_(0.5, 1.0)
    path = tmp_path / "train.onnx"
    torch.onnx.export(net.train(), torch.randn(4, 8), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    dropout = next(node for node in onnx.load(path).graph.node if node.op_type == "Dropout")
    expected = (f"bnfold: error: {path} is not deterministic: two runs on the same input differ at"
                f" '{dropout.output[0]}' (Dropout or random ops in training mode? export in inference mode)")
    for args in (("verify", path, path, "--batch", 4), ("verify", path, path, "--outputs-only"),
                 ("convert", path, "-o", tmp_path / "out.onnx", "--batch", 4)):
        code, stdout, stderr = bnfold_cli(*args)
        assert code == 2, stdout
        # convert prints its statistics warnings (the same findings, from the diagnosis) first.
        *warnings, error = stderr.strip().splitlines()
        assert all(line.startswith("warning: ") for line in warnings) and (args[0] == "convert" or not warnings)
        if "--outputs-only" in args:  # only the outputs are requested: the first is 'y'
            assert error == expected.replace(dropout.output[0], "y")
        else:
            assert error == expected
    assert not (tmp_path / "out.onnx").exists()
    # Healthy counterpart: the same network exported in inference mode verifies.
    healthy = tmp_path / "eval.onnx"
    torch.onnx.export(net.eval(), torch.randn(4, 8), str(healthy), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    assert bnfold_cli("verify", healthy, healthy, "--batch", 4)[0] == 0


def test_large_models_are_exposed_in_place_and_left_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.verification as verification

    model, folded, wrong = tampered_pair()
    before = (model.SerializeToString(), wrong.SerializeToString())
    monkeypatch.setattr(verification, "_COPY_LIMIT", 0)  # every model takes the no-copy path
    report = verify(model, wrong, batch=2)
    assert report.first_failure.name == f"bn{MIDDLE}_out"
    assert (model.SerializeToString(), wrong.SerializeToString()) == before


def test_assert_equivalent_checks_layer_by_layer_unless_told_otherwise() -> None:
    from bnfold.testing import assert_equivalent

    model, folded, wrong = tampered_pair()
    assert assert_equivalent(model, folded, batch=2).mode == "layers"
    with pytest.raises(AssertionError, match=f"first tensor 'bn{MIDDLE}_out'"):
        assert_equivalent(model, wrong, batch=2)
    assert assert_equivalent(model, wrong, batch=2, outputs_only=True).ok


def test_tensors_of_unknown_size_are_measured_before_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.verification as verification
    from bnfold.layerwise import tensor_bytes
    from bnfold.runtime import computed_tensors, expose, session

    # NonZero's output is (2, number of positive elements): about 25 per sample of 50, unknown
    # to onnxruntime in advance (estimated as 2 int64 per sample, 25 times too little).
    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "zero"], ["positive"], name="greater"),
         helper.make_node("NonZero", ["positive"], ["where"], name="nonzero"),
         helper.make_node("Cast", ["where"], ["where_f"], name="cast", to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["where_f"], ["y"], name="sum", keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, uncertain = tensor_bytes(session(expose(model, computed_tensors(model)), "m"), 1)
    assert {"where", "where_f"} <= uncertain and "positive" not in uncertain
    # Inputs take 12,800 B; the rest of 36,000 B holds 64 samples by the estimates (about 300 B
    # per sample with MEMORY_FACTOR) but about 8 by the measured sizes (about 2,600 B).
    measured = verify(model, model, batch=64, max_bytes=36_000)
    assert measured.ok and measured.batches > 4 and "where" in [item.name for item in measured.layers]
    # Without the measurement the plan trusts the estimates: one batch of 64, over the limit.
    monkeypatch.setattr(verification._Model, "measure", lambda self, *args: None)
    assert verify(model, model, batch=64, max_bytes=36_000).batches == 1


def test_large_models_run_one_session_at_a_time_with_the_same_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `ONE_SESSION_BYTES` the reference runs first, its tensors held, its session closed
    before the candidate's opens: the verdicts and errors are those of the side-by-side run."""
    model, folded, wrong = tampered_pair()
    side_by_side = {name: verify(model, other, batch=4) for name, other in (("folded", folded), ("wrong", wrong))}
    opened: list[str] = []
    real_session = bnfold.verification._session

    def recording(m, label, *args, **kwargs):
        opened.append(label)
        return real_session(m, label, *args, **kwargs)

    monkeypatch.setattr(bnfold.verification, "ONE_SESSION_BYTES", 0)
    monkeypatch.setattr(bnfold.verification, "_session", recording)
    for name, other in (("folded", folded), ("wrong", wrong)):
        one_at_a_time = verify(model, other, batch=4)
        expected = side_by_side[name]
        assert one_at_a_time.ok == expected.ok
        assert [(t.name, t.max_abs, t.ok) for t in one_at_a_time.layers] == [
            (t.name, t.max_abs, t.ok) for t in expected.layers]
    assert opened == ["reference model", "candidate model"] * 2
    wrong_report = verify(model, wrong, batch=4)
    assert wrong_report.first_failure.name == f"bn{MIDDLE}_out"


def test_files_with_external_data_verify_layer_by_layer_from_another_folder(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The data stays on disk: onnxruntime resolves it in each file's folder, not in the cwd."""
    model, folded, wrong = tampered_pair()
    paths = {}
    for name, m in (("model", model), ("folded", folded), ("wrong", wrong)):
        folder = tmp_path / name
        folder.mkdir()
        onnx.save_model(m, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                        size_threshold=0)
        paths[name] = folder / "m.onnx"
    monkeypatch.chdir(tmp_path)
    assert verify(paths["model"], paths["folded"], batch=4).ok
    failed = verify(paths["model"], paths["wrong"], batch=4)
    assert not failed.ok and failed.first_failure.name == f"bn{MIDDLE}_out"
