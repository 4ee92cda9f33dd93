"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Pure Python (no JAX), so it is tested on its own. Each step is one of two kinds, because the
model runs them as differently shaped calls:
- a *prefill* step computes chunks of prompts (or of preempted sequences' tokens) under a token
  budget (`max_num_batched_tokens`): first the sequences already part-way through, then new
  ones admitted first-come first-served while pages, the budget and `max_num_seqs` allow;
- a *decode* step computes the newest token of every running sequence that has finished its
  prefill, and its draft when it has one (speculative decoding: two tokens, the draft's page
  taken ahead).
When both kinds have work, they alternate, so long prompts arriving do not stall generation and
generation does not starve admission. When a decode step needs a page and none is free, the most
recently admitted sequence is preempted: its pages are freed and it waits to be recomputed
(its generated tokens included), ahead of new arrivals.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence as Sequence_

from serve.block_manager import BlockManager
from serve.sequence import Sequence, Status


@dataclasses.dataclass
class ScheduledBatch:
  """One step's work.

  Attributes:
    seqs: the sequences that run.
    num_tokens: tokens each computes this step, starting at its `num_computed_tokens` (in a
      decode step, 2 for a sequence with a draft: its newest token and the draft).
    prefill: the kind of step.
  """

  seqs: list[Sequence]
  num_tokens: list[int]
  prefill: bool


class Scheduler:
  """Waiting and running sequences, and the pages they hold.

  Args:
    block_manager: the pages, or one block manager per data-parallel rank (a sequence runs on
      one rank, with that rank's cache).
    max_num_seqs: the most sequences running at once (per rank).
    max_num_batched_tokens: the most tokens a prefill step computes (a decode step computes at
      most `max_num_seqs` sequences' newest tokens, and their drafts).
  """

  def __init__(self, block_manager: BlockManager | Sequence_[BlockManager], *, max_num_seqs: int,
               max_num_batched_tokens: int):
    if max_num_seqs < 1:
      raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_num_batched_tokens < 1:
      raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    # One block manager per data-parallel rank (each rank's cache is its own); usually one.
    self.ranks = [block_manager] if isinstance(block_manager, BlockManager) else list(block_manager)
    self.blocks = self.ranks[0]
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []
    self._last_prefill = False
    self.num_preemptions = 0

  def add(self, seq: Sequence) -> None:
    if self.blocks.pages_for(len(seq) + 1) > self.blocks.num_pages - 1:
      raise ValueError(f"a sequence of {len(seq)} tokens needs more pages than the cache's {self.blocks.num_pages - 1}")
    seq.status = Status.WAITING
    self.waiting.append(seq)

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def remove(self, seq: Sequence) -> None:
    """Takes a sequence out (finished or aborted) and frees its pages."""
    if seq in self.running:
      self.running.remove(seq)
    elif seq in self.waiting:
      self.waiting.remove(seq)
    self.ranks[seq.rank].free(seq)
    seq.status = Status.FINISHED

  def schedule(self) -> ScheduledBatch | None:
    """The next step's batch, or None when nothing can run."""
    decoding = [seq for seq in self.running if not seq.prefilling]
    prefill = self._prefill_batch(dry_run=True)
    if prefill and (not decoding or not self._last_prefill):
      batch = self._prefill_batch(dry_run=False)
    elif decoding:
      batch = self._decode_batch()
    else:
      return None
    self._last_prefill = batch is not None and batch.prefill
    return batch

  def _prefill_batch(self, *, dry_run: bool) -> ScheduledBatch | None:
    budget = self.max_num_batched_tokens
    seqs, counts = [], []
    for seq in self.running:  # part-way through: they hold pages already
      if seq.prefilling and budget > 0:
        take = min(len(seq) - seq.num_computed_tokens, budget)
        seqs.append(seq)
        counts.append(take)
        budget -= take
    while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs * len(self.ranks):
      seq = self.waiting[0]
      rank = self._rank_for(seq)
      if rank is None:
        break
      if dry_run:
        return ScheduledBatch([seq], [1], True)
      seq.rank = rank
      self.ranks[rank].allocate(seq)
      self.waiting.popleft()
      seq.status = Status.RUNNING
      self.running.append(seq)
      take = min(len(seq) - seq.num_computed_tokens, budget)
      seqs.append(seq)
      counts.append(take)
      budget -= take
    return ScheduledBatch(seqs, counts, True) if seqs else None

  def _decode_batch(self) -> ScheduledBatch | None:
    ready = []
    for seq in sorted((s for s in self.running if not s.prefilling), key=lambda s: s.arrival):
      if seq.draft is not None and not self.ranks[seq.rank].can_append(seq, 1):
        seq.draft = None  # no page for the draft: one token this step rather than a preemption
      while seq in self.running and not self.ranks[seq.rank].can_append(seq, self._lookahead(seq)):
        self._preempt_latest(rank=seq.rank)
      if seq in self.running:
        self.ranks[seq.rank].append(seq, self._lookahead(seq))
        ready.append(seq)
    ready = [seq for seq in ready if seq in self.running]
    return ScheduledBatch(ready, [1 + self._lookahead(seq) for seq in ready], False) if ready else None

  @staticmethod
  def _lookahead(seq: Sequence) -> int:
    return 0 if seq.draft is None else 1

  def _rank_for(self, seq: Sequence) -> int | None:
    """The rank that takes `seq`: of those with room, the longest cached prefix, then the most
    free pages, then the fewest running sequences (DeepSeek's decode balancer weighs KV-cache
    use and request count); None when no rank has room."""
    best, best_key = None, None
    for rank, blocks in enumerate(self.ranks):
      running = sum(1 for s in self.running if s.rank == rank)
      if running >= self.max_num_seqs or not blocks.can_allocate(seq):
        continue
      key = (len(blocks.cached_prefix(seq)) if len(self.ranks) > 1 else 0, blocks.num_free, -running)
      if best_key is None or key > best_key:
        best, best_key = rank, key
    return best

  def _preempt_latest(self, rank: int) -> None:
    """Frees the most recently admitted running sequence on `rank` (the one asking, when it is the latest)."""
    victim = max((s for s in self.running if s.rank == rank), key=lambda s: s.arrival)
    self.running.remove(victim)
    self.ranks[rank].free(victim)
    victim.num_computed_tokens = 0
    victim.draft = None  # its recomputation drafts afresh
    victim.status = Status.WAITING
    self.waiting.appendleft(victim)
    self.num_preemptions += 1
