"""The one executor (certkit.parallel.map_tasks): in process, joblib and Dask give the same results."""

from __future__ import annotations

import os

import pytest

from certkit.errors import InputError, UnknownNameError
from certkit.parallel import check_backend, check_n_jobs, check_scheduler, map_tasks

TASKS = [(b, e) for b in range(2, 5) for e in range(3)]
EXPECTED = sorted(pow(b, e) for b, e in TASKS)


@pytest.mark.parametrize("kw", [{}, {"n_jobs": 2}, {"n_jobs": 2, "backend": "threading"}])
def test_in_process_and_joblib_give_every_result(kw):
    assert sorted(map_tasks(pow, TASKS, **kw)) == EXPECTED


def test_a_local_cluster_runs_in_real_worker_processes_with_the_same_results():
    pytest.importorskip("distributed")
    pids = set(map_tasks(eval, [("__import__('os').getpid()",)] * 4, scheduler="local-cluster", n_jobs=2,
                         names=[f"pid-{i}" for i in range(4)]))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert sorted(map_tasks(pow, TASKS, scheduler="local-cluster", n_jobs=2)) == EXPECTED


def test_no_tasks_is_no_results():
    assert list(map_tasks(pow, [], n_jobs=2)) == []


@pytest.mark.parametrize("value", [0, 1.0, True, "2"])
def test_bad_n_jobs(value):
    with pytest.raises(InputError, match="n_jobs must be a non-zero integer"):
        check_n_jobs(value)


def test_bad_backend_lists_the_choices():
    with pytest.raises(UnknownNameError, match="loky"):
        check_backend("nosuch")


@pytest.mark.parametrize("value", ["localhost", "tcp://", 5, object()])
def test_bad_scheduler(value):
    with pytest.raises(InputError, match="scheduler must be 'local-cluster'"):
        check_scheduler(value)


def test_an_unreachable_scheduler_is_a_clear_error():
    pytest.importorskip("distributed")
    with pytest.raises(InputError, match="cannot connect to the Dask scheduler"):
        list(map_tasks(pow, TASKS, scheduler="tcp://127.0.0.1:1", timeout=1.0))


_THREADS_SCRIPT = """
import sys
import numba, numpy as np, torch
torch.set_num_threads(1)
torch.get_num_threads()  # torch's pool is up (as after any torch work); numba's OpenMP layer is not
from certkit.certify.radius import _cohen_certify_kernel, cohen_certify_counts
from certkit.certify.results import CertificationResult
from certkit.certify.storage import StorageCertifier
one = np.ones(1)
rng = np.random.default_rng(0)
n = 40
c = CertificationResult(label=rng.integers(0, 3, n), prediction=rng.integers(0, 3, n), radius=rng.random(n),
                        p_lower=np.full(n, 0.9), sigma=np.full(n, 0.25))
if sys.argv[1] == "bare-kernel":
    _cohen_certify_kernel(one * 900, one * 1000, one * 0.001, one * 0.25)
elif sys.argv[1] == "cohen":
    cohen_certify_counts(np.array([900]), np.array([1000]), 0.001, 0.25)
elif sys.argv[1] == "storage":
    StorageCertifier().certify(rng.random((n, 16)), c)
elif sys.argv[1] == "clopper":
    from certkit.certify.bounds import clopper_pearson
    clopper_pearson(rng.integers(0, 100, 5000), 100, 0.001)
elif sys.argv[1] == "bagging":
    from certkit.certify.aggregation import bagging_certify
    bagging_certify(rng.integers(0, 50, (n, 3)), n=1000, k=50)
elif sys.argv[1] == "fa":
    from certkit.certify.aggregation import Layout, fa_certify
    fa_certify(rng.normal(size=(6, n, 3)), Layout.fa(3, 2))
else:
    store = StorageCertifier().certify(rng.random((n, 16)), c).store  # kernels run, threads restored
    torch.set_num_threads(1)
    store.predict(rng.random((5, 16)))
    store.check_invariant()
print(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, numba.threading_layer())
"""


def _threads_after(call: str) -> tuple[int, int, str]:
    """torch's and numba's thread counts and numba's threading layer after ``call`` in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, call], capture_output=True, text=True, check=True,
                         env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    torch_threads, numba_threads, layer = out.stdout.split()
    return int(torch_threads), int(numba_threads), layer


@pytest.fixture(scope="module")
def bare_kernel_threads() -> tuple[int, int, str]:
    return _threads_after("bare-kernel")


@pytest.mark.parametrize("call", ["cohen", "storage", "predict", "clopper", "bagging", "fa"])
def test_certification_leaves_torch_thread_count_as_the_user_set_it(call, bare_kernel_threads):
    """numba's OpenMP layer raised torch's thread count (1 -> numba's) on the first parallel kernel of a
    process; every kernel of certkit runs inside keep_torch_threads. One fresh process per call, since only
    the first kernel of a process does it; the bare kernel shows the hazard is real on this machine."""
    if bare_kernel_threads[2] == "omp":  # the hazard exists with numba's OpenMP layer (not TBB / workqueue)
        assert bare_kernel_threads[:2] == (2, 2)  # the bare kernel changed torch's setting
    assert _threads_after(call)[:2] == (1, 2)
