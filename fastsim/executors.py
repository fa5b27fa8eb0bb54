"""Running one function over many tasks in parallel — worker processes on this machine, or Ray tasks
on a cluster — results yielded as they finish. A task is (key, *args); each result comes back as
(key, fn(*args), None), or (key, None, why) if the worker running it died."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from fastsim.errors import FastsimError


def warm_up() -> None:
    """Load (or compile, once) the simulation kernel (a worker's initializer: importable from here
    without importing the engine first)."""
    from fastsim.simulation import warm_up as load_kernels

    load_kernels()


def die_with_parent(parent_pid: int) -> None:
    """A worker's initializer: end when the process that started it ends, even by kill -9, which
    gives no chance to shut the pool down (two ~300 MB workers were left running). Linux tells a
    child of its parent's death if asked (prctl PR_SET_PDEATHSIG); a parent gone before the asking
    is caught by its changed id."""
    import os
    import signal

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            return
    if os.getppid() != parent_pid:
        os._exit(1)


def _spawned_worker(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    warm_up()


def run_tasks(fn: Callable, tasks: list[tuple], executor: str = "local", jobs: int = 1,
              address: str | None = None) -> Iterator[tuple]:
    if executor == "ray":
        return run_ray(fn, tasks, jobs, address)
    if executor == "local":
        return run_local(fn, tasks, jobs)
    raise FastsimError(f"--executor {executor!r}: expected local or ray")


def run_local(fn: Callable, tasks: list[tuple], jobs: int) -> Iterator[tuple]:
    """Worker processes forked after the kernel is loaded (Linux), so no worker compiles; elsewhere
    spawned, each loading the kernel from Numba's cache once."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    if jobs == 1 or len(tasks) == 1:
        for t in tasks:
            yield t[0], fn(*t[1:]), None
        return
    warm_up()  # before forking, so that no worker compiles or loads the kernel itself
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    import os

    forked = ctx.get_start_method() == "fork"
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx,
                               initializer=die_with_parent if forked else _spawned_worker, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(fn, *t[1:]): t[0] for t in tasks}
        for f in as_completed(futures):
            try:
                yield futures[f], f.result(), None
            except BrokenProcessPool:
                yield futures[f], None, "its worker process died (out of memory?)"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(fn: Callable, tasks: list[tuple], jobs: int, address: str | None) -> Iterator[tuple]:
    """The same tasks as Ray tasks, on the cluster at `address` (None: a local Ray instance)."""
    try:
        import ray
    except ImportError:
        raise FastsimError("--executor ray needs Ray: pip install 'fastsim[ray]'") from None
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else {"num_cpus": jobs}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(*t[1:]): t[0] for t in tasks}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                key = refs.pop(ref)
                try:
                    yield key, ray.get(ref), None
                except Exception as e:  # the task's worker died
                    yield key, None, f"Ray task failed: {type(e).__name__}"
    finally:
        if started:
            ray.shutdown()
