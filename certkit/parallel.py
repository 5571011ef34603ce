"""The one executor of certkit: map a pure, module-level task function over argument tuples, in this process,
with joblib, or on a Dask cluster, yielding results as they finish.

Used by ensemble training (one task per member) and by the compare grid (one task per cell). Results never
depend on the backend: every task seeds itself from its own arguments (:func:`certkit.seeding.derive_seed`),
so the same tasks give bit-identical results with ``n_jobs=1``, joblib's ``loky`` workers, a local Dask
cluster or a remote one.

Backends (:func:`map_tasks`):

* ``scheduler=None, n_jobs=1``: a plain loop in this process (no pickling; exceptions propagate);
* ``scheduler=None, n_jobs=k`` (or ``-1``: all cores): joblib ``Parallel`` with ``backend`` (``loky`` by
  default), results in completion order;
* ``scheduler="local-cluster"``: a Dask ``LocalCluster`` of ``max(1, n_jobs)`` worker processes, one thread
  each, started and closed here;
* ``scheduler="tcp://host:port"`` or a :class:`distributed.Client`: an existing Dask cluster (its workers must
  see the same file paths).

>>> sorted(map_tasks(pow, [(2, 3), (3, 2)]))
[8, 9]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from joblib import Parallel, delayed

from certkit._validation import check_choice
from certkit.errors import InputError

__all__ = ["BACKENDS", "LOCAL_CLUSTER", "check_backend", "check_n_jobs", "check_scheduler", "keep_torch_threads",
           "map_tasks"]

#: joblib backends accepted by :func:`map_tasks`
BACKENDS = ("loky", "multiprocessing", "threading")
#: the ``scheduler`` value that starts a Dask LocalCluster of ``n_jobs`` worker processes
LOCAL_CLUSTER = "local-cluster"


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Run a parallel numba kernel and leave torch's intra-op thread count as it was.

    numba's OpenMP threading layer shares the process's OpenMP runtime with torch on CPU: when the layer starts
    (the first parallel kernel of the process, or ``numba.get_num_threads()``) after torch's thread pool is up,
    it sets the OpenMP thread count to numba's, so a user's ``torch.set_num_threads(1)`` silently became 2
    after a certification, and the next torch work ran up to 20x slower on a loaded machine
    (benchmarks/README.md, "Sample-specific vs fixed sigma"). Every parallel kernel of certkit (Clopper-Pearson
    bounds, CERTIFY, storage, aggregation; and storage's ``numba.get_num_threads()`` call) runs inside this
    context (``tests/test_parallel.py``). It restores a process-wide setting: a thread that changes torch's
    thread count while another runs a kernel may see its change undone.

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with keep_torch_threads():
    ...     torch.set_num_threads(before + 1)
    >>> torch.get_num_threads() == before
    True
    """
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def check_n_jobs(n_jobs: Any) -> int:
    """``n_jobs`` as an int: ``>= 1``, or negative for joblib's "all cores but ..." (InputError otherwise)."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or int(n_jobs) == 0:
        raise InputError(f"n_jobs must be a non-zero integer (>= 1, or -1 for all cores), got {n_jobs!r}")
    return int(n_jobs)


def check_backend(backend: Any) -> str:
    """A joblib backend name from :data:`BACKENDS`."""
    if not isinstance(backend, str):
        raise InputError(f"backend must be a string, got {backend!r}")
    return check_choice(backend, BACKENDS, "joblib backend")


def check_scheduler(scheduler: Any) -> Any:
    """``None``, ``"local-cluster"``, a ``tcp://``-style address or a :class:`distributed.Client`."""
    if scheduler is None or scheduler == LOCAL_CLUSTER:
        return scheduler
    if isinstance(scheduler, str):
        if "://" in scheduler and scheduler.split("://", 1)[1].strip():
            return scheduler.strip()
    else:
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - dask is optional
            Client = None  # noqa: N806
        if Client is not None and isinstance(scheduler, Client):
            return scheduler
    raise InputError(f"scheduler must be {LOCAL_CLUSTER!r}, an address such as 'tcp://host:8786' or a "
                     f"distributed.Client, got {scheduler!r}")


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - dask is a test dependency
        raise InputError("a Dask scheduler needs Dask distributed, which is not installed: "
                         "pip install 'certkit[dask]'") from exc
    return distributed


def connect(scheduler: Any, timeout: float = 10.0) -> tuple[Any, bool]:
    """A connected :class:`distributed.Client` with at least one worker, and whether the caller owns it
    (must close it). ``scheduler`` is an address or a Client."""
    distributed = _distributed()
    if isinstance(scheduler, distributed.Client):
        client, own, where = scheduler, False, getattr(scheduler.scheduler, "address", repr(scheduler))
    else:
        where = check_scheduler(scheduler)
        try:
            client = distributed.Client(where, timeout=f"{timeout}s", set_as_default=False)
        except Exception as exc:
            raise InputError(f"cannot connect to the Dask scheduler at {where!r} within {timeout:g} s "
                             f"({type(exc).__name__}: {exc}); is it running and reachable?") from exc
        own = True
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception as exc:
        if own:
            client.close()
        raise InputError(f"the Dask scheduler at {where!r} has no workers (waited {timeout:g} s); start some "
                         f"with `dask worker {where}`") from exc
    return client, own


def _dask_map(fn: Callable[..., Any], tasks: Sequence[tuple], scheduler: Any, n_jobs: int, timeout: float,
              names: Sequence[str]) -> Iterator[Any]:
    distributed = _distributed()
    cluster = None
    if scheduler == LOCAL_CLUSTER:
        cluster = distributed.LocalCluster(n_workers=max(1, n_jobs), threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client, own = distributed.Client(cluster, set_as_default=False), True
    else:
        client, own = connect(scheduler, timeout)
    futures: list[Any] = []
    try:
        token = os.urandom(4).hex()
        keys = [f"certkit-{name}-{token}" for name in names]
        futures = client.map(fn, *[list(col) for col in zip(*tasks)], key=keys, pure=False)
        for fut in distributed.as_completed(futures, loop=client.loop):
            yield fut.result()
    finally:
        if futures:
            with contextlib.suppress(Exception):
                client.cancel(futures)
        if own:
            client.close()
        if cluster is not None:
            cluster.close()


def map_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], *, n_jobs: int = 1, backend: str = "loky",
              scheduler: Any = None, timeout: float = 10.0, names: Sequence[str] | None = None) -> Iterator[Any]:
    """Yield ``fn(*task)`` for every task, in completion order (see the module docstring for the backends).

    Args:
        fn: a module-level function (joblib and Dask pickle it by reference).
        tasks: argument tuples.
        n_jobs: joblib workers, or the size of a ``local-cluster``.
        backend: joblib backend (:data:`BACKENDS`).
        scheduler: ``None`` (joblib / in process), ``"local-cluster"``, an address or a Dask Client.
        timeout: seconds to wait for a remote scheduler and its first worker.
        names: one readable name per task for Dask task keys (default: the task's position).
    """
    n_jobs = check_n_jobs(n_jobs)
    backend = check_backend(backend)
    scheduler = check_scheduler(scheduler)
    tasks = list(tasks)
    if not tasks:
        return
    if scheduler is not None:
        names = [str(i) for i in range(len(tasks))] if names is None else list(names)
        yield from _dask_map(fn, tasks, scheduler, n_jobs, timeout, names)
    elif n_jobs == 1:
        for task in tasks:
            yield fn(*task)
    else:
        yield from Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")(
            delayed(fn)(*task) for task in tasks)
