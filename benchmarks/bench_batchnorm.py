"""Time BatchNorm forward + backward (training mode): bnfold's NumPy code against PyTorch CPU.

Both run on one thread, in the same process, on the same float32 data:

- (256, 1024): 256 samples, 1024 features on axis 1 (``BatchNorm1d``);
- (64, 64, 32, 32): channels first (``BatchNorm2d``).

Each repeat is one training-mode forward and one backward (dx, dgamma, dbeta); NumPy and PyTorch
repeats alternate so that both see the same machine load. The script prints the median time of
each and the ratio numpy / torch (target: within 1.5x).

    python benchmarks/bench_batchnorm.py [--repeats N]

Needs the interop extra (torch). ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` in the environment
can change NumPy's speed; the script reports them if set and leaves them alone.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads its BLAS

import argparse
import contextlib
import statistics
import sys
import time

import numpy as np

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # the environment variables above already pin BLAS to one thread
    threadpool_limits = None

import torch

from bnfold.nn.batchnorm import BatchNorm

SHAPES = [(256, 1024), (64, 64, 32, 32)]


def _median_seconds(steps, repeats: int, warmup: int = 3) -> list[float]:
    """Median time of each step; the steps alternate so that both see the same machine load."""
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def _numpy_step(x: np.ndarray, dy: np.ndarray):
    bn = BatchNorm(x.shape[1], convention="torch")

    def step() -> None:
        bn.forward(x, training=True)
        bn.backward(dy)

    return step


def _torch_step(x: np.ndarray, dy: np.ndarray):
    module = (torch.nn.BatchNorm1d if x.ndim == 2 else torch.nn.BatchNorm2d)(x.shape[1])
    module.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    def step() -> None:
        xt.grad = None
        module.weight.grad = None
        module.bias.grad = None
        module(xt).backward(dyt)

    return step


def _check_same_result(x: np.ndarray, dy: np.ndarray) -> float:
    """Max |dx_numpy - dx_torch| / max |dx_torch|: the two sides compute the same thing."""
    bn = BatchNorm(x.shape[1], convention="torch")
    bn.forward(x, training=True)
    dx = bn.backward(dy)
    module = (torch.nn.BatchNorm1d if x.ndim == 2 else torch.nn.BatchNorm2d)(x.shape[1])
    xt = torch.from_numpy(x).requires_grad_(True)
    module(xt).backward(torch.from_numpy(dy))
    ref = xt.grad.numpy()
    return float(np.max(np.abs(dx - ref)) / np.max(np.abs(ref)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    limiter = threadpool_limits(1) if threadpool_limits else contextlib.nullcontext()
    print(f"numpy {np.__version__}, torch {torch.__version__}, 1 thread each, float32, "
          f"median of {args.repeats}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"note: {var}={os.environ[var]} is set in the environment (affects NumPy's BLAS)")
    rng = np.random.default_rng(0)
    ratios = []
    with limiter:
        for shape in SHAPES:
            x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            t_numpy, t_torch = _median_seconds([_numpy_step(x, dy), _torch_step(x, dy)],
                                               args.repeats)
            ratios.append(t_numpy / t_torch)
            print(f"{str(shape):>18}  numpy {t_numpy * 1e3:8.2f} ms   torch {t_torch * 1e3:8.2f} ms"
                  f"   numpy/torch {t_numpy / t_torch:5.2f}x   (dx rel. diff "
                  f"{_check_same_result(x, dy):.1e})")
    print(f"worst ratio numpy/torch: {max(ratios):.2f}x (target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
