"""The engine on the demo checkpoint: greedy outputs equal a plain forward (batched, chunked, preempted), the prefix cache, seeds, aborts, bad requests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from serve.engine import LLMEngine
from serve.llm import LLM
from serve.sampling_params import SamplingParams

PROMPTS = ["import os\nimport sys\n\n\ndef main(argv):\n    " * 2,              # 2 pages with its output
           "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def ",
           "# ",
           '"""Utilities for reading configuration files."""\n\nimport json\n\n\ndef load(path):\n    with open(']


@pytest.fixture(scope="module")
def llm():
  # 7 usable pages of 64 for up to 4 sequences of ~180 tokens: decoding runs out of pages and preempts.
  return LLM(max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256)


def _plain_logits(engine, rows: list[list[int]]) -> np.ndarray:
  """The model's own forward (no cache, no pages, no batching effects) at each row's last token."""
  net = nnx.merge(engine.runner.graphdef, engine.runner.state)
  tokens = np.zeros((len(rows), 256), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  logits = _forward(net, jnp.asarray(tokens))
  return np.asarray(logits)[np.arange(len(rows)), [len(r) - 1 for r in rows], :engine.vocab_size]


@nnx.jit
def _forward(net, tokens):
  return net(tokens)  # causal: the zeros after each row's tokens do not change its logits


def test_greedy_outputs_equal_a_plain_forward_through_chunks_batches_and_preemption(llm):
  engine = llm.engine
  outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
  assert engine.scheduler.num_preemptions > 0, "the test is meant to preempt: the cache is too large"
  rows = [engine.tokenizer.encode(p) for p in PROMPTS]
  generated = [out.token_ids for out in outs]
  assert all(len(g) == 48 for g in generated)
  mismatches = 0
  for step in range(48):  # teacher-forced on the engine's tokens: each must be the forward's argmax
    logits = _plain_logits(engine, [row + g[:step] for row, g in zip(rows, generated)])
    for i, g in enumerate(generated):
      best = int(np.argmax(logits[i]))
      if g[step] != best:
        mismatches += 1  # allowed only for a near-tie: the cache holds bfloat16 latents, the forward float32
        assert logits[i, best] - logits[i, g[step]] < 0.05, (i, step, best, g[step])
  assert mismatches <= 2
  assert [out.text for out in outs] == [engine.tokenizer.decode(g) for g in generated]
  assert engine.blocks.usage == 0.0 and not engine.has_unfinished()


def test_a_repeated_prompt_hits_the_prefix_cache_and_gives_the_same_output(llm):
  engine = llm.engine
  params = SamplingParams(temperature=0, max_tokens=8)
  first = llm.generate(PROMPTS[0], params)[0]
  hits = engine.blocks.hit_tokens
  second = llm.generate(PROMPTS[0], params)[0]
  assert second.num_cached_tokens == 64 and engine.blocks.hit_tokens == hits + 64
  assert second.token_ids == first.token_ids and second.text == first.text


def test_a_seed_gives_the_same_sample_alone_or_batched(llm):
  params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=1234)
  alone = llm.generate(PROMPTS[1], params)[0]
  batched = llm.generate([PROMPTS[2], PROMPTS[1], PROMPTS[3]], [SamplingParams(max_tokens=12, seed=1), params,
                                                                SamplingParams(max_tokens=5)])[1]
  assert alone.token_ids == batched.token_ids
  other = llm.generate(PROMPTS[1], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=99))[0]
  assert other.token_ids != alone.token_ids


def test_stop_strings_max_tokens_and_streamed_text(llm):
  engine = llm.engine
  engine.add_request("s", PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, stop=["self"]))
  pieces, last = [], None
  while engine.has_unfinished():
    for out in engine.step():
      pieces.append(out.new_text)
      last = out
  full = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30))[0].text
  if "self" in full:
    assert last.finish_reason == "stop" and last.text == full[:full.index("self")]
  else:
    assert last.finish_reason == "length" and last.text == full
  assert "".join(pieces) == last.text


def test_abort_frees_pages_and_bad_requests_raise(llm):
  engine = llm.engine
  engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=50))
  engine.step()
  assert engine.blocks.usage > 0
  engine.abort("x")
  engine.abort("never-added")
  assert engine.blocks.usage == 0 and not engine.has_unfinished() and engine.step() == []
  for prompt, match in [("x" * 300, "too long"), ("", "empty"), ([1, 2, 10**6], "token ids")]:
    with pytest.raises(ValueError, match=match):
      engine.add_request("bad", prompt, SamplingParams())
  with pytest.raises(ValueError, match="prompt plus max_tokens is too long"):
    engine.add_request("bad", "x" * 200, SamplingParams(max_tokens=100))
  with pytest.raises(ValueError, match="too long"):  # a refused prompt leaves the rest of its batch unqueued
    llm.generate(["fine", "x" * 300])
  assert not engine.has_unfinished()
  engine.add_request("dup", "a", SamplingParams(max_tokens=1))
  with pytest.raises(ValueError, match="request_id"):
    engine.add_request("dup", "a", SamplingParams())
  engine.abort("dup")
  with pytest.raises(ValueError, match="max_model_len"):
    LLMEngine(num_kv_pages=4, max_model_len=1000)
  llm.generate("a", SamplingParams(max_tokens=2))
  stats = engine.stats()
  assert stats.running == stats.waiting == 0 and stats.prompt_tokens > 0 and stats.generation_tokens >= 2


def test_warmup_compiles_every_step_shape(llm):
  engine = llm.engine
  assert engine.shapes() == [(b, n) for b in (1, 2, 4) for n in (1, 16)]
  engine.warmup()
  assert set(engine.shapes()) <= engine.runner.compiled_shapes and engine.warmup() == 0
  assert engine.blocks.usage == 0  # padding rows wrote only the trash page
  out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=4))[0]
  assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_a_stalled_scheduler_raises_instead_of_spinning(llm, monkeypatch):
  engine = llm.engine
  engine.add_request("stuck", "a", SamplingParams(max_tokens=1))
  monkeypatch.setattr(engine.scheduler, "schedule", lambda: None)  # as a scheduler bug would
  with pytest.raises(RuntimeError, match="placed none of 1 waiting"):
    engine.step()
  monkeypatch.undo()
  engine.abort("stuck")
