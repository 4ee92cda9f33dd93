"""Where tasks run: inline (debugging), a local spawn-context process pool (the default), or Ray.

Every executor runs a list of `Task`s and returns their results in order; the first failure
cancels what has not started and raises `TaskError` naming the task (stage and partition), with
the worker's exception chained. A worker that dies (killed, out of memory) raises too, not hangs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable


class TaskError(RuntimeError):
  """A task failed; the message names it, `__cause__` is the worker's exception."""


@dataclasses.dataclass(frozen=True)
class Task:
  """`fn(*args)`, with `fn` a top-level function so that process pools and Ray can pickle it."""

  name: str  # e.g. "repartition#3 partition 2": what a failure message names
  fn: Callable[..., Any]
  args: tuple


def _call(task: Task) -> Any:
  return task.fn(*task.args)


def _fail(task: Task, exc: BaseException) -> TaskError:
  return TaskError(f"task {task.name} failed: {type(exc).__name__}: {exc}")


class InlineExecutor:
  """Runs tasks one after another in this process: plain tracebacks and breakpoints."""

  num_workers = 1

  def run(self, tasks: list[Task]) -> list[Any]:
    results = []
    for task in tasks:
      try:
        results.append(_call(task))
      except Exception as exc:
        raise _fail(task, exc) from exc
    return results

  def shutdown(self) -> None:
    pass


class ProcessExecutor:
  """A `ProcessPoolExecutor` with the spawn context (no forked copies of the driver's threads and
  clients); started on first use and kept for the session, since workers are slow to spawn."""

  def __init__(self, num_workers: int):
    if num_workers < 1:
      raise ValueError(f"{num_workers=} must be at least 1")
    self.num_workers = num_workers
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None

  def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
    if self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(self.num_workers,
                                                          mp_context=multiprocessing.get_context("spawn"))
    return self._pool

  def run(self, tasks: list[Task]) -> list[Any]:
    pool = self._get_pool()
    futures = {pool.submit(_call, task): i for i, task in enumerate(tasks)}
    results: list[Any] = [None] * len(tasks)
    try:
      for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        try:
          results[i] = future.result()
        except BrokenProcessPool as exc:
          self._pool = None  # a dead worker breaks the pool for good: the next run starts a new one
          pool.shutdown(wait=False, cancel_futures=True)
          unfinished = sum(1 for f in futures if not f.done() or (not f.cancelled() and isinstance(
              f.exception(), BrokenProcessPool)))
          # The pool cannot tell which task killed its worker; the first reported is named.
          raise TaskError(f"task {tasks[i].name} failed: a worker process died, running it or another of the "
                          f"stage's {unfinished} unfinished tasks ({exc})") from exc
        except Exception as exc:
          raise _fail(tasks[i], exc) from exc
    finally:
      for future in futures:
        future.cancel()
    return results

  def shutdown(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None


class RayExecutor:
  """Ray remote tasks on the cluster at `address` ("local" or "auto" work too); Ray is imported
  only here, so it stays an optional dependency."""

  def __init__(self, address: str):
    try:
      import ray
    except ImportError as exc:
      raise ImportError(f"ray_address={address!r} needs Ray, which is not installed (pip install 'ray>=2.10')") from exc
    self._ray = ray
    self._owns_ray = not ray.is_initialized()
    if self._owns_ray:
      ray.init(address=address, include_dashboard=False, log_to_driver=False)
    self._remote = ray.remote(num_cpus=1)(_call)
    self.num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

  def run(self, tasks: list[Task]) -> list[Any]:
    ray = self._ray
    refs = {self._remote.options(name=task.name).remote(task): i for i, task in enumerate(tasks)}
    results: list[Any] = [None] * len(tasks)
    pending = list(refs)
    try:
      while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = refs[done[0]]
        try:
          results[i] = ray.get(done[0])
        except Exception as exc:  # RayTaskError wraps the task's exception; WorkerCrashedError a dead worker
          raise _fail(tasks[i], exc) from exc
    finally:
      for ref in pending:
        ray.cancel(ref)
    return results

  def shutdown(self) -> None:
    if self._owns_ray:
      self._ray.shutdown()


def make_executor(num_executors: int, ray_address: str | None):
  """Ray when `ray_address` is given, else a process pool of `num_executors`, or inline for 0 or 1."""
  if ray_address is not None:
    return RayExecutor(ray_address)
  if num_executors < 0:
    raise ValueError(f"{num_executors=} must be >= 0")
  return InlineExecutor() if num_executors <= 1 else ProcessExecutor(num_executors)
