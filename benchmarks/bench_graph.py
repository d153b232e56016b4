"""Whole-command speed, peak memory, scaling and inference latency of ``bnfold convert``.

Usage::

    python benchmarks/bench_graph.py [--repeat 3] [--large] [--skip-latency] [--only ROW ...]

Every ratio is against a baseline measured in the same run. Rows:

- ``800 blocks``: the ``bnfold`` console script (``convert IN -o OUT --no-verify``) against a
  python process running ``onnx.save(onnx.load(IN), OUT)``, alternated, best of ``--repeat``;
  800 x (Conv 3x3 64 -> 64, no bias -> BN -> Relu), 118 MB. bnfold's side includes its load-time
  checks, the atomic write and its fsync.
- ``onnxoptimizer, 200 blocks``: a python process running ``onnx.load`` +
  ``onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])`` + ``onnx.save`` against the bnfold
  command on the same 200-block model (run once: it is superlinear in depth).
- ``1 GiB external data``: 4 x (MatMul by an 8192 x 8192 float32 weight -> BN), stored with
  external data; the baseline saves with ``save_as_external_data=True``. Peak RSS of each
  command (``RUSAGE_CHILDREN`` of a small launcher process) divided by the model's size on disk.
- ``--large``: ``bnfold convert`` WITH verification on the 2.35 GB model of
  ``tests/reliability/test_large_model.py`` (time, peak RSS), and the peak RSS of a bare
  onnxruntime session of that model running one batch (the floor for any verification).
- ``scaling``: ``load_model`` + ``fold`` + ``save_model`` in this process on 4 depths spanning
  100x (32 channels); time per block, of the whole and of the fold pass alone.
- ``latency``: onnxruntime (1 thread, all graph optimizations on) median latency of the folded
  model against the original, single runs interleaved; a mobilenet_v2-like network exported by
  ``torch.onnx.export(dynamo=True, optimize=False)`` (if torch is installed), the 200-block model
  and a MatMul+BN MLP.

At most one large model exists at a time; every temporary file is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import build_model

_ROWS = ("800", "peer", "1gib", "scaling", "latency")


# ---- environment ------------------------------------------------------------------------------
def machine_lines() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            kib = int(next(line.split()[1] for line in handle if line.startswith("MemTotal")))
        memory = f", {kib / 1024**2:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    versions = []
    for name in ("bnfold", "numpy", "onnx", "onnxruntime", "onnxoptimizer", "onnx-ir", "onnxscript", "torch",
                 "protobuf"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} -")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return [f"machine: {cpu}, {os.cpu_count()} CPUs{memory}, {platform.system()} {platform.release()}",
            f"python {platform.python_version()}; " + ", ".join(versions)
            + (f"; bnfold commit {commit}" if commit else "")]


# ---- child processes --------------------------------------------------------------------------
# Runs a command and reports its peak RSS. Linux keeps a process's peak RSS across exec, and a
# forked child starts from its parent's: measured from this process (which builds the models),
# a child would report this process's peak. A fresh launcher is small when it forks the command.
_LAUNCHER = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode\n"
    "elapsed = time.perf_counter() - start\n"
    "open(sys.argv[1], 'w').write(f'{elapsed} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')\n"
    "sys.exit(code)\n"
)


def compile_bytecode() -> None:
    """Compile bnfold's modules as ``pip install`` does, so that neither side of a ratio compiles
    source at start-up: an editable install under ``PYTHONDONTWRITEBYTECODE`` would otherwise
    compile bnfold's ~90 modules in every run, while onnx's were compiled when it was installed."""
    import compileall

    import bnfold

    folder = Path(bnfold.__file__).resolve().parent
    if not compileall.compile_dir(str(folder), quiet=1, legacy=False):
        print(f"note: some modules under {folder} did not compile")


def run_child(command: list[str]) -> tuple[float, int]:
    """Run ``command``; return its wall time in seconds (the launcher's start-up excluded) and its
    own peak RSS in bytes."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "maxrss"
        result = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *command], check=False,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if result.returncode != 0:
            raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr.decode()[-2000:]}")
        elapsed, kib = report.read_text().split()
        return float(elapsed), int(kib) * 1024  # Linux reports KiB


def alternate(repeat: int, commands: dict[str, tuple[list[str], list[Path]]]) -> dict[str, tuple[float, int]]:
    """Best time and highest peak RSS of each command, run round-robin (outputs removed first)."""
    best = {name: (float("inf"), 0) for name in commands}
    for _ in range(repeat):
        for name, (command, outputs) in commands.items():
            remove_outputs(outputs)
            seconds, rss = run_child(command)
            best[name] = (min(best[name][0], seconds), max(best[name][1], rss))
    return best


def remove_outputs(outputs: list[Path]) -> None:
    for path in outputs:
        for item in path.parent.glob(f"{path.name}*"):
            item.unlink()


def bnfold_script() -> str:
    script = Path(sys.executable).with_name("bnfold")
    found = str(script) if script.exists() else shutil.which("bnfold")
    if not found:
        raise SystemExit("the bnfold console script is not installed (pip install -e .)")
    return found


def load_save(src: Path, out: Path, external: bool) -> list[str]:
    # With external data, the data file is named after OUT (onnx's default is a random name).
    code = ("import os, sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2]"
            + (", save_as_external_data=True, location=os.path.basename(sys.argv[2]) + '.data')"
               if external else ")"))
    return [sys.executable, "-c", code, str(src), str(out)]


def convert(src: Path, out: Path, *extra: str) -> list[str]:
    return [bnfold_script(), "convert", str(src), "-o", str(out), "--force", *extra]


def disk_size(model: Path) -> int:
    return sum(item.stat().st_size for item in model.parent.glob(f"{model.name}*") if item.is_file())


# ---- models -----------------------------------------------------------------------------------
def matmul_bn_model(path: Path, layers: int, width: int, rng: np.random.Generator, *, op: str = "MatMul") -> Path:
    """``layers`` x (MatMul or Gemm by a ``width`` x ``width`` float32 weight -> BN), saved with
    external data one weight at a time (never more than one weight in memory)."""
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        weight = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
        inits.append(weight)
        for role, value in (("scale", rng.uniform(0.5, 1.5, width)), ("bias", rng.standard_normal(width)),
                            ("mean", rng.standard_normal(width) * 0.1), ("var", rng.uniform(0.5, 2.0, width))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{i}.{role}"))
        nodes.append(helper.make_node(op, [x, f"w{i}"], [f"m{i}"], name=f"{op.lower()}{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"m{i}", *(f"bn{i}.{r}" for r in
                                      ("scale", "bias", "mean", "var"))], [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "matmul_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    data_name = f"{path.name}.data"
    offset = 0
    with open(path.with_name(data_name), "wb") as handle:
        for tensor in model.graph.initializer:
            if tensor.name.startswith("w"):
                weight = rng.standard_normal((width, width), dtype=np.float32)
                weight *= np.float32(1 / np.sqrt(width))
                payload = weight.tobytes()
                del weight
            else:
                payload = tensor.raw_data
            handle.write(payload)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(payload)
            del payload
    onnx.save(model, str(path))
    return path


def mlp_model(layers: int, width: int, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        for role, value in (("scale", rng.uniform(0.5, 1.5, width)), ("bias", rng.standard_normal(width)),
                            ("mean", rng.standard_normal(width) * 0.1), ("var", rng.uniform(0.5, 2.0, width))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{i}.{role}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("BatchNormalization", [f"m{i}", *(f"bn{i}.{r}" for r in
                                      ("scale", "bias", "mean", "var"))], [f"b{i}"]))
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def mobilenet_v2_like(path: Path) -> str | None:
    """Export a mobilenet_v2-shaped torch network (inverted residuals, width 1.0, 224 x 224) with
    BN kept; return how it was exported, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from mobilenet import mobilenet_v2

    net = mobilenet_v2(seed=0, mean_spread=0.1)
    example = torch.randn(1, 3, 224, 224)
    try:
        torch.onnx.export(net, (example,), str(path), dynamo=True, optimize=False, external_data=False)
        how = "torch.onnx.export(dynamo=True, optimize=False)"
    except Exception as exc:  # noqa: BLE001 - fall back to the classic exporter, and say so
        print(f"  (dynamo export failed: {type(exc).__name__}: {exc}; classic exporter used)")
        torch.onnx.export(net, (example,), str(path), dynamo=False, do_constant_folding=False)
        how = "torch.onnx.export(dynamo=False, do_constant_folding=False)"
    return how


# ---- rows -------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def row_blocks(tmp: Path, repeat: int) -> None:
    src = tmp / "deep800.onnx"
    onnx.save(build_model(800, 64, np.random.default_rng(0)), str(src))
    out, copy = tmp / "deep800.folded.onnx", tmp / "deep800.copy.onnx"
    best = alternate(repeat, {"load+save": (load_save(src, copy, False), [copy]),
                              "bnfold": (convert(src, out, "--no-verify"), [out])})
    ratio = best["bnfold"][0] / best["load+save"][0]
    print(f"800 Conv+BN blocks ({_gib(src.stat().st_size)}): bnfold convert --no-verify {best['bnfold'][0]:.2f} s,"
          f" load+save {best['load+save'][0]:.2f} s -> {ratio:.2f}x (goal <= 1.5x)")
    remove_outputs([out, copy, src])


def row_peer(tmp: Path) -> None:
    try:
        import onnxoptimizer  # noqa: F401
    except ImportError:
        print("onnxoptimizer, 200 blocks: not installed, skipped")
        return
    src = tmp / "deep200.onnx"
    onnx.save(build_model(200, 64, np.random.default_rng(0)), str(src))
    out, peer = tmp / "deep200.folded.onnx", tmp / "deep200.peer.onnx"
    code = ("import sys, onnx, onnxoptimizer; onnx.save(onnxoptimizer.optimize(onnx.load(sys.argv[1]),"
            " ['fuse_bn_into_conv']), sys.argv[2])")
    best = alternate(1, {"bnfold": (convert(src, out, "--no-verify"), [out]),
                         "onnxoptimizer": ([sys.executable, "-c", code, str(src), str(peer)], [peer])})
    print(f"200 Conv+BN blocks: onnxoptimizer fuse_bn_into_conv {best['onnxoptimizer'][0]:.2f} s,"
          f" bnfold convert --no-verify {best['bnfold'][0]:.2f} s"
          f" -> bnfold {best['onnxoptimizer'][0] / best['bnfold'][0]:.1f}x faster")
    remove_outputs([out, peer, src])


def row_external(tmp: Path, repeat: int) -> None:
    folder = tmp / "gib"
    folder.mkdir()
    src = matmul_bn_model(folder / "gib.onnx", 4, 8192, np.random.default_rng(0))
    size = disk_size(src)
    out, copy = folder / "gib.folded.onnx", folder / "gib.copy.onnx"
    best = alternate(repeat, {"load+save": (load_save(src, copy, True), [copy]),
                              "bnfold": (convert(src, out, "--no-verify"), [out])})
    (t_bn, rss_bn), (t_ls, rss_ls) = best["bnfold"], best["load+save"]
    print(f"1 GiB external data (4 x MatMul 8192x8192 + BN, {_gib(size)}): bnfold convert --no-verify {t_bn:.2f} s,"
          f" load+save {t_ls:.2f} s -> {t_bn / t_ls:.2f}x (goal <= 1.0x)")
    print(f"  peak RSS: bnfold {_gib(rss_bn)} = {rss_bn / size:.2f} x model size (goal <= 0.6);"
          f" load+save {_gib(rss_ls)} = {rss_ls / size:.2f} x")
    shutil.rmtree(folder)


def row_large(tmp: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))
    from test_large_model import _build

    folder = tmp / "large"
    folder.mkdir()
    src = _build(folder)
    size = disk_size(src)
    out = folder / "large.folded.onnx"
    seconds, rss = run_child(convert(src, out))
    print(f"2.35 GB model (3 x Gemm 14000x14000 + BN, {_gib(size)}), convert WITH verification: {seconds:.1f} s"
          f" (goal <= 60 s), peak RSS {_gib(rss)} = {rss / size:.2f} x model size (goal <= 2)")
    remove_outputs([out])
    code = ("import sys, numpy as np, onnxruntime as ort; o = ort.SessionOptions();"
            " o.intra_op_num_threads = 1; o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL;"
            " s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider']);"
            " s.run(None, {'x': np.zeros((1, 14000), np.float32)})")
    seconds, rss = run_child([sys.executable, "-c", code, str(src)])
    print(f"  floor: a bare onnxruntime session of the input model alone (one run) peaks at {_gib(rss)}"
          f" = {rss / size:.2f} x model size ({seconds:.1f} s)")
    shutil.rmtree(folder)


def row_scaling(tmp: Path) -> None:
    from bnfold.folding import fold
    from bnfold.io import load_model, save_model

    depths = (20, 100, 500, 2000)
    whole, alone = [], []
    for depth in depths:
        src = tmp / f"scale{depth}.onnx"
        onnx.save(build_model(depth, 32, np.random.default_rng(0)), str(src))
        best, best_fold = float("inf"), float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model = load_model(src)
            folding = time.perf_counter()
            folded, report = fold(model)
            best_fold = min(best_fold, time.perf_counter() - folding)
            assert report.folded == depth
            save_model(folded, tmp / "scaled.onnx")
            best = min(best, time.perf_counter() - start)
            del folded, model
        whole.append(best / depth * 1e3)
        alone.append(best_fold / depth * 1e3)
        src.unlink()
    (tmp / "scaled.onnx").unlink()
    print("scaling (32 channels), time per block, best of 3:")
    print("  load_model + fold + save_model: " + ", ".join(f"{d} blocks {ms:.2f} ms" for d, ms in zip(depths, whole))
          + f"; {depths[-1]} / {depths[0]} blocks per-block ratio {whole[-1] / whole[0]:.2f}")
    print("  fold pass alone:                " + ", ".join(f"{d} blocks {ms:.2f} ms" for d, ms in zip(depths, alone))
          + f"; {depths[-1]} / {depths[0]} blocks per-block ratio {alone[-1] / alone[0]:.2f}")


def _session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _optimized_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (its optimizer applied)."""
    from collections import Counter

    optimized = path.with_name(path.stem + ".ort.onnx")
    _session(path, optimized)
    ops = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    for item in path.parent.glob(f"{optimized.name}*"):
        item.unlink()
    return dict(ops)


def _latencies(paths: list[Path], feeds: dict, runs: int) -> list[float]:
    """Median latency (ms) of each model, single runs interleaved (A, B, A, B, ...) so that load
    changes on the machine hit every model alike."""
    sessions = [_session(path) for path in paths]
    for sess in sessions:
        for _ in range(3):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, bucket in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, feeds)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) * 1e3 for bucket in times]


def row_latency(tmp: Path) -> None:
    from bnfold.folding import fold
    from bnfold.io import load_model, save_model
    from bnfold.runtime import feed_inputs, random_inputs

    rng = np.random.default_rng(0)
    models: dict[str, tuple[Path, int]] = {}
    mobile = tmp / "mobilenet_v2.onnx"
    how = mobilenet_v2_like(mobile)
    if how is not None:
        models[f"mobilenet_v2-like, {how}"] = (mobile, 100)
    else:
        print("  torch not installed: mobilenet_v2-like model skipped")
    deep = tmp / "deep200.onnx"
    onnx.save(build_model(200, 64, rng), str(deep))
    models["200 x Conv 3x3 64ch + BN + Relu, 16x16"] = (deep, 60)
    mlp = tmp / "mlp.onnx"
    onnx.save(mlp_model(8, 1024, rng), str(mlp))
    models["8 x MatMul 1024 + BN + Relu, batch 1"] = (mlp, 1000)
    print("onnxruntime latency, 1 thread, all graph optimizations (median of single runs, interleaved;"
          " original -> folded):")
    for name, (path, runs) in models.items():
        original = load_model(path)
        folded, report = fold(original)
        folded_path = path.with_name(path.stem + ".folded.onnx")
        save_model(folded, folded_path)
        feeds = random_inputs(feed_inputs(original), batch=1, rng=np.random.default_rng(1))
        b, a = _latencies([path, folded_path], feeds, runs)
        same = _optimized_ops(path) == _optimized_ops(folded_path)
        note = ("onnxruntime's optimizer makes the same graph of both (it fuses these BNs itself)" if same
                else "onnxruntime runs different graphs")
        print(f"  {name}: BN folded {report.folded}/{report.total}, {b:.2f} ms -> {a:.2f} ms ({b / a:.2f}x); {note}")
        path.unlink()
        folded_path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="best of this many alternated runs")
    parser.add_argument("--large", action="store_true", help="also the 2.35 GB model with verification (minutes)")
    parser.add_argument("--skip-latency", action="store_true", help="skip the onnxruntime latency rows")
    parser.add_argument("--only", nargs="+", choices=_ROWS + ("large",), help="run only these rows")
    parser.add_argument("--tmp", default=None, help="folder for the temporary models (on disk, not tmpfs)")
    args = parser.parse_args(argv)
    rows = set(args.only or (_ROWS + (("large",) if args.large else ())))
    if args.skip_latency:
        rows.discard("latency")
    for line in machine_lines():
        print(line)
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-", dir=args.tmp) as name:
        tmp = Path(name)
        if "800" in rows:
            row_blocks(tmp, args.repeat)
        if "peer" in rows:
            row_peer(tmp)
        if "1gib" in rows:
            row_external(tmp, args.repeat)
        if "large" in rows:
            row_large(tmp)
        if "scaling" in rows:
            row_scaling(tmp)
        if "latency" in rows:
            row_latency(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
