"""`bnfold train --plot`: a PNG of loss and the three test accuracies; several momenta on one figure;
a one-line error naming the `plot` extra when matplotlib is missing."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bnfold.cli import main

pytest.importorskip("matplotlib")

# matplotlib's default colour cycle: C0, C1, C2 are the first, second and third run.
COLORS = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E), "C2": (0x2C, 0xA0, 0x2C)}


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def color_pixels(path, rgb) -> int:
    from matplotlib.image import imread

    image = (imread(path)[..., :3] * 255).round()
    # Within 12 of 255 per channel: antialiasing blends edges, line centres keep the colour.
    return int(np.all(np.abs(image - np.array(rgb)) <= 12, axis=-1).sum())


def test_plot_one_run(tmp_path, capsys):
    path = tmp_path / "curves.png"
    code, out, _ = run(capsys, "train", "--epochs", "2", "--hidden", "32", "--plot", str(path))
    assert code == 0
    assert out.splitlines()[-1].endswith(f"plot {path}")
    data = path.read_bytes()
    width, height = png_size(data)
    assert 600 <= width <= 3000 and 200 <= height <= 2000, (width, height)
    assert len(data) > 10_000  # axes, text and curves, not an empty canvas
    assert color_pixels(path, COLORS["C0"]) > 200
    assert color_pixels(path, COLORS["C1"]) == 0 and color_pixels(path, COLORS["C2"]) == 0


def test_plot_several_momenta_on_one_figure(tmp_path, capsys):
    path = tmp_path / "curves.png"
    code, out, _ = run(capsys, "train", "--epochs", "2", "--hidden", "32", "--momentum", "0.9,0.99,0.999",
                       "--plot", str(path))
    assert code == 0
    assert out.count("digits: 1347 train") == 3  # one run per momentum
    final = out.splitlines()[-1]
    assert "momentum 0.9:" in final and "momentum 0.99:" in final and "momentum 0.999:" in final
    for name in ("C0", "C1", "C2"):
        assert color_pixels(path, COLORS[name]) > 200, name


def test_plot_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    code, _, err = run(capsys, "train", "--epochs", "1", "--plot", str(path))
    assert code == 2 and "use --force" in err and path.read_bytes() == b"old"


def test_several_momenta_with_one_checkpoint_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--momentum", "0.9,0.99", "-o", str(tmp_path / "x.npz"))
    assert code == 2 and "give a single --momentum" in err
    assert not (tmp_path / "x.npz").exists()


def test_quiet_train_prints_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "-q", "train", "--epochs", "2", "--hidden", "32", "-o", str(tmp_path / "d.npz"))
    assert code == 0
    (line,) = out.splitlines()
    assert line.startswith("test accuracy with moving statistics") and line.endswith(f"saved {tmp_path / 'd.npz'}")


def test_without_matplotlib_one_line_error_naming_the_extra(tmp_path):
    code = textwrap.dedent(f"""
        import sys

        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "matplotlib":
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, Missing())
        sys.argv = ["bnfold", "train", "--plot", {str(tmp_path / 'c.png')!r}]
        from bnfold.cli import main
        main()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("bnfold: error: --plot needs matplotlib, which is in the optional extra 'plot':"
                                     " pip install 'bnfold[plot]'")
    assert result.stdout == ""  # refused before training
    assert not (tmp_path / "c.png").exists()


def test_training_curves_api(tmp_path):
    from bnfold.plots import TrainingRun, training_curves

    runs = [TrainingRun("a", [10, 20], [1.0, 0.5], [0.8, 0.9], [0.6, 0.85], [0.8, 0.9])]
    training_curves(runs, tmp_path / "c.png")
    assert png_size((tmp_path / "c.png").read_bytes())[0] >= 600
    with pytest.raises(ValueError):
        training_curves([], tmp_path / "d.png")
