"""The one grading pool: grades finished generations off the engine's critical path and hands each grade
to a callback the moment it exists (the runner appends and fsyncs it there), in completion order.

Workers are spawned processes (safe next to torch/vLLM; each grades in its main thread, so math-verify's
SIGALRM timeouts work), started while the engine loads. A worker dies with the process that started it
(PR_SET_PDEATHSIG, plus a parent watchdog). If a worker crashes (BrokenProcessPool), the pool is rebuilt
and every sample that had no grade yet is graded again, one at a time: the one that crashes a worker
again, alone, gets a grader_error verdict; the others get their grade. workers=0 grades inline in the calling thread.

Every sample's whole grading (extract + verify + execute) has a wall-clock budget (budget_s). Past it, the
grade is interrupted (a signal to the grading thread; a sandboxed program is killed on the way out) and the
sample is scored wrong with reason grade_timeout; the run goes on. Code stuck in C past the budget plus a
grace period takes its worker down with it, and the crash path above scores it a grader_error.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

from bench_grade import Graded

WARM_UP_OUTPUT = "The answer is (A).\nAnswer: A\n\\boxed{1}"
GRADE_BUDGET_S = 600.0  # per sample; LCB's slowest samples run dozens of tests of a few seconds each
HARD_KILL_GRACE_S = 15.0
GRADE_TIMEOUT = "grade_timeout"


class GradeTimeout(BaseException):
    """Raised in the grading thread at the budget. A BaseException, so a grader's `except Exception`
    (there to turn a crash into a verdict) cannot swallow it."""


def timeout_verdict(budget_s: float) -> tuple:
    g = Graded(None, False, False, {"reason": GRADE_TIMEOUT,
                                    "error": f"{GRADE_TIMEOUT}: grading took longer than {budget_s:g} s"})
    return g, None


def budgeted_grade(grade_fn: Callable, budget_s: float | None, sample, output) -> tuple:
    """grade_fn(sample, output) under a wall-clock budget (module level: the pool pickles it). Enforced in
    the main thread of a process (each pool worker, or an inline caller that is the main thread)."""
    if not budget_s or threading.current_thread() is not threading.main_thread():
        return grade_fn(sample, output)
    armed = [True]

    def interrupt(signum, frame):
        if armed[0]:
            raise GradeTimeout()

    def hard_kill():
        if armed[0]:
            os._exit(70)

    previous = signal.signal(signal.SIGUSR2, interrupt)
    timer = threading.Timer(budget_s, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR2))
    killer = threading.Timer(budget_s + HARD_KILL_GRACE_S, hard_kill)
    for t in (timer, killer):
        t.daemon = True
        t.start()
    try:
        return grade_fn(sample, output)
    except GradeTimeout:
        return timeout_verdict(budget_s)
    finally:
        armed[0] = False
        timer.cancel()
        killer.cancel()
        signal.signal(signal.SIGUSR2, previous)


def default_grade_workers() -> int:
    return min(8, os.cpu_count() or 1)


def default_grade_fn(sample, output):
    """(robust verdict, official verdict or None) of one output."""
    import bench_registry

    return bench_registry.grade_both(sample, output)


def warm_up(probes: Sequence, grade_fn: Callable = default_grade_fn) -> None:
    """Grade a throw-away answer once per benchmark so lazy imports (math-verify, sympy) happen off the
    critical path; the verdicts are discarded."""
    for sample in probes:
        try:
            grade_fn(sample, WARM_UP_OUTPUT)
        except Exception:  # a warm-up must never break a run; the real grade reports its own errors
            pass


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this worker when its parent dies; a watchdog covers the
    case where the parent died before prctl took effect."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def crash_verdict(reason: str) -> tuple:
    g = Graded(None, False, False, {"status": "grader_error", "error": reason})
    return g, None


class GradingPool:
    """submit(sample, generation) -> on_graded(sample, generation, robust, official) as soon as graded."""

    def __init__(self, workers: int, on_graded: Callable, grade_fn: Callable = default_grade_fn,
                 probes: Sequence = (), budget_s: float | None = GRADE_BUDGET_S):
        self.workers = int(workers)
        self.budget_s = budget_s
        self.on_graded = on_graded
        self.grade_fn = grade_fn
        self.probes = [s for s in probes if not s.meta.get("judge")]  # never call a remote judge to warm up
        self.pool = None
        self._lock = threading.Lock()
        self._pending: dict = {}  # future -> (sample, generation)
        self._broken: list = []  # (sample, generation) whose worker crashed, to resubmit
        self._idle = threading.Condition(self._lock)
        self.grade_s = 0.0  # time this process spent grading inline or waiting for grades
        self.regraded_after_crash: list = []
        if self.workers > 0:
            self._start_pool()
        elif self.probes:
            threading.Thread(target=warm_up, args=(self.probes, grade_fn), daemon=True).start()

    def _start_pool(self, warm: bool = True) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_die_with_parent, initargs=(os.getpid(),))
        if warm:  # start the workers and load the graders' imports while generation runs (not after a crash:
            for _ in range(self.workers):  # a warm-up probe may be the very sample that kills a worker)
                self.pool.submit(warm_up, self.probes, self.grade_fn)

    def submit(self, sample, generation) -> None:
        self._recover()
        if self.pool is None:
            t0 = time.perf_counter()
            try:
                robust, official = budgeted_grade(self.grade_fn, self.budget_s, sample, generation["output"])
            except Exception as exc:  # a grade_fn bug becomes this sample's grader_error
                robust, official = crash_verdict(f"grading failed: {type(exc).__name__}: {str(exc)[:300]}")
            self.grade_s += time.perf_counter() - t0
            self.on_graded(sample, generation, robust, official)
            return
        try:
            future = self.pool.submit(budgeted_grade, self.grade_fn, self.budget_s, sample, generation["output"])
        except (BrokenProcessPool, RuntimeError):
            with self._lock:
                self._broken.append((sample, generation))
            self._recover()
            return
        with self._lock:
            self._pending[future] = (sample, generation)
        future.add_done_callback(self._done)

    def _done(self, future) -> None:
        """Runs in the pool's thread as each grade arrives: hand it on at once (the runner fsyncs it)."""
        with self._lock:
            item = self._pending.pop(future, None)
            if future.cancelled():  # the run is closing: nothing graded, nothing to record
                self._idle.notify_all()
                return
        if item is None:
            return
        sample, generation = item
        try:
            robust, official = future.result()
        except BrokenProcessPool:
            with self._lock:
                self._broken.append(item)
                self._idle.notify_all()
            return
        except BaseException as exc:  # noqa: BLE001 - a grade_fn bug becomes this sample's grader_error
            robust, official = crash_verdict(f"grading failed: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            self.on_graded(sample, generation, robust, official)
        finally:
            with self._lock:
                self._idle.notify_all()

    def _recover(self) -> None:
        """Rebuild a broken pool and grade its lost samples again, one at a time, so that a sample which
        kills its worker is found exactly: it alone gets a grader_error, the bystanders are graded."""
        with self._lock:
            broken, self._broken = self._broken, []
        if not broken:
            return
        print(f"eval_grading: a grading worker crashed; re-grading {len(broken)} sample(s) one at a time in a "
              "new pool", file=sys.stderr)
        for sample, generation in broken:
            self._restart_if_broken()
            t0 = time.perf_counter()
            try:
                robust, official = self.pool.submit(budgeted_grade, self.grade_fn, self.budget_s, sample,
                                                    generation["output"]).result()
                self.regraded_after_crash.append(sample.id)
            except BrokenProcessPool:
                robust, official = crash_verdict("the grading worker crashed on this sample, again when graded alone")
                self._restart_if_broken(force=True)
            except Exception as exc:  # noqa: BLE001
                robust, official = crash_verdict(f"grading failed: {type(exc).__name__}: {str(exc)[:300]}")
            self.grade_s += time.perf_counter() - t0
            self.on_graded(sample, generation, robust, official)

    def _restart_if_broken(self, force: bool = False) -> None:
        if self.pool is not None and not force and not getattr(self.pool, "_broken", False):
            return
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self._start_pool(warm=False)

    def drain(self) -> None:
        """Wait until every submitted sample has been handed to on_graded."""
        t0 = time.perf_counter()
        while True:
            self._recover()
            with self._lock:
                if not self._pending and not self._broken:
                    break
                self._idle.wait(timeout=0.5)
        self.grade_s += time.perf_counter() - t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
