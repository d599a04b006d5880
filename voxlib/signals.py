"""Stopping cleanly: SIGTERM and Ctrl-C end every phase within seconds, leaving no process or temp file.

Three pieces, used wherever vox starts processes:

- ``terminate_as_interrupt()``: in the main process, SIGTERM raises ``Terminated``, a ``KeyboardInterrupt``,
  so the ``finally`` blocks and ``except BaseException`` clean-ups that remove temp folders run for
  ``kill PID`` too (the default action of SIGTERM ends the process without running any of them).
- ``worker_init``: the first thing a pool worker runs. It leaves stopping to the parent (SIGINT is
  ignored, SIGTERM ends it at once instead of raising in the middle of a task) and asks the Linux
  kernel to kill it when its parent dies, so a parent killed by SIGKILL or the OOM killer leaves no
  orphan holding hundreds of MB.
- ``process_pool()``: a ``ProcessPoolExecutor`` whose workers are terminated, not waited for, when
  the block ends with an exception. ``ProcessPoolExecutor.__exit__`` would instead let the running
  and queued tasks finish first, which for a feature-cache build means minutes.
- ``held_signals()``: SIGINT and SIGTERM held back across a fork. A signal that lands while the
  parent runs the libraries' fork hooks (filelock's, multiprocessing's) raises inside the hook, where
  Python prints it as "Exception ignored" with a traceback and drops it; held, it is delivered the
  moment the fork is done. The child inherits the held mask and releases it in ``worker_init``, once
  its own handlers are in place.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_JOIN_S = 5.0  # how long a terminated worker may take to go; then it is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler, torchrun, ``kill``) raised like Ctrl-C, so cleanup runs the same way;
    cli.run_command tells the two apart by this class (exit status 143, not 130)."""


def _raise_interrupt(signum, frame) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (nested use is harmless).

    Outside the main thread of the main interpreter Python cannot install handlers; the block then
    changes nothing.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is _raise_interrupt:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent ends (Linux; elsewhere nothing).

    If the parent has already gone between fork and this call, exit now.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread during the block, delivered when it ends (POSIX)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_stopping_to_parent() -> None:
    """A worker ignores Ctrl-C (it reaches the whole process group; the parent handles it) and ends at
    once on SIGTERM (a forked worker would inherit terminate_as_interrupt's handler). Signals held
    across the fork (``held_signals``) are released once these handlers are in place."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def worker_init(initializer: Callable | None = None, *initargs) -> None:
    """Pool-worker start-up: the parent decides when to stop; a dead parent takes the worker with it.

    Only for pools whose workers are started by the thread that lives as long as the pool (a
    ProcessPoolExecutor without max_tasks_per_child): the kernel's parent-death signal follows the
    forking *thread*. multiprocessing.Pool re-forks workers from a helper thread that ends at
    terminate(), which would kill idle workers holding the task queue's lock; such a pool uses
    ``leave_stopping_to_parent`` alone.
    """
    leave_stopping_to_parent()
    die_with_parent()
    if initializer is not None:
        initializer(*initargs)


def stop_processes(processes: list) -> None:
    """Terminate multiprocessing processes and reap them; SIGKILL what is still there after a grace period."""
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(_JOIN_S)
            if process.is_alive():
                process.kill()
                process.join(_JOIN_S)


class _Pool(ProcessPoolExecutor):
    """A ProcessPoolExecutor that forks its workers with the stop signals held (see held_signals)."""

    def submit(self, fn, /, *args, **kwargs):
        with held_signals():  # with the fork start method, the first submit forks every worker
            return super().submit(fn, *args, **kwargs)


@contextlib.contextmanager
def process_pool(workers: int, mp_context=None, initializer: Callable | None = None,
                 initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A process pool that is shut down normally on success and terminated on any exception.

    Use it instead of ``with ProcessPoolExecutor(...)``: on Ctrl-C, SIGTERM (under
    ``terminate_as_interrupt``) or an error, the workers are stopped at once, so the caller's clean-up
    (removing a half-written temp folder) runs with no worker still writing into it.
    """
    context = mp_context or multiprocessing.get_context()
    pool = _Pool(workers, mp_context=context, initializer=worker_init, initargs=(initializer, *initargs))
    try:
        yield pool
    except BaseException:
        # ProcessPoolExecutor has no public way to stop its workers before 3.14 (terminate_workers).
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        stop_processes(processes)
        raise
    else:
        pool.shutdown(wait=True)


def stop_subprocess(process, grace_s: float = _JOIN_S) -> None:
    """End a ``subprocess.Popen`` child: SIGTERM, then SIGKILL after ``grace_s``; reap it either way."""
    if process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        process.terminate()
    try:
        process.wait(grace_s)
    except Exception:
        with contextlib.suppress(OSError):
            process.kill()
        process.wait()
