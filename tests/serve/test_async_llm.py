"""`AsyncLLM` against a deterministic fake engine: threading, streaming, aborts, errors, metrics.

The fake stands in for `LLMEngine` because these tests are about the async layer (one engine
thread, cancellation, error propagation), not the model; tests/serve/test_server.py drives the
real engine through the binary.
"""

import asyncio
import threading
import time

import pytest

from serve.async_llm import AsyncLLM
from serve.outputs import EngineStats, RequestOutput
from serve.sampling_params import SamplingParams


class FakeTokenizer:
  eos_id = 0

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)

  def apply_chat_template(self, messages):
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeEngine:
  """Emits one letter per running request per step, until max_tokens ("length")."""

  model_name = "fake"
  max_model_len = 64

  def __init__(self, step_delay_s=0.0):
    self.tokenizer = FakeTokenizer()
    self.step_delay_s = step_delay_s
    self.requests = {}
    self.aborted = []
    self.threads = set()
    self.num_steps = 0
    self.fail_next_step = False
    self.generation_tokens = 0

  def _call(self):
    self.threads.add(threading.get_ident())

  def add_request(self, request_id, prompt, params):
    self._call()
    if request_id in self.requests:
      raise ValueError(f"request_id {request_id!r} is already running")
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
      raise ValueError("prompt is empty")
    if len(ids) > self.max_model_len - 1:
      raise ValueError(f"prompt is too long: {len(ids)} tokens > {self.max_model_len - 1}")
    self.requests[request_id] = (ids, [], params)

  def abort(self, request_id):
    self._call()
    if self.requests.pop(request_id, None) is not None:
      self.aborted.append(request_id)

  def step(self):
    self._call()
    self.num_steps += 1
    if self.fail_next_step:
      self.fail_next_step = False
      raise RuntimeError("device on fire")
    time.sleep(self.step_delay_s)
    outputs = []
    for request_id, (prompt, generated, params) in list(self.requests.items()):
      generated.append(ord("a") + (len(prompt) + len(generated)) % 26)
      self.generation_tokens += 1
      finished = len(generated) >= (params.max_tokens or self.max_model_len - len(prompt))
      if finished:
        del self.requests[request_id]
      outputs.append(RequestOutput(request_id, prompt, list(generated), self.tokenizer.decode(generated),
                                   chr(generated[-1]), finished, "length" if finished else None))
    return outputs

  def has_unfinished(self):
    self._call()
    return bool(self.requests)

  def stats(self):
    self._call()
    return EngineStats(running=len(self.requests), waiting=0, kv_cache_usage=len(self.requests) / 8,
                       prefix_cache_hit_tokens=0, prefix_cache_query_tokens=0, prompt_tokens=0,
                       generation_tokens=self.generation_tokens)


class RecordingObserver:

  def __init__(self):
    self.first = []
    self.inter = []
    self.reasons = []

  def first_token(self, seconds):
    self.first.append(seconds)

  def inter_token(self, seconds):
    self.inter.append(seconds)

  def finished(self, reason):
    self.reasons.append(reason)


@pytest.fixture
def engine():
  return FakeEngine()


@pytest.fixture
def observer():
  return RecordingObserver()


@pytest.fixture
def llm(engine, observer):
  llm = AsyncLLM(engine, observer=observer)
  yield llm
  llm.shutdown()


async def _collect(llm, prompt, **params):
  return [out async for out in llm.generate(prompt, SamplingParams(**params))]


async def _wait_for(predicate, timeout_s=5.0):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError("condition not reached")
    await asyncio.sleep(0.01)


def test_generate_streams_every_step_then_finishes(llm, engine, observer):
  outputs = asyncio.run(_collect(llm, "hello", max_tokens=5))
  assert len(outputs) == 5
  assert [o.finished for o in outputs] == [False] * 4 + [True]
  assert outputs[-1].finish_reason == "length"
  assert "".join(o.new_text for o in outputs) == outputs[-1].text == "fghij"
  assert observer.reasons == ["length"]
  assert len(observer.first) == 1 and len(observer.inter) == 4
  assert all(t >= 0 for t in observer.first + observer.inter)
  assert not engine.requests


def test_engine_is_called_from_one_background_thread(llm, engine):
  async def many():
    return await asyncio.gather(*[_collect(llm, "p" * (i + 1), max_tokens=3) for i in range(6)])

  results = asyncio.run(many())
  assert [len(r) for r in results] == [3] * 6
  # The constructor's one stats() call is on the caller's thread, before the engine thread starts.
  engine.threads.discard(threading.get_ident())
  assert engine.threads == {llm._thread.ident}


def test_add_request_error_propagates_as_value_error(llm, engine):
  with pytest.raises(ValueError, match="too long"):
    asyncio.run(_collect(llm, "x" * 100))
  with pytest.raises(ValueError, match="empty"):
    asyncio.run(_collect(llm, []))
  assert not engine.aborted  # a refused request is never aborted
  assert len(asyncio.run(_collect(llm, "ok", max_tokens=2))) == 2  # still serving


def test_duplicate_request_id_is_refused_without_aborting_the_first(llm, engine):
  async def run():
    first = llm.generate("a", SamplingParams(max_tokens=50), request_id="r")
    await anext(first)
    with pytest.raises(ValueError, match="already running"):
      await anext(llm.generate("b", SamplingParams(), request_id="r"))
    rest = [out async for out in first]
    return rest[-1]

  last = asyncio.run(run())
  assert last.finished and len(last.token_ids) == 50
  assert engine.aborted == []


def test_consumer_break_aborts_the_request(engine, observer):
  engine.step_delay_s = 0.005
  llm = AsyncLLM(engine, observer=observer)

  async def run():
    outputs = llm.generate("abc", SamplingParams(max_tokens=10_000), request_id="gone")
    async for out in outputs:
      if len(out.token_ids) == 2:
        break
    await outputs.aclose()
    await _wait_for(lambda: engine.aborted == ["gone"])
    await _wait_for(lambda: llm.stats().running == 0)

  try:
    asyncio.run(run())
  finally:
    llm.shutdown()
  assert observer.reasons == ["abort"]
  assert not engine.requests


def test_cancelled_task_aborts_the_request(engine):
  engine.step_delay_s = 0.005
  llm = AsyncLLM(engine)

  async def run():
    task = asyncio.create_task(_collect(llm, "abc", max_tokens=10_000))
    await _wait_for(lambda: engine.num_steps >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
      await task
    await _wait_for(lambda: len(engine.aborted) == 1)

  try:
    asyncio.run(run())
  finally:
    llm.shutdown()
  assert not engine.requests


def test_idle_thread_does_not_step(llm, engine):
  asyncio.run(_collect(llm, "x", max_tokens=2))
  steps = engine.num_steps
  time.sleep(0.2)
  assert engine.num_steps == steps


def test_step_failure_reaches_the_caller_and_serving_continues(llm, engine, observer):
  engine.fail_next_step = True
  with pytest.raises(RuntimeError, match="device on fire"):
    asyncio.run(_collect(llm, "x", max_tokens=3))
  assert observer.reasons == ["error"]  # counted in the metrics as a failed request
  assert llm.stats().running == 0  # and gone from the stats by the time the caller hears
  assert len(asyncio.run(_collect(llm, "x", max_tokens=3))) == 3


def test_stats_snapshot_and_throughput(llm):
  assert llm.stats().generation_tokens == 0
  assert llm.generation_throughput() == 0.0
  asyncio.run(_collect(llm, "x", max_tokens=20))
  assert llm.stats().generation_tokens == 20
  assert llm.stats().running == 0
  assert llm.generation_throughput() > 0


def test_throughput_window_must_be_positive(engine):
  with pytest.raises(ValueError, match="throughput_window_s"):
    AsyncLLM(engine, throughput_window_s=0)


def test_shutdown_fails_streams_and_refuses_new_requests(engine):
  engine.step_delay_s = 0.005
  llm = AsyncLLM(engine)

  async def run():
    outputs = llm.generate("abc", SamplingParams(max_tokens=10_000))
    await anext(outputs)
    await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
    with pytest.raises(RuntimeError, match="shut down"):
      async for _ in outputs:
        pass
    with pytest.raises(RuntimeError, match="shut down"):
      await _collect(llm, "x")

  asyncio.run(run())
  assert not llm._thread.is_alive()


def test_a_dead_engine_thread_fails_its_callers_instead_of_hanging(engine):
  class Broken(RecordingObserver):

    def first_token(self, seconds):
      raise KeyError("observer bug")

  llm = AsyncLLM(engine, observer=Broken())
  with pytest.raises(RuntimeError, match="engine thread failed"):
    asyncio.run(_collect(llm, "x", max_tokens=3))
  llm._thread.join(timeout=5)
  assert not llm.is_running
  with pytest.raises(RuntimeError):
    asyncio.run(_collect(llm, "x", max_tokens=3))
  llm.shutdown()


class HungEngine(FakeEngine):
  """A step that blocks until released: a hung device."""

  def __init__(self):
    super().__init__()
    self.release = threading.Event()

  def step(self):
    self.release.wait(timeout=60)
    return super().step()


def test_step_seconds_grows_during_a_step_and_is_zero_between_steps():
  engine = HungEngine()
  llm = AsyncLLM(engine)

  async def run():
    collected = asyncio.ensure_future(_collect(llm, "x", max_tokens=2))
    await _wait_for(lambda: llm.step_seconds() > 0.05)
    engine.release.set()
    await collected

  try:
    assert llm.step_seconds() == 0.0
    asyncio.run(run())
    assert llm.step_seconds() == 0.0
  finally:
    engine.release.set()
    llm.shutdown()


def test_health_reports_a_stalled_step_and_recovers():
  from aiohttp.test_utils import TestClient, TestServer

  from serve.server import create_app

  engine = HungEngine()
  with pytest.raises(ValueError, match="health_stall_s"):
    create_app(FakeEngine(), health_stall_s=0)

  async def run():
    async with TestClient(TestServer(create_app(engine, health_stall_s=0.2))) as client:
      assert (await client.get("/health")).status == 200
      completion = asyncio.ensure_future(client.post("/v1/completions", json={"model": "fake", "prompt": "x",
                                                                                "max_tokens": 2}))
      deadline = time.monotonic() + 30
      while (response := await client.get("/health")).status == 200:  # the step hangs: 503 after 0.2 s
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
      body = await response.json()
      assert response.status == 503 and "engine step has run for" in body["error"]["message"]
      engine.release.set()
      assert (await completion).status == 200
      assert (await client.get("/health")).status == 200

  try:
    asyncio.run(run())
  finally:
    engine.release.set()


def test_shutdown_does_not_wait_out_a_hung_step_past_its_timeout():
  engine = HungEngine()
  llm = AsyncLLM(engine)

  async def run():
    collected = asyncio.ensure_future(_collect(llm, "x", max_tokens=2))
    await _wait_for(lambda: llm.step_seconds() > 0.05)
    assert not await asyncio.get_running_loop().run_in_executor(None, llm.shutdown, 0.2)  # still in the step
    engine.release.set()
    with pytest.raises(RuntimeError, match="shut down"):
      await collected

  try:
    asyncio.run(run())
    llm._thread.join(timeout=30)
    assert not llm.is_running and llm.shutdown(timeout_s=1)
  finally:
    engine.release.set()
