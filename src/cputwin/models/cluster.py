"""Fitting a `TwinStack` on a Dask cluster, for data one machine should not train alone;
and running many independent tasks (one twin per host) in local processes or on Dask.

The frame is cut into partitions of whole runs (a run never spans two partitions, so lags
and windows never need another partition's rows); each worker builds its partitions'
feature matrices and keeps them. The stack's honest fit (`TwinStack.fit_from`) runs
unchanged on the client: the same fold plan by global row index, LightGBM bases trained
with `lightgbm.dask` on the rows the plan names, out-of-fold predictions computed where
the rows live, the same meta-model. The result is an ordinary stack whose boosters are
plain LightGBM models, so its artifact serves and predicts like any other.

Differences from one machine, on purpose: LightGBM's Dask interface cannot stop early
(each worker would stop on its own validation rows: LightGBM issue #6197), so bases keep
their set number of rounds (`--max-rounds` caps them); and data-parallel trees bin and
split on histograms merged across workers, so the boosters are close to, not equal to,
one machine's.

A worker can die in the middle of a fit (LightGBM's network training crashes now and then,
a worker runs out of memory): the fit, or prediction, that lost it starts again once the
cluster has its workers back, with the partitions built anew, up to `WORKER_LOSS_RETRIES`
times, each loss reported as a warning.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import polars as pl

from cputwin.errors import CputwinError, ModelError
from cputwin.features.engine import runs_are_contiguous
from cputwin.models.base import FittedBase, LightGBMModel, fit_base
from cputwin.models.stack import FEATURE_DTYPES, Progress, TwinStack
from cputwin.telemetry.schema import RUN_COLUMN

ROWS_PER_PARTITION = 250_000
WORKER_LOSS_RETRIES = 2  # fits or predictions started again after a worker died
WORKER_WAIT_S = 60  # how long to wait for a lost worker's replacement
T = TypeVar("T")
# The thread pools a task's libraries start: OpenMP (LightGBM), BLAS (the ridge bases), Polars
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "POLARS_MAX_THREADS")


@contextmanager
def connect(address: str) -> Iterator[Any]:
    """A Dask client: `local:N` starts a LocalCluster of N one-thread worker processes for
    the duration; anything else is the address of a running scheduler."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CputwinError("--dask needs Dask: pip install 'cputwin[dask]'") from None
    quiet_lightgbm()
    if address.startswith("local:"):
        try:
            n = int(address.removeprefix("local:"))
        except ValueError:
            n = 0
        if n < 1:
            raise CputwinError(f"--dask local:N needs a worker count N >= 1, got {address!r}")
        import dask

        # Dask caps OpenMP and BLAS in its workers to one thread, not Polars: cap all
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": 1
                              for k in THREAD_VARIABLES}), \
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                             dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            # LightGBM's network set-up prints to the worker's stdout, which a local
            # worker shares with us: send it to stderr, so `--json` stays one object.
            client.run(_stdout_to_stderr)
            yield client
        return
    try:
        client = Client(address, timeout=10)
    except (OSError, ValueError) as exc:  # unreachable; or not an address ('nope')
        raise CputwinError(f"cannot reach the Dask scheduler at {address!r} ({exc})") from None
    with client:
        yield client


def quiet_lightgbm() -> None:
    """lightgbm.dask reports through LightGBM's logger, which prints to stdout unless a
    logger is registered: route it to Python logging (silent below warnings)."""
    import lightgbm

    lightgbm.register_logger(logging.getLogger("lightgbm"))


def _stdout_to_stderr() -> None:
    sys.stdout.flush()
    os.dup2(2, 1)


def partition_by_run(frame: pl.DataFrame, n_parts: int) -> list[pl.DataFrame]:
    """Contiguous slices of whole runs with about equal row counts."""
    runs = frame[RUN_COLUMN]
    starts = np.flatnonzero((runs != runs.shift(1)).fill_null(True).to_numpy())
    bounds = np.append(starts, frame.height)
    want = np.linspace(0, frame.height, max(n_parts, 1) + 1)[1:-1]
    cuts = sorted(set(bounds[np.searchsorted(bounds, want)].tolist()) - {0, frame.height})
    edges = [0, *cuts, frame.height]
    return [frame.slice(a, b - a) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def fit_on_dask(stack: TwinStack, frame: pl.DataFrame, client: Any,
                progress: Progress | None = None, n_parts: int | None = None) -> TwinStack:
    """Fit `stack` on `frame` with the work spread over the cluster behind `client`."""
    stack.prepare(frame)
    if not runs_are_contiguous(frame[RUN_COLUMN]):
        raise ModelError("runs must each form one block of rows (as load_runs gives them)")
    workers = max(len(client.scheduler_info()["workers"]), 1)
    n_parts = n_parts or max(workers, -(-frame.height // ROWS_PER_PARTITION))
    rows = DaskRows(stack, partition_by_run(frame, n_parts), client)
    try:
        return stack.fit_from(rows, progress)
    finally:
        rows.release()


def _build_partition(stack: TwinStack, part: pl.DataFrame) -> dict[str, Any]:
    """On a worker: every base's (X, y) views of one partition, and its row facts."""
    from cputwin.models.stack import LocalRows

    local = LocalRows(stack, part)
    return {"views": local.views, "names": [m.names for m in local.mats],
            "valid": local.valid, "position": local.position, "n_in_run": local.n_in_run,
            "target": local.target, "workloads": local.workloads}


ROW_FACTS = ("valid", "position", "n_in_run", "target", "workloads")  # one entry per row


def _facts(built: dict[str, Any]) -> dict[str, Any]:
    return {k: built[k] for k in ("names", *ROW_FACTS)}


def _slice(built: dict[str, Any], j: int, rows: np.ndarray, part: str) -> np.ndarray:
    """On a worker: base j's training X (part "X") or y of some local rows, all views."""
    views = built["views"][j]
    if part == "X":
        return np.vstack([X[rows] for X, _ in views])
    return np.concatenate([y[rows] for _, y in views])


def _predict(built: dict[str, Any], j: int, rows: np.ndarray, model: dict[str, Any]) -> np.ndarray:
    """On a worker: a fitted base's predictions for some local rows (target view)."""
    from cputwin.models.base import base_from_dict

    return base_from_dict(model).predict(built["views"][j][0][0][rows])


class DaskRows:
    """Training rows partitioned over a Dask cluster (see `TrainingRows`)."""

    can_stop_early = False

    def __init__(self, stack: TwinStack, parts: list[pl.DataFrame], client: Any) -> None:
        self.stack, self.client, self.parts = stack, client, parts
        self.n_workers = len(client.scheduler_info()["workers"])
        self.built = self._build()
        facts = client.gather([client.submit(_facts, b) for b in self.built])
        self.names = facts[0]["names"]
        self.offsets = np.cumsum([0, *(f["valid"].size for f in facts)])
        for key in ROW_FACTS:
            setattr(self, key, np.concatenate([f[key] for f in facts]))

    def _build(self) -> list[Any]:
        return [self.client.submit(_build_partition, self.stack, self.client.scatter(part),
                                   pure=False) for part in self.parts]

    def _surviving(self, what: str, work: Callable[[], T]) -> T:
        """`work()`, started again (partitions rebuilt) when a worker died during it."""
        tries = 0
        while True:
            try:
                return work()
            except Exception as exc:
                if not worker_lost(exc):
                    raise
                tries += 1
                cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if tries > WORKER_LOSS_RETRIES:
                    raise ModelError(
                        f"a Dask worker died each of the {tries} times it was tried: {what} "
                        f"({cause}); see the workers' logs (memory limit, crash) or train on one "
                        "machine") from None
                warnings.warn(f"a Dask worker died while {what} ({cause}); starting it again "
                              f"({tries} of {WORKER_LOSS_RETRIES} retries)",
                              RuntimeWarning, stacklevel=2)
                self._recover()

    def _recover(self) -> None:
        """Wait for the cluster's workers to be back; build every partition anew (a lost
        worker took the partitions it held)."""
        try:
            self.client.wait_for_workers(self.n_workers, timeout=WORKER_WAIT_S)
        except TimeoutError:
            if not self.client.scheduler_info()["workers"]:
                raise ModelError(f"no Dask worker left after {WORKER_WAIT_S} s") from None
        stale, self.built = self.built, self._build()
        for future in stale:  # released, not cancelled: tasks of the lost fit may still read them
            future.release()

    def _local(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Global row indices (ascending) as (partition, local indices) pairs, in order."""
        rows = np.asarray(rows)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return [(p, rows[which == p] - self.offsets[p]) for p in np.unique(which)]

    def _dask_xy(self, j: int, rows: np.ndarray):
        import dask.array as da
        from dask import delayed

        n_views = len(self.stack.schema_.core_columns) if self.stack.base_specs_[j].pooled else 1
        width = len(self.names[j])
        xs, ys = [], []
        for p, local in self._local(rows):
            x = self.client.submit(_slice, self.built[p], j, local, "X")
            y = self.client.submit(_slice, self.built[p], j, local, "y")
            n = local.size * n_views
            xs.append(da.from_delayed(delayed(x), shape=(n, width),
                                      dtype=FEATURE_DTYPES[self.stack.feature_dtype]))
            ys.append(da.from_delayed(delayed(y), shape=(n,), dtype=float))
        return da.concatenate(xs), da.concatenate(ys)

    def fit(self, j: int, params: dict[str, Any], rows: np.ndarray, on_round) -> FittedBase:
        return self._surviving(f"fitting {self.stack.base_specs_[j].name}",
                               lambda: self._fit(j, params, rows))

    def _fit(self, j: int, params: dict[str, Any], rows: np.ndarray) -> FittedBase:
        spec = self.stack.base_specs_[j]
        if spec.learner != "lgbm":  # a ridge line: small enough to solve here
            X, y = self._dask_xy(j, rows)
            return fit_base(spec, params, X.compute(), y.compute(), self.names[j])
        from lightgbm import DaskLGBMRegressor

        X, y = self._dask_xy(j, rows)
        # without n_jobs, lightgbm.dask gives each worker as many threads as the worker has
        model = DaskLGBMRegressor(client=self.client,
                                  **{k: v for k, v in params.items() if k != "n_jobs"})
        model.fit(X, y, feature_name=self.names[j])
        return LightGBMModel(spec.name, self.names[j], model.booster_)

    def predict(self, j: int, model: FittedBase, rows: np.ndarray) -> np.ndarray:
        shipped = model.to_dict()

        def gather() -> np.ndarray:
            parts = [self.client.submit(_predict, self.built[p], j, local, shipped)
                     for p, local in self._local(rows)]
            return np.concatenate(self.client.gather(parts))

        return self._surviving(f"predicting with {self.stack.base_specs_[j].name}", gather)

    def fit_stopping(self, j, params, train, val, on_round):  # pragma: no cover
        raise ModelError("early stopping is not available on Dask")

    def release(self) -> None:
        self.client.cancel(self.built)


def worker_lost(exc: BaseException) -> bool:
    """Whether `exc` says a worker died under the work: its tasks were cancelled or killed,
    or (LightGBM's network training) a surviving worker lost its peer's socket."""
    from distributed.client import FutureCancelledError, FuturesCancelledError
    from distributed.scheduler import KilledWorker
    from lightgbm.basic import LightGBMError

    if isinstance(exc, FutureCancelledError | FuturesCancelledError | KilledWorker):
        return True
    return isinstance(exc, LightGBMError) and "Socket" in str(exc)



# ---------------------------------------------------------------- many independent tasks
Done = Callable[[str, int, int], None]  # (key just finished, how many done, how many in all)


def run_each(task: Callable[..., Any], calls: dict[str, tuple], jobs: int = 1,
             dask: str | None = None, done: Done | None = None) -> dict[str, Any]:
    """Run `task(*args, threads=T)` once per key: one after another here (`jobs` 1), in
    `jobs` local processes, or (`dask`) as one task each on a cluster's workers.

    Each call is independent, so one that raises never stops the others: the result of a
    key is what its task returned, or the exception it raised. Arguments should be small
    (paths, options): each task reads its own data where it runs. T is how many threads a
    task may use without oversubscribing its machine (the worker's threads on Dask).
    """
    if jobs < 1:
        raise CputwinError(f"--jobs must be at least 1, got {jobs}")
    report = done or (lambda _key, _n, _total: None)
    if dask is not None:
        return _run_on_dask(task, calls, dask, report)
    if jobs == 1:
        results = {}
        for n, (key, args) in enumerate(calls.items(), start=1):
            try:
                results[key] = task(*args, threads=None)
            except Exception as exc:  # one task's failure is its result
                results[key] = exc
            report(key, n, len(calls))
        return results
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    # spawn: a fresh interpreter per worker, never a fork of a process with OpenMP threads
    with thread_caps(threads), \
            ProcessPoolExecutor(max_workers=min(jobs, max(len(calls), 1)),
                                mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(task, *args, threads=threads): key for key, args in calls.items()}
        return _collect(futures, as_completed, report)


@contextmanager
def thread_caps(threads: int) -> Iterator[None]:
    """Processes started inside see `threads` as every library's thread count (read once,
    when a library loads): N processes side by side then share the cores instead of each
    starting a pool as large as the machine, whose threads wait on each other's."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: str(threads) for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _collect(futures: dict[Any, str], completed: Callable, report: Done) -> dict[str, Any]:
    results = {}
    for n, future in enumerate(completed(futures), start=1):
        key = futures[future]
        try:
            results[key] = future.result()
        except Exception as exc:  # raised in the task, or its worker died
            results[key] = exc
        report(key, n, len(futures))
    return results


def _run_on_dask(task: Callable[..., Any], calls: dict[str, tuple], address: str,
                 report: Done) -> dict[str, Any]:
    from distributed import as_completed as dask_completed

    with connect(address) as client:
        futures = {client.submit(_in_worker, task, *args, key=f"cputwin-{key}-{uuid.uuid4().hex}",
                                 pure=False): key for key, args in calls.items()}
        return _collect(futures, dask_completed, report)


def _in_worker(task: Callable[..., Any], *args: Any) -> Any:
    """On a Dask worker: the task with as many threads as the worker runs tasks on."""
    from distributed import get_worker

    return task(*args, threads=max(1, int(get_worker().state.nthreads)))
