"""`AsyncLLM`: the engine on one background thread, behind an asyncio streaming API.

The engine is not thread-safe, so one thread owns it: every `add_request`, `abort`, `step` and
`stats` call happens there. Event loops talk to that thread through a command queue; the thread
hands each step's outputs back with `loop.call_soon_threadsafe`, and publishes an `EngineStats`
snapshot after every step so /metrics never touches the engine.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from absl import logging

from serve.outputs import EngineStats, RequestOutput
from serve.sampling_params import SamplingParams


class RequestObserver(Protocol):
  """Receives per-request latencies and outcomes, called on the engine thread."""

  def first_token(self, seconds: float) -> None:
    """Time from `generate` to the step that produced the request's first token."""

  def inter_token(self, seconds: float) -> None:
    """Time between two consecutive generated tokens (a step's gap split over its tokens)."""

  def finished(self, reason: str) -> None:
    """The request ended: "stop", "length", "abort" (the consumer left early) or "error" (the engine failed)."""


class _NullObserver:

  def first_token(self, seconds: float) -> None:
    del seconds

  def inter_token(self, seconds: float) -> None:
    del seconds

  def finished(self, reason: str) -> None:
    del reason


@dataclasses.dataclass(eq=False)
class _Stream:
  """One request's channel from the engine thread to the event loop that awaits it."""

  loop: asyncio.AbstractEventLoop
  queue: asyncio.Queue
  arrival: float  # time.monotonic() when generate was called
  last_token_time: float | None = None
  num_tokens: int = 0

  def deliver(self, item: RequestOutput | BaseException) -> None:
    try:
      self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
      pass


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
  if future.done():  # the caller was cancelled while waiting
    return
  if error is None:
    future.set_result(None)
  else:
    future.set_exception(error)


class AsyncLLM:
  """Runs an `LLMEngine` on a background thread and streams its outputs to asyncio callers.

  Args:
    engine: an `LLMEngine` (or anything with its `add_request`, `abort`, `step`,
      `has_unfinished`, `stats`, `model_name`, `max_model_len` and `tokenizer`). From here on
      only the engine thread may call it.
    observer: receives time to first token, inter-token latencies and finish reasons.
    throughput_window_s: the recent window over which `generation_throughput` is measured.
  """

  def __init__(self, engine: Any, *, observer: RequestObserver | None = None,
               throughput_window_s: float = 10.0):
    if not throughput_window_s > 0:
      raise ValueError(f"throughput_window_s must be > 0, got {throughput_window_s}")
    self._engine = engine
    self._observer = observer or _NullObserver()
    self._window_s = throughput_window_s
    self._cond = threading.Condition()
    self._commands: collections.deque = collections.deque()  # guarded by _cond
    self._stopping = False  # guarded by _cond
    self._streams: dict[str, _Stream] = {}  # engine thread only
    self._step_started: float | None = None  # monotonic start of the step in progress; written by the engine thread
    self._snapshot_lock = threading.Lock()
    # No thread runs yet, so reading the engine here is still single-threaded.
    self._stats: EngineStats = engine.stats()
    self._created = time.monotonic()
    self._samples = collections.deque([(self._created, self._stats.generation_tokens)])
    self._thread = threading.Thread(target=self._run, name="fireflyer-engine", daemon=True)
    self._thread.start()

  @property
  def model_name(self) -> str:
    return self._engine.model_name

  @property
  def max_model_len(self) -> int:
    return self._engine.max_model_len

  @property
  def is_running(self) -> bool:
    """Whether the engine thread is alive (false after `shutdown`)."""
    return self._thread.is_alive()

  def step_seconds(self) -> float:
    """How long the engine step in progress has run so far; 0 between steps (a stuck step grows without bound)."""
    started = self._step_started  # one read: the engine thread may clear it meanwhile
    return 0.0 if started is None else time.monotonic() - started

  def apply_chat_template(self, messages: list[dict]) -> str:
    """The engine tokenizer's chat template. Pure string formatting, so safe off the engine
    thread (it reads no engine state)."""
    return self._engine.tokenizer.apply_chat_template(messages)

  async def generate(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
    """Submits a request and yields its `RequestOutput` after every step that advanced it.

    The last output has `finished=True`. If the caller stops early (breaks, is cancelled, or
    closes the generator), the request is aborted in the engine and its KV pages are freed.

    Args:
      prompt: text, or token ids.
      params: how to sample and when to stop.
      request_id: unique among running requests; None draws a random one.

    Raises:
      ValueError: the engine refused the request (e.g. the prompt is too long).
      RuntimeError: the engine failed during a step, or `shutdown` was called.
    """
    request_id = request_id or uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    stream = _Stream(loop, asyncio.Queue(), time.monotonic())
    added = loop.create_future()
    self._submit(("add", request_id, prompt, params, stream, added))
    finished = False
    try:
      await added
      while True:
        item = await stream.queue.get()
        if isinstance(item, BaseException):
          finished = True  # the engine thread already dropped this request
          raise item
        finished = item.finished
        yield item
        if finished:
          return
    finally:
      if not finished:
        # The command carries the stream, so a failed add never aborts another request's id.
        self._submit(("abort", request_id, stream))

  def stats(self) -> EngineStats:
    """The engine's stats as of its last step."""
    with self._snapshot_lock:
      return self._stats

  def generation_throughput(self) -> float:
    """Generated tokens per second over the last `throughput_window_s` (0 when idle)."""
    now = time.monotonic()
    with self._snapshot_lock:
      samples = list(self._samples)
    # The token count at the window's start is the newest sample at or before it.
    start = now - self._window_s
    base = samples[0]
    for sample in samples:
      if sample[0] > start:
        break
      base = sample
    elapsed = min(self._window_s, now - self._created)
    return (samples[-1][1] - base[1]) / elapsed if elapsed > 0 else 0.0

  def shutdown(self, timeout_s: float | None = None) -> bool:
    """Stops the engine thread after its current step; requests still streaming raise RuntimeError.

    Returns whether the thread ended within `timeout_s` (None: waits as long as the step takes;
    a hung step never ends, and the thread is a daemon, so the process can still exit).
    """
    with self._cond:
      self._stopping = True
      self._cond.notify()
    if threading.current_thread() is not self._thread:
      self._thread.join(timeout_s)
    return not self._thread.is_alive()

  def _submit(self, command: tuple) -> None:
    with self._cond:
      if self._stopping and command[0] == "add":
        command[5].get_loop().call_soon(_resolve, command[5], RuntimeError("AsyncLLM is shut down"))
        return
      self._commands.append(command)
      self._cond.notify()

  # Everything below runs on the engine thread.

  def _run(self) -> None:
    try:
      self._serve_commands()
    except BaseException:  # noqa: BLE001 - never leave callers waiting on a dead thread
      logging.exception("the engine thread failed")
      with self._cond:
        self._stopping = True
        commands = list(self._commands)
        self._commands.clear()
      self._fail_all(RuntimeError("the engine thread failed; see the server log"), commands)

  def _serve_commands(self) -> None:
    busy = False
    while True:
      with self._cond:
        while not (self._commands or busy or self._stopping):
          self._cond.wait()  # idle: sleep until a command arrives
        commands = list(self._commands)
        self._commands.clear()
        stopping = self._stopping
      if stopping:
        self._fail_all(RuntimeError("AsyncLLM is shut down"), commands)
        return
      for command in commands:
        self._apply(command)
      if commands:  # new and aborted requests show in the stats before a possibly long step
        self._publish()
      busy = self._step() if self._streams else False

  def _apply(self, command: tuple) -> None:
    if command[0] == "add":
      _, request_id, prompt, params, stream, added = command
      error = None
      try:
        if request_id in self._streams:
          raise ValueError(f"request_id {request_id!r} is already running")
        self._engine.add_request(request_id, prompt, params)
        self._streams[request_id] = stream
      except Exception as err:  # noqa: BLE001 - handed to the caller, whatever it is
        error = err
      try:
        stream.loop.call_soon_threadsafe(_resolve, added, error)
      except RuntimeError:  # the caller's loop is gone: drop the request again
        if error is None:
          self._abort(request_id, stream)
    else:
      _, request_id, stream = command
      self._abort(request_id, stream)

  def _abort(self, request_id: str, stream: _Stream) -> None:
    if self._streams.get(request_id) is not stream:
      return  # finished already, or the add failed
    del self._streams[request_id]
    self._engine.abort(request_id)
    self._observer.finished("abort")

  def _step(self) -> bool:
    """One engine step; returns whether work remains."""
    self._step_started = time.monotonic()
    try:
      outputs = self._engine.step()
    except Exception as err:  # noqa: BLE001 - reported to every waiting caller
      logging.exception("engine step failed; failing its %d requests", len(self._streams))
      self._fail_all(RuntimeError(f"engine step failed: {err!r}"), [])
      return False
    finally:
      self._step_started = None
    now = time.monotonic()
    deliveries = []
    for output in outputs:
      stream = self._streams.get(output.request_id)
      if stream is None:
        continue
      self._observe(stream, output, now)
      if output.finished:
        del self._streams[output.request_id]
        self._observer.finished(output.finish_reason or "stop")
      deliveries.append((stream, output))
    self._publish()  # first, so a caller that sees its output also sees it in the stats
    for stream, output in deliveries:
      stream.deliver(output)
    return self._engine.has_unfinished()

  def _observe(self, stream: _Stream, output: RequestOutput, now: float) -> None:
    num_new = len(output.token_ids) - stream.num_tokens
    if num_new <= 0:
      return
    if stream.last_token_time is None:
      self._observer.first_token(now - stream.arrival)
      num_gaps = num_new - 1  # a step that emits several tokens: the rest arrive together
      gap = 0.0
    else:
      num_gaps = num_new
      gap = (now - stream.last_token_time) / num_new
    for _ in range(num_gaps):
      self._observer.inter_token(gap)
    stream.num_tokens = len(output.token_ids)
    stream.last_token_time = now

  def _publish(self) -> None:
    try:
      stats = self._engine.stats()
    except Exception:  # noqa: BLE001 - keep serving with the last good snapshot
      logging.exception("engine stats failed")
      return
    now = time.monotonic()
    with self._snapshot_lock:
      self._stats = stats
      if stats.generation_tokens != self._samples[-1][1]:
        self._samples.append((now, stats.generation_tokens))
      # Keep one sample at or before the window's start as the rate's base.
      while len(self._samples) > 1 and self._samples[1][0] <= now - self._window_s:
        self._samples.popleft()

  def _fail_all(self, error: BaseException, commands: list[tuple]) -> None:
    failed = list(self._streams.items())
    for request_id, _ in failed:
      try:
        self._engine.abort(request_id)
      except Exception:  # noqa: BLE001 - the engine may be broken; the callers still hear
        logging.exception("abort of %s failed", request_id)
      self._observer.finished("error")
    self._streams.clear()
    # Counted and published before the callers hear, so whoever sees the error also sees it in
    # the metrics and the stats.
    self._publish()
    for _, stream in failed:
      stream.deliver(error)
    for command in commands:
      if command[0] == "add":
        try:
          command[4].loop.call_soon_threadsafe(_resolve, command[5], error)
        except RuntimeError:
          pass
