"""Layer-by-layer verification speed against a bare onnxruntime run of both models, same process.

Usage::

    python benchmarks/bench_verify.py [--samples 256] [--size 224] [--repeat 3] [--threads 1]

The model: a MobileNetV2 (the torchvision layout: inverted residual blocks t, c, n, s = (1, 16, 1,
1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1), a
1280-channel head, 1000 classes; 52 BatchNorm2d), built with PyTorch from random weights and
random BN statistics, exported with ``torch.onnx.export(dynamo=False, do_constant_folding=False)``
(every BN stays), and folded with `bnfold.folding.fold`. Inputs: ``--samples`` random images
(seeded ``numpy.random.Generator``), passed as arrays.

Measured (best of ``--repeat``, wall clock, alternating; the process's CPU time is printed too,
since the comparison runs on a second thread, overlapping onnxruntime's next run):

- ``bnfold verify``: `bnfold.verification.verify(reference, folded, {"input": x})`, layer by
  layer: sessions, the determinism check (first samples run twice per model), every batch, the
  comparison of every shared tensor, the report.
- ``bare onnxruntime``: onnxruntime sessions (graph optimizations disabled, sequential, same
  threads) of both models exposing the same tensors, run on the same batches of samples,
  requesting the same tensors in the same groups; nothing compared. Session creation included.

The ratio ``bnfold / bare`` in samples per second is the share of onnxruntime's own speed that
layer-by-layer verification keeps (goal: at least 0.8).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx

def build_mobilenet_v2(size: int, seed: int) -> onnx.ModelProto:
    """The MobileNetV2 described in the module docstring, exported to ONNX (batch symbolic)."""
    import io

    import torch
    from mobilenet import mobilenet_v2

    net = mobilenet_v2(seed, mean_spread=0.5, affine=True)
    buffer = io.BytesIO()
    torch.onnx.export(net.eval(), torch.randn(1, 3, size, size), buffer, dynamo=False, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def bare_run(reference: onnx.ModelProto, candidate: onnx.ModelProto, x: np.ndarray, groups: list[list[str]],
             batch_rows: int, threads: int) -> None:
    """Both models in plain onnxruntime, exposing the tensors of ``groups``, batch by batch."""
    import onnxruntime as ort

    from bnfold.runtime import expose

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    names = [name for group in groups for name in group]
    sessions = [ort.InferenceSession(expose(model, names).SerializeToString(), options,
                                     providers=["CPUExecutionProvider"]) for model in (reference, candidate)]
    for start in range(0, len(x), batch_rows):
        feeds = {"input": x[start:start + batch_rows]}
        for group in groups:
            for sess in sessions:
                sess.run(group, feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from bnfold.folding import fold
    from bnfold.layerwise import plan_runs
    from bnfold.verification import verify

    reference = build_mobilenet_v2(args.size, seed=0)
    folded, fold_report = fold(reference)
    x = np.random.default_rng(0).standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32)
    print(f"MobileNetV2 at {args.size}x{args.size}: {len(reference.graph.node)} nodes, BN folded"
          f" {fold_report.folded} of {fold_report.total}; {args.samples} samples, {args.threads} thread(s)")

    report = verify(reference, folded, {"input": x}, threads=args.threads)
    assert report.ok, report.summary()
    names = [item.name for item in report.layers]
    # The same groups verify used: recomputed from the per-sample sizes of the tensors.
    per_row = {item.name: float(np.prod(item.shape[1:])) * np.dtype(item.dtype).itemsize for item in report.layers}
    held = x.nbytes
    from bnfold.verification import DEFAULT_MAX_BYTES

    plan = plan_runs(names, per_row, rows=args.samples, splittable=True, budget=DEFAULT_MAX_BYTES - held,
                     describe=str)
    print(f"verify: {report.counts_line()}")
    if (plan.chunk_rows, len(plan.groups)) != (report.batch_rows, report.groups):
        print(f"note: bare run plan {plan.chunk_rows} rows x {len(plan.groups)} groups differs from verify's"
              f" {report.batch_rows} x {report.groups}")

    runs = {
        "bare onnxruntime": lambda: bare_run(reference, folded, x, plan.groups, report.batch_rows, args.threads),
        "bnfold verify": lambda: verify(reference, folded, {"input": x}, threads=args.threads),
    }
    best = {label: (float("inf"), float("inf")) for label in runs}
    for _ in range(args.repeat):
        for label, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[label] = (min(best[label][0], wall), min(best[label][1], cpu))
    for label, (wall, cpu) in best.items():
        print(f"{label:>18}: {wall:7.2f} s  {args.samples / wall:7.1f} samples/s  (CPU time of the process {cpu:.2f} s)")
    ratio = best["bare onnxruntime"][0] / best["bnfold verify"][0]
    print(f"bnfold verify keeps {ratio:.2f}x of bare onnxruntime's samples per second (goal >= 0.8)")


if __name__ == "__main__":
    main()
