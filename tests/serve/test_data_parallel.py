"""Serving with data-parallel attention and the experts over `ep` (DeepSeek's decode layout), with and without MTP speculative decoding, equals one device."""

from __future__ import annotations

import pytest

from serve.engine import LLMEngine
from serve.llm import LLM
from serve.sampling_params import SamplingParams
from tests.serve.test_engine import PROMPTS


@pytest.fixture(scope="module")
def one_device():
  params = SamplingParams(temperature=0, max_tokens=12)
  one = LLM(max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256)
  return [out.token_ids for out in one.generate(PROMPTS, params)]


@pytest.mark.parametrize("num_speculative_tokens", [0, 1])
def test_two_ranks_give_one_devices_greedy_outputs(one_device, num_speculative_tokens):
  params = SamplingParams(temperature=0, max_tokens=12)
  want = one_device
  llm = LLM(max_num_seqs=2, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256, ep=2,
            num_speculative_tokens=num_speculative_tokens)
  engine = llm.engine
  for i, prompt in enumerate(PROMPTS):
    engine.add_request(str(i), prompt, params)
  rank_of, done = {}, {}
  while engine.has_unfinished():
    for out in engine.step():
      if out.finished:
        done[out.request_id] = out.token_ids
    rank_of.update({seq.request_id: seq.rank for seq in engine.scheduler.running})
  if num_speculative_tokens:  # requests finish sooner, so a later one may take a finished one's place
    assert set(rank_of.values()) == {0, 1}
  else:
    assert sorted(rank_of.values()) == [0, 0, 1, 1]  # two requests on each rank's cache
  assert [done[str(i)] for i in range(len(PROMPTS))] == want  # the experts' dispatch sums in another order: the
  # argmaxes of these prompts hold (a near-tie would show here first)
  assert all(blocks.usage == 0 for blocks in engine.ranks)
  assert (engine.accepted_tokens > 0) == bool(num_speculative_tokens)  # drafts verified on each rank's cache


def test_ep_must_fit_the_devices():
  with pytest.raises(ValueError, match="ep must be"):
    LLMEngine(num_kv_pages=8, max_model_len=256, ep=1000)
