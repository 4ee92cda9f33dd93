"""The engine: requests in, tokens out, one scheduling step at a time (not thread-safe: see `serve.async_llm`).

  engine = LLMEngine()                                   # the bundled demo checkpoint
  engine.add_request("a", "def main():", SamplingParams(temperature=0, max_tokens=32))
  while engine.has_unfinished():
    for out in engine.step():
      print(out.request_id, out.new_text, out.finished)

Layers (nano-vllm's): `Sequence` state, `BlockManager` pages with prefix hashing, a pure-Python
`Scheduler` (continuous batching, chunked prefill, preemption by recompute), and the
`ModelRunner`, the only device code. `serve.LLM` is the batch API on top; `serve.server` the
OpenAI-compatible HTTP server.
"""

from __future__ import annotations

import functools
import os
import random

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

import model as model_lib
from model.sharding import EP_AXIS
from serve.block_manager import PAGE_SIZE, BlockManager
from serve.detokenizer import IncrementalText
from serve.kv_spill import Spiller
from serve.model_fingerprint import model_fingerprint
from serve.model_runner import ModelRunner, StepRow, bucket
from serve.outputs import EngineStats, RequestOutput
from serve.sampling_params import SamplingParams
from serve.scheduler import Scheduler
from serve.sequence import Sequence
from serve.tokenizers import load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(name: str | None):
  """The `ModelConfig` that `load_model(name, ...)` builds, without loading weights."""
  if name is not None and not os.path.isdir(name) and name in model_lib.PRESETS:
    return model_lib.PRESETS[name]
  if name is not None and not os.path.isdir(name):
    raise ValueError(f"model must be a checkpoint directory or a preset ({sorted(model_lib.PRESETS)}), got {name!r}")
  return model_lib.ModelConfig.from_hf(name or model_lib.DEMO_CHECKPOINT)


def load_model(name: str | None, dtype: str, mesh=None):
  """(model, tokenizer, model name) for a checkpoint path, a preset name (random weights), or None (the demo);
  with a mesh, the routed experts are split over its `ep` axis."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if name is None or os.path.abspath(name) == os.path.abspath(model_lib.DEMO_CHECKPOINT):
    path, model_name = model_lib.DEMO_CHECKPOINT, "demo"
  elif os.path.isdir(name):
    path, model_name = name, os.path.basename(os.path.normpath(name))
  elif name in model_lib.PRESETS:
    from flax import nnx
    net = model_lib.DeepseekV3(model_lib.PRESETS[name], rngs=nnx.Rngs(0), dtype=DTYPES[dtype],
                               param_dtype=DTYPES[dtype])
    if mesh is not None:
      from model.sharding import shard_model
      shard_model(net, mesh)
    return net, load_tokenizer(None), name
  else:
    raise ValueError(f"model must be a checkpoint directory or a preset ({sorted(model_lib.PRESETS)}), got {name!r}")
  net = model_lib.from_pretrained(path, dtype=DTYPES[dtype], mesh=mesh)  # MTP modules load when present
  return net, load_tokenizer(path), model_name


class LLMEngine:
  """Continuous batching over one model on the default device.

  Args:
    model: a checkpoint directory, a preset name (random weights, for tests and benchmarks), or
      None for the bundled demo checkpoint (`model.DEMO_CHECKPOINT`).
    dtype: the weights' dtype ("float32" or "bfloat16"); the latent cache is bfloat16.
    max_num_seqs: the most requests running at once.
    max_num_batched_tokens: the most prompt tokens one prefill step computes (chunked prefill).
    num_kv_pages: pages of 64 tokens in the cache (one is reserved).
    max_model_len: the longest prompt plus output; default the model's
      `max_position_embeddings`, capped by the cache.
    seed: seeds the requests that bring none.
    ep: data-parallel attention with the routed experts split over `ep` devices (DeepSeek's
      decode layout): each rank has a cache of `num_kv_pages` pages and up to `max_num_seqs`
      sequences of its own, admitted to the rank with the longest cached prefix, then the most
      free pages; the MoE layers dispatch tokens to their experts' ranks. 1: one device.
    kv_store: an optional `storage.kvcache.KVCacheStore` whose `page_bytes` is one cache page of
      this model (`LLMEngine.page_bytes_for(model)`): pages leaving the device's prefix cache
      are written there (by a background thread, `serve.kv_spill`; `flush_kv_store` waits for
      it), and a prompt whose next full pages are there reads them back instead of recomputing
      them.
    num_speculative_tokens: 1 drafts a token per decode step with the model's MTP module and
      verifies it in the next step (DeepSeek-V3's MTP speculative decoding): up to two tokens per
      step, the same outputs as plain decoding (each token is still sampled from the model with
      its position's key). 0: plain decoding. Chained MTP depths are not built.
  """

  def __init__(self, model: str | None = None, *, dtype: str = "float32", max_num_seqs: int = 8,
               max_num_batched_tokens: int = 256, num_kv_pages: int = 128, max_model_len: int | None = None,
               seed: int = 0, ep: int = 1, kv_store=None, num_speculative_tokens: int = 0):
    if isinstance(ep, bool) or not isinstance(ep, int) or not 1 <= ep <= len(jax.devices()):
      raise ValueError(f"ep must be an int in [1, {len(jax.devices())}] (the devices here), got {ep!r}")
    mesh = None if ep == 1 else jax.make_mesh((ep,), (EP_AXIS,), devices=jax.devices()[:ep])
    if isinstance(num_speculative_tokens, bool) or num_speculative_tokens not in (0, 1):
      raise ValueError(f"num_speculative_tokens must be 0 or 1 (one MTP depth drafts), got {num_speculative_tokens!r}")
    net, self.tokenizer, self.model_name = load_model(model, dtype, mesh)
    config = net.config
    if num_speculative_tokens and not len(net.mtp):
      raise ValueError(f"num_speculative_tokens=1 drafts with the model's MTP module, and {self.model_name} has none "
                       f"(num_nextn_predict_layers={config.num_nextn_predict_layers}, or its checkpoint lacks the layers)")
    self.num_speculative_tokens = num_speculative_tokens
    limit = min(config.max_position_embeddings, (num_kv_pages - 1) * PAGE_SIZE)
    if max_model_len is None:
      max_model_len = limit
    if not isinstance(max_model_len, int) or not 2 <= max_model_len <= limit:
      raise ValueError(f"max_model_len must be in [2, {limit}] (the model's positions and the cache's "
                       f"{num_kv_pages - 1} pages), got {max_model_len!r}")
    self.max_model_len = max_model_len
    self.vocab_size = min(config.vocab_size, self.tokenizer.vocab_size)
    self.max_prefill_length = bucket(max(16, max_num_batched_tokens), 1 << 30)
    max_pages = BlockManager.pages_for(max_model_len + self.max_prefill_length)
    self.runner = ModelRunner(net, num_pages=num_kv_pages, max_pages_per_seq=max_pages, vocab_limit=self.vocab_size,
                              speculative=bool(num_speculative_tokens), mesh=mesh)
    self.kv_store = kv_store
    if kv_store is not None and kv_store.page_bytes != self.runner.page_bytes:
      raise ValueError(f"kv_store holds pages of {kv_store.page_bytes} bytes; this model's cache pages are "
                       f"{self.runner.page_bytes}")
    self._spiller = None if kv_store is None else Spiller(kv_store)
    # Page keys start from the model's fingerprint: a shared store never mixes models' pages.
    self.fingerprint = model_fingerprint(net, num_speculative_tokens=num_speculative_tokens)
    hooks = lambda rank: {} if kv_store is None else {"spill": functools.partial(self._spill, rank),
                                                       "load": functools.partial(self._load, rank)}
    self.ranks = [BlockManager(num_kv_pages, root=self.fingerprint, **hooks(rank)) for rank in range(ep)]
    self.blocks = self.ranks[0]
    self.scheduler = Scheduler(self.ranks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    self._seeds = random.Random(seed)
    self._arrivals = 0
    self._requests: dict[str, tuple[Sequence, IncrementalText]] = {}
    self.prompt_tokens = self.generation_tokens = 0
    self.draft_tokens = self.accepted_tokens = 0  # speculative decoding's drafts checked, and accepted

  # -- the on-disk KV-cache store --
  @staticmethod
  def page_bytes_for(config, num_speculative_tokens: int = 0) -> int:
    """Bytes of one cache page of a model with this `ModelConfig` (what a `kv_store` must hold);
    speculative decoding adds the MTP module's layer."""
    layers = config.num_hidden_layers + num_speculative_tokens
    return layers * PAGE_SIZE * (config.kv_lora_rank + config.qk_rope_head_dim) * 2

  def flush_kv_store(self, timeout_s: float | None = None) -> bool:
    """Waits until every spilled page is written to the KV-cache store; False on timeout (True without a store)."""
    return self._spiller is None or self._spiller.flush(timeout_s)

  # Both are best effort: the store is a cache, and its failure must not lose pages or requests.
  def _spill(self, rank: int, page: int, key: bytes) -> None:
    try:
      data = self.runner.read_page(page, rank)  # on the host now: the device page is reused next
    except Exception:  # noqa: BLE001 -- the page is simply not kept; the step goes on
      logging.warning("KV-cache store: reading a page to spill failed; it is dropped", exc_info=True)
      return
    self._spiller.put(key, data)

  def _load(self, rank: int, keys: list[bytes], pages: list[int]) -> int:
    waiting = self._spiller.lookup(keys)  # spilled, not yet written: served from memory
    missing = [key for key, page in zip(keys, waiting) if page is None]
    try:
      available = self.kv_store.batch_exists(missing) if missing else 0  # the leading run of `missing` stored
    except Exception:  # noqa: BLE001 -- the pages are recomputed instead
      logging.warning("KV-cache store: reading pages failed; they are recomputed", exc_info=True)
      available = 0
    run, stored = 0, 0  # the leading run of keys held here or in the store
    for page in waiting:
      if page is None:
        if stored == available:
          break
        stored += 1
      run += 1
    if stored:
      try:
        found, data = self.kv_store.get_many(missing[:stored])
      except Exception:  # noqa: BLE001
        logging.warning("KV-cache store: reading pages failed; they are recomputed", exc_info=True)
        found, data = np.zeros(stored, bool), None
      rows, k = [], 0
      for i, page in enumerate(waiting[:run]):
        if page is None:  # an entry evicted between batch_exists and get_many ends the run
          if not found[k]:
            run = i
            break
          page, k = data[k], k + 1
        rows.append(page)
    else:
      rows = waiting[:run]
    if run:
      self.runner.write_pages(pages[:run], np.stack(rows[:run]), rank)
    return run

  def shapes(self) -> list[tuple[int, int]]:
    """Every (rows per rank, tokens per row) a step can have: batch buckets times decode (1, or
    2 with a draft) and the prefill chunk buckets."""
    batches = sorted({bucket(n, self.scheduler.max_num_seqs) for n in range(1, self.scheduler.max_num_seqs + 1)})
    lengths = [self.decode_length] + sorted({bucket(max(16, n), self.max_prefill_length)
                            for n in (1 << k for k in range(self.max_prefill_length.bit_length()))})
    return [(b, n) for b in batches for n in lengths]

  @property
  def decode_length(self) -> int:
    """Tokens per row of a decode step: the newest token, and the draft."""
    return 1 + self.num_speculative_tokens

  def warmup(self) -> int:
    """Compiles every step shape now (each runs once on padding rows, which write only the
    trash page), so no request waits for a compile. Returns how many shapes were compiled."""
    todo = [shape for shape in self.shapes() if shape not in self.runner.compiled_shapes]
    for batch, length in todo:
      self.runner.run([], batch=batch, length=length, ranks=[])
    return len(todo)

  # -- requests --
  def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
    """Queues a request. ValueError: a duplicate id, an empty or too long prompt, bad token ids."""
    if not isinstance(request_id, str) or request_id in self._requests:
      raise ValueError(f"request_id must be a new string, got {request_id!r}")
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
      raise ValueError("prompt is empty")
    if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
      raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size})")
    if len(ids) >= self.max_model_len:
      raise ValueError(f"prompt is too long: {len(ids)} tokens, and this model serves at most {self.max_model_len} "
                       f"(prompt plus at least one generated token)")
    if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
      raise ValueError(f"prompt plus max_tokens is too long: {len(ids)} + {params.max_tokens} tokens, and this model "
                       f"serves at most {self.max_model_len}")
    if params.seed is None:
      params = SamplingParams(**{**params.__dict__, "seed": self._seeds.randrange(2**32)})
    seq = Sequence(request_id, ids, params, self._arrivals)
    self._arrivals += 1
    self.scheduler.add(seq)
    self._requests[request_id] = (seq, IncrementalText(self.tokenizer.decode, params.stop))

  def abort(self, request_id: str) -> None:
    """Drops a request and frees its pages; unknown or finished ids are ignored."""
    entry = self._requests.pop(request_id, None)
    if entry is not None:
      self.scheduler.remove(entry[0])

  def has_unfinished(self) -> bool:
    return bool(self._requests)

  def stats(self) -> EngineStats:
    ranks = self.ranks
    return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                       kv_cache_usage=sum(b.usage for b in ranks) / len(ranks),
                       prefix_cache_hit_tokens=sum(b.hit_tokens for b in ranks),
                       prefix_cache_query_tokens=sum(b.query_tokens for b in ranks), prompt_tokens=self.prompt_tokens,
                       generation_tokens=self.generation_tokens, spec_draft_tokens=self.draft_tokens,
                       spec_accepted_tokens=self.accepted_tokens, kv_store_spills=self._spill_counts())

  def _spill_counts(self) -> dict[str, int]:
    spiller = self._spiller
    if spiller is None:
      return {}
    return {"written": spiller.written, "not_stored": spiller.not_stored, "dropped": spiller.dropped,
            "failed": spiller.failed}

  # -- one step --
  def step(self) -> list[RequestOutput]:
    """Runs one batch; returns an output for each request that got a token (finished ones last time)."""
    batch = self.scheduler.schedule()
    if batch is None:
      if self.scheduler.has_work():  # cannot happen with free pages to spare: loud, not a silent stall
        raise RuntimeError(f"the scheduler placed none of {len(self.scheduler.waiting)} waiting and "
                           f"{len(self.scheduler.running)} running requests (free pages per rank: "
                           f"{[b.num_free for b in self.ranks]})")
      return []
    rows = []
    for seq, count in zip(batch.seqs, batch.num_tokens):
      start = seq.num_computed_tokens
      p = seq.params
      sampling = (p.temperature, p.top_k, p.top_p, p.seed)
      if not batch.prefill and count == 2:  # the newest token and its draft
        rows.append(StepRow([seq.token_ids[-1], seq.draft], start, seq.block_table, sampling, known=1))
        continue
      after = start + count  # a prompt chunk that is not the last knows the token after it (the MTP module's input)
      rows.append(StepRow(seq.token_ids[start:after], start, seq.block_table, sampling,
                          next_token=seq.token_ids[after] if after < len(seq) else -1))
    # Prefill chunks pad to powers of two from 16 (fewer programs to compile); decode is one token (two with drafts).
    length = bucket(max(16, max(batch.num_tokens)), self.max_prefill_length) if batch.prefill else self.decode_length
    ranks = [seq.rank for seq in batch.seqs]
    per_rank = max(ranks.count(r) for r in set(ranks))  # rows of the busiest rank: every rank pads to it
    result = self.runner.run(rows, batch=bucket(per_rank, self.scheduler.max_num_seqs), length=length, ranks=ranks)
    outputs = []
    for i, (seq, row) in enumerate(zip(batch.seqs, rows)):
      known = len(row.tokens) if row.known is None else row.known
      if batch.prefill:
        self.prompt_tokens += known
      if seq.num_computed_tokens + known < len(seq):  # a prompt chunk: no token yet
        seq.num_computed_tokens += known
        self.ranks[seq.rank].computed(seq)
        continue
      accepted = bool(result.accepted[i])
      if row.known is not None:
        self.draft_tokens += 1
        self.accepted_tokens += accepted
      # The draft's position is computed when accepted; the newest sample is computed next step.
      new = [int(result.first[i]), int(result.second[i])] if accepted else [int(result.first[i])]
      outputs.append(self._progress(seq, new))
      seq.num_computed_tokens += known + accepted
      if seq.finish_reason is None:
        self.ranks[seq.rank].computed(seq)
        seq.draft = int(result.draft[i]) if self._may_draft(seq) else None
    return outputs

  def _may_draft(self, seq: Sequence) -> bool:
    """Whether `seq`'s next step may take two tokens (a draft and the one after it)."""
    if not self.num_speculative_tokens:
      return False
    room = self.max_model_len - len(seq)
    if seq.params.max_tokens is not None:
      room = min(room, seq.params.max_tokens - seq.num_generated)
    return room >= 2

  def _progress(self, seq: Sequence, new: list[int]) -> RequestOutput:
    """Appends `new` tokens one by one, stopping at the first that finishes the request."""
    text = self._requests[seq.request_id][1]
    p = seq.params
    reason, pieces = None, []
    for token in new:
      seq.token_ids.append(token)
      self.generation_tokens += 1
      if not p.ignore_eos and token == self.tokenizer.eos_id:
        reason = "stop"
      elif p.max_tokens is not None and seq.num_generated >= p.max_tokens:
        reason = "length"
      elif len(seq) >= self.max_model_len:
        reason = "length"
      generated = seq.generated_ids
      if reason == "stop":
        generated = generated[:-1]  # EOS is not text
      pieces.append(text.update(generated, final=reason is not None))
      if text.stopped:
        reason = "stop"
      if reason is not None:
        break
    if reason is not None:
      seq.finish_reason = reason
      self.scheduler.remove(seq)
      del self._requests[seq.request_id]
    return RequestOutput(seq.request_id, seq.token_ids[:seq.num_prompt_tokens], list(seq.generated_ids), text.text,
                         "".join(pieces), reason is not None, reason, seq.num_cached_tokens)
