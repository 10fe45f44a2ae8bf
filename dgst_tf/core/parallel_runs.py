"""Independent runs in parallel on Ray: a local Ray instance by default, a running Ray
cluster when given its address (``"ray://head:10001"`` or ``"head:6379"``; every node
needs dgst-tf installed, the functions are sent by reference).

Results come back as each run finishes, so a caller can cache them one by one and an
interrupted call keeps what finished::

    from dgst_tf.core.parallel_runs import run_in_parallel

    def square(offset, x):            # a module-level function (Ray imports it by name)
        return offset + x * x

    for index, value in run_in_parallel(square, [(1,), (2,), (3,)], shared=(10,), workers=2):
        print(index, value)           # (0, 11), (2, 19), (1, 14) in finishing order

``shared``: arguments every run receives first (large arrays, model weights), put in Ray's
object store once. Each run limits TensorFlow to ``threads_per_run`` threads, so that
``workers`` runs share the cores instead of oversubscribing them.
"""
from __future__ import annotations

import os

__all__ = ["run_in_parallel"]


def run_in_parallel(function, arguments, *, shared=(), address: str | None = None,
                    workers: int | None = None, threads_per_run: int = 1):
    """Yield ``(index, function(*shared, *arguments[index]))`` as the runs finish (module
    doc). ``workers``: runs at a time on a local Ray (default: the usable cores); with
    ``address`` the cluster's resources decide. A Ray instance this call started is shut
    down when the generator ends or is closed."""
    import ray

    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    started = not ray.is_initialized()
    if started:
        local = dict(num_cpus=(workers or len(os.sched_getaffinity(0))) * threads_per_run)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else local))
    try:
        remote = ray.remote(num_cpus=threads_per_run)(_run_one)
        shared_ref = ray.put(tuple(shared))
        pending = {remote.remote(function, threads_per_run, shared_ref, tuple(args)): index
                   for index, args in enumerate(arguments)}
        while pending:
            (finished,), _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(finished), ray.get(finished)
    finally:
        if started:
            ray.shutdown()


def _run_one(function, threads: int, shared: tuple, args: tuple):
    """One run in a Ray worker (Ray resolves ``shared`` from its object store)."""
    from dgst_tf.core import runtime

    runtime.limit_threads(threads)
    return function(*shared, *args)
