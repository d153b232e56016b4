"""bnfold.recalibrate on a Dask cluster (``distributed.Client(...).get_executor()``) gives the
statistics of one process: the shards are pickled to the workers and merged exactly."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.recalibration import recalibrate

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    # Two worker processes: the tasks really travel pickled, as they would to other machines.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


@pytest.mark.parametrize("method", ["exact", "batch"])
def test_local_cluster_gives_the_statistics_of_one_process(rk, tmp_path, client, method):
    rng = np.random.default_rng(11)
    model = rk.residual(rng)
    x = rk.data(model, 120, rng)
    # Files, as on a real cluster: each task carries paths and row ranges, not the arrays.
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    np.savez(paths[0], x=x[:50])
    np.savez_compressed(paths[1], x=x[50:])
    local = recalibrate(model, paths, method=method, batch_size=16)
    remote = recalibrate(model, paths, method=method, batch_size=16, executor=client.get_executor(), shards=4)
    for a, b in zip(local.changes, remote.changes):
        # Same batches (shards are whole batches); exact: a different Chan merge tree, equal to
        # float64 rounding; batch: sums in a different order.
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.var, a.var, rtol=1e-12)
