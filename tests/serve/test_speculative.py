"""MTP speculative decoding: the same tokens as plain decoding (greedy and seeded sampling), the
drafts the MTP module's, finishing inside an accepted pair, and bad settings refused."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from serve.engine import LLMEngine
from serve.llm import LLM
from serve.sampling_params import SamplingParams
from tests.serve.test_engine import PROMPTS

# 7 usable pages for 4 sequences of ~180 tokens: decoding runs out of pages and preempts (as in test_engine).
_ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256)


@pytest.fixture(scope="module")
def plain():
  return LLM(**_ENGINE)


@pytest.fixture(scope="module")
def speculative():
  return LLM(num_speculative_tokens=1, **_ENGINE)


def _ids(outputs):
  return [out.token_ids for out in outputs]


def _mtp_logits(engine, tokens: list[int]) -> np.ndarray:
  """The training path's MTP logits (`DeepseekV3.loss`'s depth 0) over `tokens`: row i predicts token i + 2."""
  net = nnx.merge(engine.runner.graphdef, engine.runner.state)
  ids = jnp.asarray(tokens, jnp.int32)[None]
  hidden, _ = net.hidden_states(ids)
  following = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
  out, _ = net.mtp[0](hidden, net.embed_tokens(following), jnp.arange(len(tokens), dtype=jnp.int32)[None])
  return np.asarray(net.mtp_logits(out))[0, :, :engine.vocab_size]


def test_greedy_tokens_and_drafts_equal_plain_decoding_and_the_mtp_module(plain, speculative):
  # Through chunked prefill, batching and preemption. Outputs equal plain decoding's whatever the
  # drafts are, so the drafts are checked too: each must be the MTP module's argmax, teacher-forced
  # on the engine's tokens (a wrong position or a wrong MTP input shows here, not in the outputs).
  engine = speculative.engine
  params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
  drafts, accepted, preemptions = engine.draft_tokens, engine.accepted_tokens, engine.scheduler.num_preemptions
  for i, prompt in enumerate(PROMPTS):
    engine.add_request(f"greedy-{i}", prompt, params)
  seqs = [engine._requests[f"greedy-{i}"][0] for i in range(len(PROMPTS))]
  made = [[] for _ in seqs]  # (sequence length when drafted, draft)
  while engine.has_unfinished():
    engine.step()
    for seq, record in zip(seqs, made):
      if seq.draft is not None and seq.finish_reason is None and (not record or record[-1][0] != len(seq)):
        record.append((len(seq), seq.draft))
  assert [seq.generated_ids for seq in seqs] == _ids(plain.generate(PROMPTS, params))
  assert engine.scheduler.num_preemptions > preemptions, "meant to preempt a sequence holding a draft"
  checked = off = 0
  for seq, record in zip(seqs, made):
    logits = _mtp_logits(engine, seq.token_ids)
    for length, draft in record:  # drafted with `length` tokens: the token at position `length`, from row length - 2
      row = logits[length - 2]
      checked += 1
      if draft != row.argmax():
        off += 1  # only near-ties: the cache holds bf16 latents, the reference float32
        assert row.max() - row[draft] < 0.05, (seq.request_id, length, draft, int(row.argmax()))
  assert checked >= 40 and off <= 2
  drafts, accepted = engine.draft_tokens - drafts, engine.accepted_tokens - accepted
  assert 0 < accepted <= drafts
  stats = engine.stats()
  assert stats.spec_draft_tokens == engine.draft_tokens and stats.spec_accepted_tokens == engine.accepted_tokens
  assert engine.blocks.usage == 0.0 and not engine.has_unfinished()


def test_seeded_sampling_equals_plain_decoding(plain, speculative):
  # Sampling, then comparing with the draft, is exact: each token comes from the model with its position's key.
  params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=7),
            SamplingParams(temperature=1.0, top_k=20, max_tokens=40, seed=8)]
  engine = speculative.engine
  drafts, accepted = engine.draft_tokens, engine.accepted_tokens
  assert _ids(speculative.generate(PROMPTS[:2], params)) == _ids(plain.generate(PROMPTS[:2], params))
  assert engine.draft_tokens > drafts and engine.accepted_tokens > accepted


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6])
def test_max_tokens_is_exact_when_a_step_brings_two(plain, speculative, max_tokens):
  params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
  got = speculative.generate(PROMPTS[0], params)[0]
  assert len(got.token_ids) == max_tokens and got.finish_reason == "length"
  assert got.token_ids == plain.generate(PROMPTS[0], params)[0].token_ids


def test_a_stop_string_inside_an_accepted_pair_ends_the_output_where_plain_decoding_does(plain, speculative):
  params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
  full = plain.generate(PROMPTS[1], params)[0]
  stop = full.text[9:12]  # ends somewhere in the output: whichever token of a pair completes it
  want = plain.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
  got = speculative.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
  assert got.finish_reason == want.finish_reason == "stop"
  assert (got.text, got.token_ids) == (want.text, want.token_ids)


def test_streamed_pieces_join_to_the_text(speculative):
  engine = speculative.engine
  engine.add_request("stream", PROMPTS[3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
  pieces, counts = [], []
  while engine.has_unfinished():
    for out in engine.step():
      pieces.append(out.new_text)
      counts.append(len(out.token_ids))
      final = out
  assert "".join(pieces) == final.text and counts[-1] == 30
  assert any(b - a == 2 for a, b in zip(counts, counts[1:])), "no step brought two tokens"


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="num_speculative_tokens must be 0 or 1"):
    LLMEngine(num_speculative_tokens=2, **_ENGINE)
  with pytest.raises(ValueError, match="num_speculative_tokens must be 0 or 1"):
    LLMEngine(num_speculative_tokens=True, **_ENGINE)


def test_decode_steps_are_two_tokens_and_pages_carry_the_mtp_layer(speculative):
  engine = speculative.engine
  assert engine.shapes() == [(b, n) for b in (1, 2, 4) for n in (2, 16)]
  config = engine.runner.config
  assert engine.runner.cache.shape[0] == config.num_hidden_layers + 1
  assert engine.runner.page_bytes == LLMEngine.page_bytes_for(config, 1)  # what a kv_store must hold
