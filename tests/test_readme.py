"""Every example of README.md runs as written (the rules are stated in the README's Development section).

1. Each ```python block runs on its own in a fresh interpreter, in README order, in one folder that
   at the start holds only ``model.onnx`` (the shipped default model) and ``digits.npz`` (a trained
   checkpoint), with only the base install: importing an extra (torch, keras, tensorflow, matplotlib,
   dask, ...) fails as if it were not installed. The whole sequence runs twice in that folder, so a
   block that writes a file must overwrite it explicitly.
2. Each ```py block (an example that needs an extra) runs once the same way, with the extras
   available, in a second folder seeded like rule 1; a block importing a package that is not
   installed here is skipped, naming the package.
3. Shell examples: in ```sh blocks every line that is not empty or a comment is a command; in
   ```console blocks the lines starting with ``$ `` are (the other lines are output). A line ending
   in a backslash continues on the next. Commands run once, in README order, with ``sh`` in their
   own folder seeded like rule 1, with only the base install, and must exit 0, or N when the line
   ends with the comment ``# exit N``. A fence whose info string holds ``extras`` (```sh extras)
   runs instead with the extras available, in the folder of rule 2, in README order among the
   ```py blocks (so it may use their files). A fence whose info string holds ``not-run``
   (```sh not-run) is not run: installs, CI commands, commands that need TensorFlow or a network.
4. Plain ``` blocks (outputs, formulas) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The optional dependencies: a README example that needs one of them without a ```py fence fails.
EXTRAS = ("torch", "keras", "tensorflow", "tf_keras", "tf2onnx", "matplotlib", "dask", "distributed", "sklearn",
          "onnxscript", "onnxoptimizer", "onnxsim", "hypothesis", "pytest")
_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
_FENCE = re.compile(r"^```(\S*)(.*)$")
TIMEOUT = 300

# Runs at start-up of every interpreter of rules 1 and 3 (as `sitecustomize`): imports of the
# extras fail with ModuleNotFoundError, exactly as in an environment without them, so libraries
# that probe for them optionally behave as they would there.
_BLOCKER = """
import sys

class _ReadmeExtrasBlocker:
    blocked = frozenset({names!r})

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}} (an optional extra, blocked by the README test:"
                                      " use a ```py fence for examples that need it)", name=name)
        return None

sys.meta_path.insert(0, _ReadmeExtrasBlocker())
"""


@dataclass(frozen=True)
class Block:
    lang: str
    info: str
    line: int
    text: str

    @property
    def label(self) -> str:
        return f"README.md:{self.line}"


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    exit_code: int


def readme_blocks() -> list[Block]:
    blocks, current, start, lang, info = [], None, 0, "", ""
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if current is None and match:
            current, start, lang, info = [], number, match.group(1), match.group(2)
        elif current is not None and line.strip() == "```":
            blocks.append(Block(lang, info.strip(), start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"README.md:{start}: unclosed code fence"
    return blocks


def shell_commands(block: Block) -> list[Command]:
    lines = block.text.splitlines()
    if block.lang == "console":
        picked = []
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                picked.append((i, line[2:]))
            elif picked and picked[-1][1].endswith("\\"):
                picked[-1] = (picked[-1][0], picked[-1][1] + "\n" + line)
    else:
        picked, pending = [], None
        for i, line in enumerate(lines):
            if pending is not None:
                pending = (pending[0], pending[1] + "\n" + line)
            elif line.strip() and not line.lstrip().startswith("#"):
                pending = (i, line)
            if pending is not None and not line.endswith("\\"):
                picked.append(pending)
                pending = None
        if pending is not None:
            picked.append(pending)
    commands = []
    for i, text in picked:
        match = _EXIT.search(text)
        commands.append(Command(block.line + 1 + i, text, int(match.group(1)) if match else 0))
    return commands


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]

def _shell(block: Block, tag: str | None) -> bool:
    words = block.info.split()
    if block.lang not in ("sh", "console") or "not-run" in words:
        return False
    return tag in words if tag else "extras" not in words


PY_EXTRAS = [b for b in BLOCKS if b.lang == "py" or _shell(b, "extras")]
SHELL = [(b, c) for b in BLOCKS if _shell(b, None) for c in shell_commands(b)]


def default_model() -> Path:
    """The shipped default model: the first ``.onnx`` in ``models/`` by name, without "folded" in it."""
    candidates = sorted(p for p in (ROOT / "models").glob("*.onnx") if "folded" not in p.name)
    assert candidates, "no default model in models/"
    return candidates[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint made by the trainer (2 epochs: the examples need a trained model, not a good one)."""
    path = tmp_path_factory.mktemp("checkpoint") / "digits.npz"
    result = subprocess.run([sys.executable, "-m", "bnfold", "train", "--epochs", "2", "-o", str(path)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return path


def _seed(folder: Path, checkpoint: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(default_model(), folder / "model.onnx")
    shutil.copyfile(checkpoint, folder / "digits.npz")
    return folder


def _env(tmp: Path, *, block_extras: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if block_extras:
        site = tmp / "readme_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_BLOCKER.format(names=EXTRAS), encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(site), env.get("PYTHONPATH", "")] if p)
    return env


def _run_python(block: Block, folder: Path, env: dict[str, str], run: int) -> None:
    result = subprocess.run([sys.executable, "-c", block.text], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, (
        f"{block.label} (run {run}) failed with exit {result.returncode}:\n{block.text}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )


def test_readme_has_examples_of_each_kind():
    assert PYTHON and SHELL, "README parsing found no ```python blocks or no runnable shell commands"


def test_extras_blocker_blocks(tmp_path):
    """The healthy counterpart of rule 1: the blocker itself makes an extra unimportable, and only extras."""
    env = _env(tmp_path, block_extras=True)
    code = "import numpy, onnx, onnxruntime, click\ntry:\n    import torch\nexcept ModuleNotFoundError:\n" \
           "    raise SystemExit(3)\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 3, result.stderr


def test_python_blocks_run_with_the_base_install(tmp_path, checkpoint):
    folder = _seed(tmp_path / "work", checkpoint)
    env = _env(tmp_path, block_extras=True)
    for run in (1, 2):
        for block in PYTHON:
            _run_python(block, folder, env, run)


def _missing_imports(block: Block) -> list[str]:
    import importlib.util

    names = re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", block.text, flags=re.MULTILINE)
    return sorted({name for name in names if importlib.util.find_spec(name) is None})


@pytest.fixture(scope="module")
def extras_folder(tmp_path_factory, checkpoint) -> Path:
    """One folder for all ```py blocks, so that earlier blocks may prepare files for later ones."""
    return _seed(tmp_path_factory.mktemp("readme_py") / "work", checkpoint)


@pytest.mark.parametrize("block", PY_EXTRAS, ids=[b.label for b in PY_EXTRAS])
def test_py_blocks_run_with_extras(tmp_path, extras_folder, block):
    env = _env(tmp_path, block_extras=False)
    if block.lang != "py":
        for command in shell_commands(block):
            _run_shell(command, extras_folder, env)
        return
    missing = _missing_imports(block)
    if missing:
        pytest.skip(f"{block.label} needs {', '.join(missing)}, not installed here")
    _run_python(block, extras_folder, env, 1)


def _run_shell(command: Command, folder: Path, env: dict[str, str]) -> None:
    result = subprocess.run(["sh", "-c", command.text], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == command.exit_code, (
        f"README.md:{command.line}: `{command.text}` exited {result.returncode}, expected {command.exit_code}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )


def test_shell_examples_run(tmp_path, checkpoint):
    folder = _seed(tmp_path / "work", checkpoint)
    env = _env(tmp_path, block_extras=True)
    for _, command in SHELL:
        _run_shell(command, folder, env)


def test_shell_rules_parse_as_documented():
    """Rule 3 on a made-up block: prompts, output lines, continuations, comments, expected exit codes."""
    console = Block("console", "", 10, textwrap.dedent("""\
        $ bnfold convert a.onnx -o b.onnx
        a.onnx -> b.onnx
        $ bnfold verify a.onnx \\
            b.onnx   # exit 1
        BN folded 0 of 0
        """))
    assert [(c.line, c.text, c.exit_code) for c in shell_commands(console)] == [
        (11, "bnfold convert a.onnx -o b.onnx", 0),
        (13, "bnfold verify a.onnx \\\n    b.onnx   # exit 1", 1),
    ]
    sh = Block("sh", "", 1, "# a comment\nbnfold train -o x.npz   # trains\n\nbnfold export x.npz \\\n  -o y.onnx\n")
    assert [(c.line, c.exit_code) for c in shell_commands(sh)] == [(3, 0), (5, 0)]


def test_a_failing_example_fails_the_test(tmp_path):
    """The harness's own failure path: a command with the wrong exit code and a raising block fail."""
    env = _env(tmp_path, block_extras=True)
    with pytest.raises(AssertionError, match="exited 2, expected 0"):
        _run_shell(Command(1, "bnfold convert missing.onnx -o out.onnx", 0), tmp_path, env)
    _run_shell(Command(1, "bnfold convert missing.onnx -o out.onnx   # exit 2", 2), tmp_path, env)
    with pytest.raises(AssertionError, match="failed with exit 1"):
        _run_python(Block("python", "", 1, "import torch\n"), tmp_path, env, 1)
