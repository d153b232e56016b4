"""Time BN folding of a deep Conv+BN model against onnx.load + onnx.save, in the same run.

Usage::

    python benchmarks/bench_convert.py [--blocks 400] [--channels 64] [--repeat 3]
                                       [--skip-onnxoptimizer] [--skip-cli]

Measured (best of ``--repeat`` runs, wall clock, the first four round-robin):

- ``load+save``: ``onnx.load`` + ``onnx.save`` of the model (the floor for any file-to-file tool);
- ``bnfold API``: ``bnfold.io.load_model`` + ``bnfold.folding.fold`` + ``bnfold.io.save_model``, i.e.
  what ``bnfold convert --no-verify`` does;
- ``onnx.load + bnfold.fold + onnx.save``: the same without bnfold.io's checks (the load-time
  ``onnx.checker`` pass and the atomic write);
- ``bnfold fold only``: the in-memory pass alone;
- whole commands (each a fresh interpreter, start-up and imports included): ``bnfold convert IN -o
  OUT --no-verify`` against ``python -c "onnx.save(onnx.load(IN), OUT)"``, round-robin;
- ``onnxoptimizer``: ``onnx.load`` + ``onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])`` +
  ``onnx.save`` (run once: it is superlinear in depth).

The model: ``blocks`` x (Conv 3x3, ``channels`` -> ``channels``, no bias -> BN -> Relu), float32,
input (1, channels, 16, 16). Randomness is a seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_model(blocks: int, channels: int, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits = [], []
    x = "input"
    for i in range(blocks):
        w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * np.float32(0.05)
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        for role, value in (("weight", rng.uniform(0.5, 1.5, channels)), ("bias", rng.standard_normal(channels)),
                            ("running_mean", rng.standard_normal(channels) * 0.1),
                            ("running_var", rng.uniform(0.5, 2.0, channels))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{i}.{role}"))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node(
            "BatchNormalization",
            [f"c{i}", f"bn{i}.weight", f"bn{i}.bias", f"bn{i}.running_mean", f"bn{i}.running_var"],
            [f"b{i}"], name=f"bn{i}"))
        x = f"r{i}"
        nodes.append(helper.make_node("Relu", [f"b{i}"], [x], name=f"relu{i}"))
    graph = helper.make_graph(
        nodes, "deep_conv_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, 16, 16])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", channels, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def best_of(repeat: int, func) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(repeat: int, funcs: dict) -> dict[str, float]:
    """Best time of each function, measured round-robin so that load changes on the machine
    hit every candidate alike."""
    best = {name: float("inf") for name in funcs}
    for _ in range(repeat):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=400)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-onnxoptimizer", action="store_true")
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args(argv)

    from bnfold.folding import fold
    from bnfold.io import load_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "deep.onnx"
        onnx.save(build_model(args.blocks, args.channels, np.random.default_rng(0)), str(src))
        size_mb = src.stat().st_size / 1e6
        print(f"model: {args.blocks} Conv+BN+Relu blocks, {args.channels} channels, {size_mb:.1f} MB")

        def load_save():
            onnx.save(onnx.load(str(src)), str(Path(tmp) / "copy.onnx"))

        def bnfold_api():
            folded, report = fold(load_model(src))
            assert report.folded == args.blocks, report.lines()[:3]
            save_model(folded, Path(tmp) / "folded.onnx")

        def plain_fold():
            folded, _ = fold(onnx.load(str(src)))
            onnx.save(folded, str(Path(tmp) / "plain.onnx"))

        loaded = onnx.load(str(src))
        results = interleaved(args.repeat, {
            "load+save": load_save,
            "bnfold API (load+fold+save)": bnfold_api,
            "onnx.load + bnfold.fold + onnx.save": plain_fold,
            "bnfold fold only": lambda: fold(loaded),
        })
        commands = {}
        if not args.skip_cli:
            # Whole commands, each a fresh interpreter: bnfold's CLI against the same job written
            # as a one-line onnx script, round-robin. OUT is removed before each run (not timed).
            out, copy = Path(tmp) / "cli.onnx", Path(tmp) / "cli-copy.onnx"
            commands = {
                "python -c 'onnx.save(onnx.load(IN), OUT)'": (copy, [
                    sys.executable, "-c", "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])",
                    str(src), str(copy)]),
                "bnfold convert IN -o OUT --no-verify": (out, [
                    sys.executable, "-m", "bnfold", "convert", str(src), "-o", str(out), "--no-verify"]),
            }

            best = {name: float("inf") for name in commands}
            for _ in range(args.repeat):
                for name, (target, command) in commands.items():
                    target.unlink(missing_ok=True)
                    start = time.perf_counter()
                    subprocess.run(command, check=True, capture_output=True)
                    best[name] = min(best[name], time.perf_counter() - start)
            commands = best
        if not args.skip_onnxoptimizer:
            try:
                import onnxoptimizer
            except ImportError:
                print("onnxoptimizer not installed: skipped")
            else:
                def peer():
                    optimized = onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"])
                    onnx.save(optimized, str(Path(tmp) / "peer.onnx"))

                results["onnxoptimizer fuse_bn_into_conv (load+fuse+save)"] = best_of(1, peer)

    base = results["load+save"]
    width = max(map(len, [*results, *commands]))
    print("in one process (best of --repeat):")
    for name, seconds in results.items():
        print(f"  {name:<{width}}  {seconds:8.3f} s   {seconds / base:6.2f}x load+save")
    if commands:
        names = list(commands)
        print("whole commands, interpreter start-up and imports included (best of --repeat):")
        for name in names:
            print(f"  {name:<{width}}  {commands[name]:8.3f} s   {commands[name] / commands[names[0]]:6.2f}x")
    api = results["bnfold API (load+fold+save)"]
    peer_time = results.get("onnxoptimizer fuse_bn_into_conv (load+fuse+save)")
    if peer_time:
        print(f"onnxoptimizer / bnfold API: {peer_time / api:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
