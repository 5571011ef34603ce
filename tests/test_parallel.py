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
