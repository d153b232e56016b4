"""`bnfold train`: the default run, the printed three-way evaluation, the slow-EMA warning,
checkpoint output rules, and one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from bnfold.cli import main
from bnfold.nn.checkpoint import load_checkpoint
from bnfold.nn.data import load_digits
from bnfold.nn.training import accuracy, recompute_statistics

EPOCH_LINE = re.compile(
    r"^epoch +(\d+)/(\d+) +steps +(\d+) +loss ([\d.]+) +test accuracy: batch stats +([\d.]+)% +moving stats +([\d.]+)% +recomputed +([\d.]+)%$"
)


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["train", *args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def epochs_of(out: str) -> list[tuple[float, ...]]:
    return [tuple(float(v) for v in m.groups()) for line in out.splitlines() if (m := EPOCH_LINE.match(line))]


def test_default_run_reaches_95_percent_and_saves_a_loadable_checkpoint(capsys, tmp_path):
    output = tmp_path / "digits.npz"
    code, out, err = run(capsys, "-o", str(output))
    assert code == 0, err
    rows = epochs_of(out)
    assert [int(r[0]) for r in rows] == list(range(1, 21))  # 20 epochs by default
    assert rows[-1][2] == 20 * 43  # ceil(1347 / 32) = 43 steps per epoch
    final_moving = rows[-1][5]
    assert final_moving >= 95.0
    assert "warning" not in err
    model = load_checkpoint(output)
    digits = load_digits()
    # The checkpoint holds the moving statistics the last line was computed with.
    assert 100 * accuracy(model, digits.x_test, digits.y_test) == pytest.approx(final_moving, abs=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npz"]


def test_slow_momentum_trap_is_visible_and_warned_about(capsys):
    code, out, err = run(capsys, "--epochs", "2", "--batch-size", "128", "--momentum", "0.99")
    assert code == 0, err
    batch, moving, recomputed = epochs_of(out)[-1][4:]
    # See tests/nn/test_train.py::test_slow_moving_average_trap for the measured margins.
    assert recomputed - moving >= 4.0
    assert "warning: moving statistics trail recomputed ones" in err
    code, out, err = run(capsys, "--epochs", "2", "--batch-size", "128", "--momentum", "0.9")
    assert code == 0
    assert abs(epochs_of(out)[-1][6] - epochs_of(out)[-1][5]) <= 2.5
    assert "warning" not in err


def test_recompute_stats_saves_population_statistics(capsys, tmp_path):
    output = tmp_path / "m.npz"
    code, out, err = run(capsys, "--epochs", "1", "--momentum", "0.99", "--recompute-stats", "-o", str(output))
    assert code == 0, err
    recomputed_line = epochs_of(out)[-1][6]
    model = load_checkpoint(output)
    digits = load_digits()
    assert 100 * accuracy(model, digits.x_test, digits.y_test) == pytest.approx(recomputed_line, abs=0.05)
    before = [bn.moving_mean.copy() for _, bn in model.batchnorms()]
    recompute_statistics(model, digits.x_train)  # idempotent: the saved statistics are already exact
    for mean, (_, bn) in zip(before, model.batchnorms()):
        np.testing.assert_allclose(bn.moving_mean, mean, rtol=1e-12, atol=1e-12)


def test_torch_convention_and_cumulative_average(capsys):
    code, out, err = run(capsys, "--epochs", "2", "--convention", "torch", "--momentum", "cumulative", "--hidden", "32")
    assert code == 0, err
    assert "BN torch momentum cumulative" in out
    assert len(epochs_of(out)) == 2


def test_refuses_to_overwrite_without_force(capsys, tmp_path):
    output = tmp_path / "exists.npz"
    output.write_bytes(b"keep me")
    code, out, err = run(capsys, "--epochs", "1", "-o", str(output))
    assert code == 2
    assert err.strip() == f"bnfold: error: {output}: already exists; use --force to overwrite"
    assert out == ""  # refused before training
    assert output.read_bytes() == b"keep me"
    code, _, err = run(capsys, "--epochs", "1", "--hidden", "8", "-o", str(output), "--force")
    assert code == 0, err
    assert len(load_checkpoint(output).layers) == 4


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--hidden", "128,x"), "--hidden '128,x'"),
        (("--hidden", "0"), "--hidden '0'"),
        (("--lr", "-1"), "--lr -1.0"),
        (("--lr", "nan"), "--lr nan"),
        (("--momentum", "1.5"), "must lie in [0, 1]"),
        (("--momentum", "cumulative"), "only the torch convention"),
        (("--batch-size", "1"), "--batch-size"),
        (("--optimizer", "rmsprop"), "--optimizer"),
        (("--seed", "-1"), "--seed"),
        (("--hidden", ""), "--hidden ''"),
        (("--lr", "1e6", "--epochs", "1"), "training diverged in epoch 1"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, args, fragment):
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), err
    assert fragment in lines[0]


def test_help_documents_every_option():
    from bnfold.cli.train import command

    for param in command.params:
        assert param.help, param.name
    assert "three ways" in command.help


def test_runs_as_a_module_without_scikit_learn(tmp_path):
    # sys.modules[name] = None makes any `import sklearn` fail: training needs only the shipped data.
    script = "import sys; sys.modules['sklearn'] = None; from bnfold.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script, "train", "--epochs", "1", "--hidden", "16"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(epochs_of(result.stdout)) == 1
    assert result.stderr == ""  # no progress bar and no label when stderr is not a terminal
