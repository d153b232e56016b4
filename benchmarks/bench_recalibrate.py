"""Time `bnfold.recalibrate` (exact and batch) against one plain onnxruntime inference pass.

The model is ResNet-18 (BasicBlock x [2, 2, 2, 2], 64-512 channels, 20 BatchNormalization nodes,
11.7 M parameters) with random weights, built here with PyTorch and exported with
``do_constant_folding=False`` so that every BN stays a node. The data are 512 random images.
Everything runs in this process, one onnxruntime thread, graph optimizations disabled (as
bnfold's sessions always are), batches of the same size:

- baseline: one inference pass over the 512 samples (session created once, outside the timing);
- ``exact``: `recalibrate(method="exact")`, one pass per BN level through the part of the network
  in front of that level, plus float64 statistics;
- ``batch``: `recalibrate(method="batch")`, one pass with batch statistics.

Each is timed ``--repeats`` times, interleaved, and reported as a multiple of the baseline: the
best of the repeats (other processes on the machine can only add time) and the median. Goals:
batch <= 1.5x, exact <= 0.5 x levels x.

    python benchmarks/bench_recalibrate.py [--size 64] [--batch-size 64] [--repeats 3]

Needs the interop extra (torch) to build the model.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import onnx
import torch
from torch import nn

from bnfold.recalibration import bn_levels, recalibrate
from bnfold.runtime import run, session


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 layout (torchvision itself is not a dependency)."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def build(size: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = resnet18().eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), buffer, dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = build(args.size)
    levels = max(bn_levels(model)) + 1
    bns = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    x = np.random.default_rng(0).standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32)
    sess = session(model, "resnet18")

    def baseline() -> None:
        for lo in range(0, len(x), args.batch_size):
            run(sess, ["logits"], {"x": x[lo:lo + args.batch_size]}, "resnet18")

    steps = {
        "inference": baseline,
        "exact": lambda: recalibrate(model, x, batch_size=args.batch_size),
        "batch": lambda: recalibrate(model, x, method="batch", batch_size=args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    baseline()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"ResNet-18, {bns} BatchNormalization nodes in {levels} levels, {args.samples} samples of 3x{args.size}x{args.size},"
          f" batches of {args.batch_size}, 1 thread, {args.repeats} repeats (best / median)")
    print(f"  inference pass  {best['inference']:7.2f} s / {median['inference']:7.2f} s")
    for name, goal in [("batch", 1.5), ("exact", 0.5 * levels)]:
        ratio = best[name] / best["inference"]
        verdict = "meets" if ratio <= goal else "MISSES"
        print(f"  {name:<14}  {best[name]:7.2f} s / {median[name]:7.2f} s   {ratio:5.2f}x /"
              f" {median[name] / median['inference']:5.2f}x   goal <= {goal:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
