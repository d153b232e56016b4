"""Mutation fuzzer for what ``bnfold convert`` does: load, fold, verify.

Each case starts from the bytes of a small valid model (Conv+BN, Gemm+BN, a MatMul+BN chain,
random foldable chains, Conv+BN with its tensors in an external data file; see
``tests/reliability/builders.py``) and applies a few mutations, either to the raw bytes (bit
flips, byte overwrites, truncation, insertion, deletion, duplication, splices with another seed)
or to the parsed protobuf (special float values in initializers, inconsistent dims and dtypes,
changed or added attributes, dangling or swapped names, dropped, duplicated or reordered nodes,
odd versions, absurd input dimensions, training-mode BN, intermediate values exposed as graph
outputs, the whole model converted to float16 or float64, hostile external data entries). Half
the cases fold with ``decompose_rest=True``.

The oracle (`run_case`) requires that bnfold either refuses the input with a `BnfoldError` or
produces a folded model that verifies against the input in onnxruntime (or fails verification
only where an output overflows to inf/NaN, see `_differs_only_at_overflow`); anything else
(another exception type, a failed verification, a modified input, a case over its time limit)
is a finding. `run_cli_case` checks that ``python -m bnfold convert`` gives the same answer:
exit code, one ``bnfold: error:`` line, nothing left in the output folder.

The suite runs a bounded version (``tests/reliability/test_fuzz.py``); the long run is::

    python tools/fuzz_convert.py --cases 10000 --cli-cases 300 --out fuzz-report

which writes ``summary.json``, ``summary.md`` and one reproducer ``.onnx`` with its traceback per
distinct finding into ``--out`` (exit code 1 if there is any). Results of the recorded runs:
``tools/fuzz_convert_results.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bnfold.errors import BnfoldError, VerificationError  # noqa: E402

__all__ = [
    "BYTE_OPS",
    "PROTO_OPS",
    "Finding",
    "Outcome",
    "apply_byte_ops",
    "apply_proto_ops",
    "random_case",
    "run_case",
    "seed_models",
]

log = logging.getLogger("fuzz_convert")

# A case that loads and folds runs two tiny models in onnxruntime: well under a second. 20 s
# means something loops or allocates far too much.
CASE_TIME_LIMIT = 20.0
# Verification memory cap for fuzz cases (absurd dims must be refused, never allocated).
VERIFY_MAX_BYTES = 64 * 1024**2


def _builders():
    path = REPO / "tests" / "reliability" / "builders.py"
    name = "reliability_builders"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def seed_models() -> dict[str, bytes]:
    """The valid models every case starts from, serialized."""
    b = _builders()
    seeds = {
        "conv_bn": b.conv_bn().SerializeToString(),
        "gemm_bn": b.gemm_bn().SerializeToString(),
        "matmul_bn": b.matmul_bn().SerializeToString(),
    }
    for i in range(3):
        seeds[f"random_foldable_{i}"] = b.random_foldable(np.random.default_rng(100 + i)).SerializeToString()
    seeds["conv_bn_external"] = _externalized(b.conv_bn())[0]
    return seeds


# Every case runs in a folder that also holds this data file, which the "conv_bn_external" seed
# refers to: mutations of its external_data entries exercise the external data loader.
DATA_FILE = "weights.bin"


def _externalized(model: onnx.ModelProto) -> tuple[bytes, bytes]:
    """(model bytes with every initializer in DATA_FILE, the DATA_FILE bytes)."""
    blob = bytearray()
    for tensor in model.graph.initializer:
        raw = onnx.numpy_helper.to_array(tensor).tobytes()
        offset = len(blob)
        blob += raw
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString(), bytes(blob)


def data_file() -> bytes:
    return _externalized(_builders().conv_bn())[1]


# ------------------------------------------------------------------------------------------
# Byte-level mutations: (name, position in [0, 1), payload bytes)

ByteOp = tuple[str, float, bytes]
BYTE_OPS = ("flip", "set", "truncate", "insert", "delete", "duplicate", "splice")


def apply_byte_ops(data: bytes, ops: Sequence[ByteOp], donors: Sequence[bytes] = ()) -> bytes:
    """Apply byte mutations in order; positions are fractions of the current length."""
    buf = bytearray(data)
    for name, where, payload in ops:
        n = len(buf)
        if n == 0:
            break
        i = min(int(where * n), n - 1)
        size = 1 + (payload[0] % 16 if payload else 0)
        if name == "flip":
            buf[i] ^= 1 << ((payload[0] if payload else 0) % 8)
        elif name == "set":
            buf[i : i + len(payload)] = payload
        elif name == "truncate":
            del buf[i:]
        elif name == "insert":
            buf[i:i] = payload
        elif name == "delete":
            del buf[i : i + size]
        elif name == "duplicate":
            buf[i:i] = buf[i : i + size * 4]
        elif name == "splice" and donors:
            donor = donors[(payload[0] if payload else 0) % len(donors)]
            j = int(where * len(donor))
            buf = buf[:i] + bytearray(donor[j:])
    return bytes(buf)


# ------------------------------------------------------------------------------------------
# Protobuf-level mutations: (name, integer choices)

ProtoOp = tuple[str, tuple[int, ...]]
_SPECIAL_FLOATS = (np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, 1e38, -1e38, 1e-45, 65504.0, 1e-30)
_SPECIAL_INTS = (-1, 0, 1, 2, 3, 7, 1000, 2**31, 10**12)
_OP_TYPES = ("Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Add", "Identity", "ConvTranspose", "Mul")
_DTYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BFLOAT16, 0, 99)
PROTO_OPS = (
    "special_value",
    "init_dims",
    "init_dtype",
    "attribute",
    "rename_input",
    "drop_node",
    "duplicate_node",
    "swap_nodes",
    "op_type",
    "input_dim",
    "opset",
    "ir_version",
    "training_mode",
    "drop_initializer",
    "input_dtype",
    "add_output",
    "add_attribute",
    "to_dtype",
    "external_entry",
)
_EXTERNAL_VALUES = {
    "location": ("../weights.bin", "/etc/passwd", "weights.bin\x00x", "", ".", "sub/../weights.bin",
                 "weights.bin/", "WEIGHTS.BIN", "case.onnx"),
    "offset": ("-1", "0", "1", "7", "9999999999999", "x", "4.0"),
    "length": ("-4", "0", "1", "3", "99999999999", "", "1e3"),
}
_NEW_ATTRIBUTES = (
    ("alpha", 0.5), ("beta", 2.0), ("alpha", -1.0), ("transA", 1), ("group", 2), ("strides", [2, 2]),
    ("dilations", [2, 2]), ("momentum", 0.5), ("spatial", 0), ("training_mode", 0), ("epsilon", 0.0),
    ("auto_pad", "SAME_UPPER"),
)


def _pick(seq, k: int):
    return seq[k % len(seq)] if len(seq) else None


def apply_proto_ops(data: bytes, ops: Sequence[ProtoOp]) -> bytes:
    """Parse `data` (a valid model), apply structural mutations, serialize."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    for name, args in ops:
        # A mutation that does not apply to an already mutated model is skipped.
        with contextlib.suppress(Exception):
            _apply_proto_op(model, name, args)
    return model.SerializeToString()


def _apply_proto_op(model: onnx.ModelProto, name: str, args: tuple[int, ...]) -> None:
    graph = model.graph
    a, b, c = (list(args) + [0, 0, 0])[:3]
    node = _pick(graph.node, a)
    init = _pick(graph.initializer, a)
    if name == "special_value" and init is not None:
        arr = onnx.numpy_helper.to_array(init).copy()
        if arr.size and arr.dtype.kind == "f":
            arr.flat[b % arr.size] = _pick(_SPECIAL_FLOATS, c)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    elif name == "init_dims" and init is not None:
        dims = list(init.dims)
        if dims and c % 3 == 0:
            dims[b % len(dims)] = _pick(_SPECIAL_INTS, c)
        elif c % 3 == 1:
            dims.append(_pick(_SPECIAL_INTS, b))
        elif dims:
            dims.pop(b % len(dims))
        init.dims[:] = dims
    elif name == "init_dtype" and init is not None:
        init.data_type = _pick(_DTYPES, b)
    elif name == "attribute" and node is not None:
        attrs = list(node.attribute)
        if attrs:
            attr = attrs[b % len(attrs)]
            if attr.type == onnx.AttributeProto.FLOAT:
                attr.f = float(_pick(_SPECIAL_FLOATS, c))
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = int(_pick(_SPECIAL_INTS, c)) % 2**63
            elif attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[c % len(attr.ints)] = int(_pick(_SPECIAL_INTS, b)) % 2**63
    elif name == "rename_input" and node is not None and node.input:
        names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
        names += [o for n in graph.node for o in n.output] + ["", "missing"]
        node.input[b % len(node.input)] = _pick(names, c)
    elif name == "drop_node" and node is not None:
        graph.node.remove(node)
    elif name == "duplicate_node" and node is not None:
        graph.node.insert(b % (len(graph.node) + 1), node)
    elif name == "swap_nodes" and len(graph.node) > 1:
        i, j = a % len(graph.node), b % len(graph.node)
        first, second = onnx.NodeProto(), onnx.NodeProto()
        first.CopyFrom(graph.node[i])
        second.CopyFrom(graph.node[j])
        graph.node[i].CopyFrom(second)
        graph.node[j].CopyFrom(first)
    elif name == "op_type" and node is not None:
        node.op_type = _pick(_OP_TYPES, b)
    elif name == "input_dim" and graph.input:
        dims = graph.input[a % len(graph.input)].type.tensor_type.shape.dim
        if dims:
            dim = dims[b % len(dims)]
            value = _pick(_SPECIAL_INTS, c)
            if value >= 0:
                dim.dim_value = value
            else:
                dim.dim_param = "M"
    elif name == "opset" and model.opset_import:
        model.opset_import[0].version = 1 + b % 30
    elif name == "ir_version":
        model.ir_version = b % 16
    elif name == "training_mode":
        for bn in (n for n in graph.node if n.op_type == "BatchNormalization"):
            bn.attribute.append(helper.make_attribute("training_mode", 1))
            break
    elif name == "drop_initializer" and init is not None:
        graph.initializer.remove(init)
    elif name == "input_dtype" and graph.input:
        graph.input[a % len(graph.input)].type.tensor_type.elem_type = _pick(_DTYPES, b)
    elif name == "add_output" and node is not None and node.output:
        # An intermediate value that is also a graph output must survive folding.
        graph.output.append(helper.make_empty_tensor_value_info(node.output[b % len(node.output)]))
    elif name == "add_attribute" and node is not None:
        key, value = _pick(_NEW_ATTRIBUTES, b)
        kept = [attr for attr in node.attribute if attr.name != key]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(key, value)])
    elif name == "external_entry" and init is not None and init.external_data:
        entry = init.external_data[b % len(init.external_data)]
        entry.value = _pick(_EXTERNAL_VALUES.get(entry.key, ("",)), c)
    elif name == "to_dtype":
        _convert_float_dtype(model, (TensorProto.FLOAT16, TensorProto.DOUBLE)[b % 2])


def _convert_float_dtype(model: onnx.ModelProto, dtype: int) -> None:
    """Convert every float32 initializer and graph input/output to `dtype`, consistently."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    for i, init in enumerate(model.graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(init).astype(np_dtype)
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = dtype


# ------------------------------------------------------------------------------------------
# The oracle


@functools.lru_cache(maxsize=1)
def _data_file_bytes() -> bytes:
    return data_file()


class Finding(Exception):
    """A case where bnfold answered with something other than a BnfoldError or a verified result."""

    def __init__(self, stage: str, detail: str, tb: str = "") -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage, self.detail, self.tb = stage, detail, tb


class _CaseTimeout(BaseException):
    pass


@dataclass
class Outcome:
    """How bnfold answered one case: ``refused:<stage>`` or ``verified``."""

    status: str
    message: str = ""
    folded: int = 0
    total: int = 0


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    usable = hasattr(signal, "setitimer") and _in_main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _CaseTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_case(data: bytes, folder: Path, *, time_limit: float = CASE_TIME_LIMIT,
             decompose_rest: bool = False) -> Outcome:
    """Run load -> fold -> verify on `data`; return the outcome or raise `Finding`.

    Invariants checked: only `BnfoldError` may escape bnfold; `fold` does not modify its input
    model; the input file is unchanged; a folded model verifies against its input.
    """
    from bnfold.folding import fold
    from bnfold.io import load_model
    from bnfold.verification import verify

    path = Path(folder) / "case.onnx"
    path.write_bytes(data)
    side = Path(folder) / DATA_FILE
    side_bytes = _data_file_bytes()
    side.write_bytes(side_bytes)
    stage = "load"
    try:
        with _time_limit(time_limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(path)
            stage = "fold"
            before = model.SerializeToString()
            folded, report = fold(model, decompose_rest=decompose_rest)
            if model.SerializeToString() != before:
                raise Finding("fold", "fold() modified its input model")
            stage = "verify"
            options = {"batch": 2, "threads": 1, "max_bytes": VERIFY_MAX_BYTES}
            try:
                result = verify(model, folded, **options)
            except BnfoldError:
                # Refusing is right only if the input itself cannot be run; if it can, the fold
                # produced something onnxruntime rejects: a bug.
                stage = "verify-input"
                verify(model, model, **options)
                raise Finding("verify", "the input runs but its folded model is refused: "
                              + traceback.format_exc().strip().splitlines()[-1], traceback.format_exc()) from None
            if not result.ok:
                if _differs_only_at_overflow(model, folded, options["batch"]):
                    return Outcome("failed:overflow", " | ".join(result.lines()), report.folded, report.total)
                raise Finding("verify", "folded model does not verify: " + " | ".join(result.lines()))
    except BnfoldError as exc:
        return Outcome(f"refused:{'verify' if stage == 'verify-input' else stage}", str(exc))
    except Finding:
        raise
    except _CaseTimeout:
        raise Finding(stage, f"no answer within {time_limit:.0f} s (hang?)") from None
    except VerificationError as exc:
        raise Finding(stage, f"VerificationError from the API: {exc}", traceback.format_exc()) from None
    except BaseException as exc:  # the point of the fuzzer: anything else is a bug
        if isinstance(exc, KeyboardInterrupt):
            raise
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        raise Finding(stage, detail, traceback.format_exc()) from None
    finally:
        if path.read_bytes() != data or side.read_bytes() != side_bytes:
            raise Finding(stage, "the input file or its data file was modified")
    return Outcome("verified", "", report.folded, report.total)


def _differs_only_at_overflow(model: onnx.ModelProto, folded: onnx.ModelProto, batch: int) -> bool:
    """True if the two models' outputs differ only where one of them is inf or NaN.

    A mutated model can have activations at the edge of the float range: the unfolded model
    rounds to inf where the folded one stays finite (or the reverse). `verify` rightly calls that
    a failure (`convert` exits 1); it is a property of the input, not a bug of the fold. Outputs
    are recomputed here on the inputs `verify` draws (seed 0), with onnxruntime.
    """
    import onnxruntime as ort

    from bnfold.verification import feed_inputs, random_inputs

    feeds = random_inputs(feed_inputs(model), batch=batch, rng=np.random.default_rng(0))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    outputs = []
    for proto in (model, folded):
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds))))
    reference, candidate = outputs
    found_overflow = False
    for name in reference.keys() & candidate.keys():
        a, b = (np.asarray(reference[name], np.float64), np.asarray(candidate[name], np.float64))
        if a.shape != b.shape:
            return False
        bad = ~np.isfinite(a) | ~np.isfinite(b)
        close = np.isclose(a[~bad], b[~bad], rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(a[~bad]).max(initial=0))))
        if not close.all():
            return False
        found_overflow |= bool((bad & ~((a == b) | (np.isnan(a) & np.isnan(b)))).any())
    return found_overflow


def run_cli_case(data: bytes, folder: Path, api_status: str, *, timeout: float = 120.0) -> None:
    """Run ``python -m bnfold convert`` on `data`; raise `Finding` unless it answers as the API did.

    Expected: exit 0 and only OUT in the output folder for "verified", exit 1 for
    "failed:overflow", exit 2 otherwise; then exactly one ``bnfold: error:`` line on stderr and an
    empty output folder. Never a traceback; the input is never modified.
    """
    import subprocess

    src_dir, out_dir = Path(folder) / "in", Path(folder) / "out"
    for sub in (src_dir, out_dir):
        sub.mkdir(exist_ok=True)
        for leftover in sub.iterdir():
            leftover.unlink()
    src = src_dir / "case.onnx"  # the name run_case uses: a location may name the model itself
    src.write_bytes(data)
    (src_dir / DATA_FILE).write_bytes(_data_file_bytes())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "bnfold", "convert", str(src), "-o", str(out_dir / "o.onnx"),
               "--batch", "2", "--max-memory", str(VERIFY_MAX_BYTES)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Finding("cli", f"no answer within {timeout:.0f} s (hang?)") from None
    expected = {"verified": 0, "failed:overflow": 1}.get(api_status, 2)
    report = f"exit {proc.returncode} (API: {api_status}); stderr: {proc.stderr.strip()[-2000:]!r}"
    if "Traceback" in proc.stderr or proc.returncode != expected:
        raise Finding("cli", f"unexpected answer: {report}", proc.stderr)
    listing = sorted(p.name for p in out_dir.iterdir())
    if proc.returncode == 0 and listing != ["o.onnx"]:
        raise Finding("cli", f"output folder holds {listing} after success")
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("bnfold: error: "):
            raise Finding("cli", f"error is not one 'bnfold: error:' line: {report}", proc.stderr)
        if listing:
            raise Finding("cli", f"output folder holds {listing} after an error")
    if src.read_bytes() != data or (src_dir / DATA_FILE).read_bytes() != _data_file_bytes():
        raise Finding("cli", "the input file or its data file was modified")


def random_case(rng: np.random.Generator, seeds: dict[str, bytes], proto_share: float = 0.5) -> tuple[str, bytes, str]:
    """Draw one mutated model: (seed name, bytes, description of the mutations).

    With probability `proto_share` the parsed model is mutated first; byte mutations follow
    with probability 0.25 (always when there was no structural mutation).
    """
    name = list(seeds)[int(rng.integers(len(seeds)))]
    data = seeds[name]
    parts = []
    if rng.random() < proto_share:
        ops = [
            (str(rng.choice(PROTO_OPS)), tuple(int(v) for v in rng.integers(0, 1000, 3)))
            for _ in range(int(rng.integers(1, 4)))
        ]
        data = apply_proto_ops(data, ops)
        parts.append(f"proto{ops}")
    if rng.random() < (0.25 if parts else 1.0):
        ops = [
            (str(rng.choice(BYTE_OPS)), float(rng.random()), rng.bytes(int(rng.integers(1, 9))))
            for _ in range(int(rng.integers(1, 5)))
        ]
        data = apply_byte_ops(data, ops, list(seeds.values()))
        parts.append(f"bytes{[(op, round(w, 4), p.hex()) for op, w, p in ops]}")
    return name, data, " + ".join(parts)


# ------------------------------------------------------------------------------------------
# The long run


@dataclass
class Summary:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)
    findings: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
            "outcomes": dict(self.outcomes.most_common()),
            "refusals": dict(self.messages.most_common(40)),
            "distinct_findings": len(self.findings),
            "findings": list(self.findings.values()),
        }

    def markdown(self) -> str:
        cli = sum(count for key, count in self.outcomes.items() if key.startswith("cli:"))
        lines = [
            f"# bnfold fuzz run: {self.cases} cases in process"
            + (f" + {cli} through the command line" if cli else "") + f", {self.seconds:.0f} s",
            "",
            "| outcome | cases |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in self.outcomes.most_common()),
            "",
            "## Most frequent refusals (message with file names and numbers masked)",
            "",
            "| stage: message | cases |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in self.messages.most_common(25)),
            "",
            f"## Distinct findings: {len(self.findings)}",
        ]
        for item in self.findings.values():
            lines += ["", f"### {item['key']} ({item['count']} cases)", f"- input: `{item['file']}`",
                      f"- mutation: `{item['mutation'][:400]}`", "```",
                      item["traceback"][-3000:] or item["detail"], "```"]
        return "\n".join(lines) + "\n"


def _mask(message: str) -> str:
    """A refusal message reduced to its kind: no path, numbers or quoted names, 90 characters."""
    text = re.sub(r"^\S*case\.onnx:? ?", "", message)
    text = re.sub(r"'[^']*'", "'_'", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", text)
    return text.replace("|", "/")[:90]


def _finding_key(finding: Finding) -> str:
    """Group findings by stage, exception type and the innermost bnfold frame."""
    frames = [line.strip() for line in finding.tb.splitlines() if line.strip().startswith("File ") and "bnfold" in line]
    where = frames[-1] if frames else ""
    kind = finding.detail.split(":", 1)[0]
    if finding.detail.startswith("folded model does not verify"):
        kind = "verification failed"
    return f"{finding.stage} | {kind} | {where}"


def fuzz(cases: int, time_limit: float, seed: int, out: Path, on_progress: Callable[[Summary], None] | None = None,
         proto_share: float = 0.5, cli_cases: int = 0) -> Summary:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seeds = seed_models()
    summary = Summary()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-") as tmp:
        while summary.cases < cases and time.monotonic() - start < time_limit:
            name, data, mutation = random_case(rng, seeds, proto_share)
            summary.cases += 1
            decompose = summary.cases % 2 == 0  # half the cases also exercise decompose_rest
            mutation += " + decompose_rest" if decompose else ""
            try:
                outcome = run_case(data, Path(tmp), decompose_rest=decompose)
                summary.outcomes[outcome.status] += 1
                if outcome.status == "verified" and outcome.folded:
                    summary.outcomes["verified, with at least one BN folded"] += 1
                if outcome.message:
                    summary.messages[f"{outcome.status}: {_mask(outcome.message)}"] += 1
            except Finding as finding:
                _record(summary, finding, data, name, mutation, out)
            for leftover in os.listdir(tmp):
                if leftover not in ("case.onnx", DATA_FILE):
                    log.warning("case left a file behind: %s", leftover)
            if on_progress and summary.cases % 500 == 0:
                summary.seconds = time.monotonic() - start
                on_progress(summary)
        _fuzz_cli(cli_cases, np.random.default_rng([seed, 1]), seeds, proto_share, Path(tmp), out, summary)
    summary.seconds = time.monotonic() - start
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    (out / "summary.md").write_text(summary.markdown())
    return summary


def _record(summary: Summary, finding: Finding, data: bytes, name: str, mutation: str, out: Path) -> None:
    summary.outcomes[f"FINDING:{finding.stage}"] += 1
    key = _finding_key(finding)
    item = summary.findings.get(key)
    if item is None:
        digest = hashlib.sha256(data).hexdigest()[:12]
        file = out / f"finding-{len(summary.findings):03d}-{digest}.onnx"
        file.write_bytes(data)
        item = summary.findings[key] = {
            "key": key, "count": 0, "file": str(file), "seed": name, "mutation": mutation,
            "detail": finding.detail, "traceback": finding.tb,
        }
        log.warning("finding %s: %s", key, finding.detail)
    item["count"] += 1


def _fuzz_cli(count: int, rng: np.random.Generator, seeds: dict[str, bytes], proto_share: float, tmp: Path,
              out: Path, summary: Summary) -> None:
    """`count` cases through the real command line, each checked against the API's answer."""
    api_dir, cli_dir = tmp / "api", tmp / "cli"
    api_dir.mkdir(exist_ok=True)
    cli_dir.mkdir(exist_ok=True)
    for _ in range(count):
        name, data, mutation = random_case(rng, seeds, proto_share)
        try:
            status = run_case(data, api_dir).status
        except Finding as finding:
            _record(summary, finding, data, name, mutation, out)
            continue
        try:
            run_cli_case(data, cli_dir, status)
            summary.outcomes[f"cli:{status}"] += 1
        except Finding as finding:
            _record(summary, finding, data, name, mutation + " (command line)", out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of cases to run")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the numpy Generator drawing the cases")
    parser.add_argument("--out", type=Path, default=Path("fuzz-report"), help="folder for the summary and reproducers")
    parser.add_argument("--proto-share", type=float, default=0.5,
                        help="fraction of cases whose parsed model is mutated before any byte mutation")
    parser.add_argument("--cli-cases", type=int, default=0,
                        help="after the in-process cases, run this many through `python -m bnfold convert`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bnfold").setLevel(logging.CRITICAL)

    def progress(summary: Summary) -> None:
        print(f"{summary.cases} cases, {summary.seconds:.0f} s, {dict(summary.outcomes)}", flush=True)

    summary = fuzz(args.cases, args.time_limit, args.seed, args.out, progress, args.proto_share, args.cli_cases)
    summary_args = vars(args) | {"out": str(args.out)}
    (args.out / "args.json").write_text(json.dumps(summary_args, indent=2))
    print(summary.markdown())
    return 1 if summary.findings else 0


if __name__ == "__main__":
    sys.exit(main())
