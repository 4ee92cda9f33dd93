"""Pages leaving the device's prefix cache go to the on-disk KV-cache store and come back on a hit, with the same output."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import storage
from serve.engine import LLMEngine
from serve.llm import LLM
from serve.sampling_params import SamplingParams
from storage.kv import SqliteKV
from storage.kvcache import KVCacheStore
from tests.serve.test_engine import PROMPTS
from tests.storage.local_cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """(client, index KV) of a local storage cluster."""
  root = tmp_path_factory.mktemp("kvstore")
  with LocalCluster(root / "cluster", gc_delay_s=0.0) as cluster, storage.connect(cluster.address) as client:
    kv = SqliteKV(root / "index.db")
    yield client, kv
    kv.close()


def _store(cluster, root: str, num_speculative_tokens: int = 0) -> KVCacheStore:
  import model
  page_bytes = LLMEngine.page_bytes_for(model.ModelConfig.from_hf(model.DEMO_CHECKPOINT), num_speculative_tokens)
  return KVCacheStore(*cluster, root, page_bytes=page_bytes, capacity_pages=64)


@pytest.fixture(scope="module")
def store(cluster):
  return _store(cluster, "/serve-kv")


def test_spilled_pages_are_read_back_and_give_the_same_output(store):
  # The same shapes as test_engine's engine (compiled programs are shared); 7 usable pages.
  llm = LLM(max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256, kv_store=store)
  engine = llm.engine
  greedy = SamplingParams(temperature=0, max_tokens=8)
  long_prompt = PROMPTS[1] + PROMPTS[3]  # about 180 tokens: 2 full pages can be cached
  first = llm.generate(long_prompt, greedy)[0]
  assert first.num_cached_tokens == 0 and store.stats().used_pages == 0
  for prompt in PROMPTS:  # other prompts take the free pages over: the long prompt's cached pages are spilled
    llm.generate(prompt * 2, greedy)
  assert engine.flush_kv_store(timeout_s=60)  # spills are written by a background thread
  assert store.stats().used_pages >= 2 and engine.stats().kv_store_spills["written"] >= 2
  again = llm.generate(long_prompt, greedy)[0]
  assert again.num_cached_tokens == 128 and engine.blocks.store_hit_tokens >= 64  # at least one page from the store
  assert again.token_ids == first.token_ids


def test_two_ranks_with_speculative_decoding_spill_and_read_back(cluster):
  # Pages carry the MTP layer too (another page size: a store of its own), and a page spilled by
  # one data-parallel rank may come back on the other.
  spec_store = _store(cluster, "/serve-kv-mtp", num_speculative_tokens=1)
  llm = LLM(max_num_seqs=2, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256, kv_store=spec_store, ep=2,
            num_speculative_tokens=1)
  engine = llm.engine
  greedy = SamplingParams(temperature=0, max_tokens=8)
  long_prompt = PROMPTS[1] + PROMPTS[3]
  first = llm.generate(long_prompt, greedy)[0]
  for prompt in PROMPTS * 2:  # every rank's free pages are taken over: the long prompt's cached pages are spilled
    llm.generate([prompt * 2, prompt[::-1] * 2], greedy)
  assert engine.flush_kv_store(timeout_s=60)
  assert spec_store.stats().used_pages >= 2
  again = llm.generate(long_prompt, greedy)[0]
  assert again.num_cached_tokens == 128 and sum(b.store_hit_tokens for b in engine.ranks) >= 64
  assert again.token_ids == first.token_ids and engine.accepted_tokens > 0


def test_a_store_of_another_page_size_is_refused(store, tmp_path):
  with pytest.raises(ValueError, match="kv_store holds pages"):
    LLMEngine(num_kv_pages=8, max_model_len=256, kv_store=type("S", (), {"page_bytes": 12})())


class _BrokenStore:
  """A store whose every call fails, with the right page size."""

  def __init__(self, page_bytes):
    self.page_bytes = page_bytes

  def put_many(self, *args):
    raise OSError("simulated: the storage cluster is gone")

  batch_exists = get_many = put_many


def test_a_failing_store_costs_recomputation_not_pages_or_requests(store):
  llm = LLM(max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256,
            kv_store=_BrokenStore(store.page_bytes))
  greedy = SamplingParams(temperature=0, max_tokens=8)
  first = [out.token_ids for out in llm.generate([p * 2 for p in PROMPTS], greedy)]  # spills fail
  again = [out.token_ids for out in llm.generate([p * 2 for p in PROMPTS], greedy)]  # loads fail too
  assert again == first and llm.engine.blocks.num_free == 7 and not llm.engine.has_unfinished()
  assert llm.engine.flush_kv_store(timeout_s=60) and llm.engine.stats().kv_store_spills["failed"] > 0


class _MemoryStore:
  """A KV-cache store in a dict, whose puts wait for `open` (so spilled pages stay queued)."""

  def __init__(self, page_bytes):
    import threading
    self.page_bytes = page_bytes
    self.pages: dict[bytes, np.ndarray] = {}
    self.open = threading.Event()

  def put_many(self, keys, pages):
    self.open.wait(timeout=60)
    self.pages.update((key, page.copy()) for key, page in zip(keys, pages))
    return np.ones(len(keys), bool)

  def batch_exists(self, keys):
    return next((i for i, key in enumerate(keys) if key not in self.pages), len(keys))

  def get_many(self, keys):
    found = np.array([key in self.pages for key in keys])
    return found, np.stack([self.pages.get(key, np.zeros(self.page_bytes, np.uint8)) for key in keys])


def test_a_load_takes_queued_spills_and_stored_pages_in_prefix_order(store):
  memory = _MemoryStore(store.page_bytes)
  engine = LLMEngine(max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=8, max_model_len=256, kv_store=memory)
  rng = np.random.default_rng(0)
  # bfloat16 values, as the cache holds (random bytes would include NaNs, which the device may canonicalize).
  page = lambda: rng.standard_normal(store.page_bytes // 2).astype(jnp.bfloat16).view(np.uint8)
  queued, stored = {b"q1": page(), b"q3": page()}, {b"s2": page(), b"s5": page()}
  memory.pages.update(stored)
  for key, data in queued.items():
    assert engine._spiller.put(key, data)  # the store is slow: these wait in memory
  try:
    # The leading run held somewhere is q1, s2, q3; "x4" is nowhere, so s5 (stored) is not used.
    assert engine._load(0, [b"q1", b"s2", b"q3", b"x4", b"s5"], [3, 4, 5, 6, 7]) == 3
    for device_page, want in zip([3, 4, 5], [queued[b"q1"], stored[b"s2"], queued[b"q3"]]):
      np.testing.assert_array_equal(engine.runner.read_page(device_page), want)
  finally:
    memory.open.set()
  assert engine.flush_kv_store(timeout_s=60) and set(memory.pages) == {b"q1", b"q3", b"s2", b"s5"}


def test_page_keys_start_from_the_models_fingerprint():
  # A store shared by servers of other weights, dtypes or cache layouts must never hand one the other's pages.
  from serve.sequence import Sequence
  from storage.kvcache import prefix_hashes
  engines = [LLMEngine(num_kv_pages=8, max_model_len=256, **kwargs)
             for kwargs in ({}, {}, {"dtype": "bfloat16"}, {"num_speculative_tokens": 1})]
  engines.append(LLMEngine("tiny", num_kv_pages=8, max_model_len=256))  # another model (random weights)
  fingerprints = [engine.fingerprint for engine in engines]
  assert fingerprints[0] == fingerprints[1] and len(set(fingerprints)) == 4
  tokens = list(range(1, 130))
  keys = [engine.blocks._hashes(Sequence("r", tokens, SamplingParams(), 0), 2) for engine in engines]
  assert keys[0] == prefix_hashes(tokens[:128], 64, fingerprints[0]) == keys[1]
  assert len({tuple(k) for k in keys}) == 4
