"""Spike: the Conv / MatMul -> BatchNormalization fold written on onnx-ir, measured against bnfold.

Usage::

    python benchmarks/spike_onnx_ir.py IN OUT          # fold one model with the spike
    python benchmarks/spike_onnx_ir.py --bench [--repeat 3] [--tmp DIR]

``--bench`` runs, as child processes alternated (best of ``--repeat``, peak RSS as ``bench_graph.run_child``),
the spike and ``bnfold convert --no-verify`` on the 800-block Conv+BN model and on the 1 GiB
external-data MatMul+BN model of ``bench_graph.py``, checks that both give bit-identical folded
weights, and prints the lines of code of each fold path.

The spike is what onnx-ir gives for the job: ``onnx_ir.load`` (external tensors memory-mapped),
use lists (``Value.consumers()``), ``LazyTensor`` so that a folded weight is computed only while
``onnx_ir.save`` writes it. It covers only the rule bnfold's producer fold starts with (a BN in
inference mode after a Conv or a 2-D MatMul whose weight is an initializer read by nothing
else); no validation, no report, no verification.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

_CHUNK_BYTES = 64 * 1024**2


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _scaled(weight: ir.TensorProtocol, scale: np.ndarray, axis: int) -> ir.LazyTensor:
    """``weight * scale`` along ``axis`` in float64, cast back, computed in chunks at save time."""
    dtype = weight.dtype.numpy()

    def compute() -> np.ndarray:
        w = weight.numpy()
        out = np.empty(w.shape, dtype=dtype)
        rows = max(1, _CHUNK_BYTES // max(1, w.nbytes // max(1, w.shape[axis]) * 2))
        for start in range(0, w.shape[axis], rows):
            part = [slice(None)] * w.ndim
            part[axis] = slice(start, start + rows)
            shape = [1] * w.ndim
            shape[axis] = -1
            out[tuple(part)] = np.multiply(w[tuple(part)], scale[start:start + rows].reshape(shape),
                                           dtype=np.float64)
        return out

    return ir.LazyTensor(compute, dtype=weight.dtype, shape=weight.shape)


def fold_model(model: ir.Model) -> int:
    """Fold every Conv / MatMul -> BN pair that qualifies; return how many were folded."""
    graph = model.graph
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.outputs) != 1:
            continue
        linear = bn.inputs[0].producer()
        if linear is None or linear.op_type not in ("Conv", "MatMul") or len(bn.inputs[0].consumers()) != 1:
            continue
        weight_value = linear.inputs[1]
        params = [value.const_value for value in bn.inputs[1:5]]
        if weight_value.const_value is None or any(p is None for p in params) or len(weight_value.consumers()) != 1:
            continue
        if linear.op_type == "MatMul" and len(weight_value.shape) != 2:
            continue
        gamma, beta, mean, var = (p.numpy().astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        bias = None
        if linear.op_type == "Conv" and len(linear.inputs) > 2 and linear.inputs[2] is not None:
            bias = linear.inputs[2].const_value.numpy().astype(np.float64)
        shift = beta - mean * scale if bias is None else beta + (bias - mean) * scale
        axis = 0 if linear.op_type == "Conv" else 1
        weight = weight_value.const_value
        dtype = weight.dtype.numpy()
        new_w = ir.Value(name=f"{weight_value.name}_folded", const_value=_scaled(weight, scale, axis),
                         shape=weight_value.shape, type=weight_value.type)
        new_b = ir.Value(name=f"{bn.name or bn.outputs[0].name}_bias_folded",
                         const_value=ir.tensor(shift.astype(dtype)), shape=ir.Shape([len(shift)]),
                         type=ir.TensorType(weight.dtype))
        graph.register_initializer(new_w)
        graph.register_initializer(new_b)
        if linear.op_type == "Conv":
            new = ir.Node("", "Conv", [linear.inputs[0], new_w, new_b], attributes=list(linear.attributes.values()),
                          name=linear.name)
        else:
            new = ir.Node("", "Gemm", [linear.inputs[0], new_w, new_b], name=linear.name)
        graph.insert_before(linear, new)
        name = bn.outputs[0].name
        bn.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        new.outputs[0].name = name
        graph.remove([bn, linear], safe=True)
        folded += 1
    unused = [name for name, value in graph.initializers.items() if not value.uses() and not value.is_graph_output()]
    for name in unused:
        del graph.initializers[name]
    return folded


def main_fold(src: str, out: str) -> int:
    model = ir.load(src)
    external = any(isinstance(value.const_value, ir.ExternalTensor) for value in model.graph.initializers.values())
    fold_model(model)
    if external:
        ir.save(model, out, external_data=Path(out).name + ".data", size_threshold_bytes=1024)
    else:
        ir.save(model, out)
    return 0


# ---- measurements ----------------------------------------------------------------------------
def _loc(*functions) -> int:
    import inspect

    lines = 0
    for function in functions:
        lines += sum(1 for line in inspect.getsource(function).splitlines()
                     if line.strip() and not line.strip().startswith("#"))
    return lines


def bench(repeat: int, tmp_root: str | None) -> int:
    import tempfile

    import bench_graph as bg
    import onnx
    from bench_convert import build_model

    print("\n".join(bg.machine_lines()))
    here = Path(__file__).resolve()
    spike = lambda src, out: [sys.executable, str(here), str(src), str(out)]
    with tempfile.TemporaryDirectory(prefix="bnfold-spike-", dir=tmp_root) as name:
        tmp = Path(name)
        src = tmp / "deep800.onnx"
        onnx.save(build_model(800, 64, np.random.default_rng(0)), str(src))
        cases = [("800 Conv+BN blocks", src)]
        for label, model in cases:
            outs = {"spike": model.with_name("spike.onnx"), "bnfold": model.with_name("bnfold.onnx")}
            best = bg.alternate(repeat, {"spike (onnx-ir)": (spike(model, outs["spike"]), [outs["spike"]]),
                                         "bnfold": (bg.convert(model, outs["bnfold"], "--no-verify"), [outs["bnfold"]])})
            _report(label, best, bg.disk_size(model), outs)
            bg.remove_outputs([*outs.values(), model])
        folder = tmp / "gib"
        folder.mkdir()
        model = bg.matmul_bn_model(folder / "gib.onnx", 4, 8192, np.random.default_rng(0))
        outs = {"spike": folder / "spike.onnx", "bnfold": folder / "bnfold.onnx"}
        best = bg.alternate(repeat, {"spike (onnx-ir)": (spike(model, outs["spike"]), [outs["spike"]]),
                                     "bnfold": (bg.convert(model, outs["bnfold"], "--no-verify"), [outs["bnfold"]])})
        _report("1 GiB external data", best, bg.disk_size(model), outs)
    import bnfold.folding.into_producer as producer

    print(f"lines of code of the fold (no blank or comment lines): spike {_loc(_attr, _scaled, fold_model)};"
          f" bnfold's producer fold module {_loc(producer)} (with its checks, Gemm, ConvTranspose, report)")
    return 0


def _report(label: str, best: dict, size: int, outs: dict) -> None:
    (t_s, rss_s), (t_b, rss_b) = best["spike (onnx-ir)"], best["bnfold"]
    print(f"{label}: spike {t_s:.2f} s, peak RSS {rss_s / 1024**2:.0f} MiB ({rss_s / size:.2f} x model);"
          f" bnfold {t_b:.2f} s, {rss_b / 1024**2:.0f} MiB ({rss_b / size:.2f} x);"
          f" spike / bnfold time {t_s / t_b:.2f}x;"
          f" folded weights identical: {_same_weights(outs['spike'], outs['bnfold'])}")


def _same_weights(a: Path, b: Path) -> bool:
    left, right = ir.load(a), ir.load(b)
    weights = lambda m: sorted(
        (v.const_value.numpy().tobytes() for v in m.graph.initializers.values() if v.name.endswith("weight_folded")
         or (v.name.startswith("w") and v.name.endswith("_folded"))), key=len)
    wa, wb = weights(left), weights(right)
    return bool(wa) and len(wa) == len(wb) and sorted(wa) == sorted(wb)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="IN OUT")
    parser.add_argument("--bench", action="store_true", help="measure against bnfold convert --no-verify")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many alternated runs")
    parser.add_argument("--tmp", default=None, help="folder for the temporary models")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.bench:
        raise SystemExit(bench(args.repeat, args.tmp))
    if len(args.paths) != 2:
        parser.error("give IN and OUT, or --bench")
    raise SystemExit(main_fold(*args.paths))
