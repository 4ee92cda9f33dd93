"""The scheduler and block manager without JAX: admission, chunked prefill, alternation, preemption, prefix sharing."""

from __future__ import annotations

import pytest

from serve.block_manager import PAGE_SIZE, TRASH_PAGE, BlockManager
from serve.sampling_params import SamplingParams
from serve.scheduler import Scheduler
from serve.sequence import Sequence, Status

_arrivals = iter(range(10**6))


def seq(n: int, *, first: int = 0, name: str | None = None) -> Sequence:
  arrival = next(_arrivals)
  return Sequence(name or f"r{arrival}", [(first + i) % 251 for i in range(n)], SamplingParams(), arrival)


def run(scheduler: Scheduler, batch, token: int = 7) -> None:
  """What the engine does after a step: count the computed tokens, append a sampled one when a sequence is caught up."""
  for s, count in zip(batch.seqs, batch.num_tokens):
    s.num_computed_tokens += count
    scheduler.ranks[s.rank].computed(s)
    if s.num_computed_tokens == len(s):
      s.token_ids.append(token)


def test_prefill_is_chunked_under_the_token_budget_then_decodes():
  blocks = BlockManager(32)
  scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=100)
  a, b = seq(150), seq(30)
  scheduler.add(a)
  scheduler.add(b)
  batch = scheduler.schedule()
  assert batch.prefill and batch.seqs == [a] and batch.num_tokens == [100]  # a takes the whole budget
  run(scheduler, batch)
  batch = scheduler.schedule()
  assert batch.prefill and batch.seqs == [a, b] and batch.num_tokens == [50, 30]  # a's rest, then b admitted
  run(scheduler, batch)
  assert len(a) == 151 and len(b) == 31 and not a.prefilling
  batch = scheduler.schedule()
  assert not batch.prefill and batch.seqs == [a, b] and batch.num_tokens == [1, 1]
  assert a.block_table[:3] == a.block_table and len(a.block_table) == 3 and TRASH_PAGE not in a.block_table


def test_prefill_and_decode_alternate_when_both_have_work():
  scheduler = Scheduler(BlockManager(64), max_num_seqs=8, max_num_batched_tokens=64)
  first = seq(10)
  scheduler.add(first)
  run(scheduler, scheduler.schedule())
  kinds = []
  for _ in range(4):
    scheduler.add(seq(10))
    batch = scheduler.schedule()
    kinds.append(batch.prefill)
    run(scheduler, batch)
  assert kinds == [False, True, False, True]  # the first step was a prefill, so a decode comes next


def test_max_num_seqs_limits_admission():
  scheduler = Scheduler(BlockManager(64), max_num_seqs=2, max_num_batched_tokens=1000)
  for _ in range(3):
    scheduler.add(seq(10))
  batch = scheduler.schedule()
  assert len(batch.seqs) == 2 and len(scheduler.waiting) == 1


def test_out_of_pages_preempts_the_latest_and_it_is_recomputed_with_its_tokens():
  blocks = BlockManager(4)  # 3 usable pages
  scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=1000)
  a, b = seq(PAGE_SIZE), seq(PAGE_SIZE - 1, first=100)
  scheduler.add(a)
  scheduler.add(b)
  run(scheduler, scheduler.schedule())  # both prefilled: a holds 1 page (+1 for its new token), b 1
  assert len(a) == PAGE_SIZE + 1 and blocks.num_free == 1
  batch = scheduler.schedule()       # a needs its 2nd page: takes the last free one
  assert batch.seqs == [a, b]
  run(scheduler, batch)
  assert len(b) == PAGE_SIZE + 1 and blocks.num_free == 0
  batch = scheduler.schedule()       # b now needs a 2nd page: none left, so b (the latest) is preempted
  assert batch.seqs == [a] and scheduler.waiting[0] is b and b.status is Status.WAITING
  assert b.num_computed_tokens == 0 and b.block_table == [] and scheduler.num_preemptions == 1
  scheduler.remove(a)
  batch = scheduler.schedule()       # readmitted: its full first page is still cached, its new token recomputed
  assert batch.prefill and batch.seqs == [b] and batch.num_tokens == [1] and b.num_computed_tokens == PAGE_SIZE
  assert b.num_cached_tokens == 0  # what its prompt found at its first admission; readmission is no new prompt


def test_a_draft_takes_its_page_ahead_or_is_dropped_when_none_is_free():
  blocks = BlockManager(4)  # 3 usable pages
  scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=1000)
  a, b = seq(PAGE_SIZE - 1), seq(PAGE_SIZE - 1, first=100)
  scheduler.add(a)
  scheduler.add(b)
  run(scheduler, scheduler.schedule())  # both prefilled: 64 tokens each, their newest at position 63
  a.draft, b.draft = 5, 6
  batch = scheduler.schedule()  # newest + draft: the draft's position 64 is on a 2nd page, taken ahead
  assert not batch.prefill and batch.seqs == [a, b] and batch.num_tokens == [2, 1] and len(a.block_table) == 2
  # b's draft needed a 2nd page too, and none was left: b runs its newest token alone, nobody is preempted.
  assert b.draft is None and len(b.block_table) == 1 and scheduler.num_preemptions == 0
  a.num_computed_tokens += 1  # as the engine does after a rejected draft: its newest token computed, one sampled,
  a.token_ids.append(7)  # and a new draft
  a.draft = 9
  b.num_computed_tokens += 1
  b.token_ids.append(7)  # b's newest is now at position 64: it needs its 2nd page, and only then is one preempted
  batch = scheduler.schedule()
  assert batch.seqs == [a] and batch.num_tokens == [2] and scheduler.waiting[0] is b and scheduler.num_preemptions == 1


def test_a_sequence_longer_than_the_cache_is_refused():
  scheduler = Scheduler(BlockManager(3), max_num_seqs=1, max_num_batched_tokens=10)
  with pytest.raises(ValueError, match="more pages than the cache"):
    scheduler.add(seq(2 * PAGE_SIZE))


def test_prefix_pages_are_shared_and_survive_their_first_sequence():
  blocks = BlockManager(16)
  scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=1000)
  a = seq(3 * PAGE_SIZE + 5)
  scheduler.add(a)
  run(scheduler, scheduler.schedule())
  pages = list(a.block_table)
  scheduler.remove(a)               # its pages are free but keep their hashes
  b = seq(3 * PAGE_SIZE + 5)        # the same tokens
  scheduler.add(b)
  batch = scheduler.schedule()
  assert b.num_cached_tokens == 3 * PAGE_SIZE and batch.num_tokens == [5] and b.block_table[:3] == pages[:3]
  c = seq(2 * PAGE_SIZE)            # exactly two pages: the second is recomputed, so logits exist
  scheduler.add(c)
  run(scheduler, batch)
  assert not scheduler.schedule().prefill  # decode and prefill alternate: c is admitted by the next step
  batch = scheduler.schedule()
  assert c in batch.seqs and c.num_cached_tokens == PAGE_SIZE and c.block_table[0] == b.block_table[0]
  assert blocks.hit_tokens == 4 * PAGE_SIZE


def test_a_page_is_hashed_only_once_computed():
  blocks = BlockManager(16)
  scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=PAGE_SIZE)
  a = seq(2 * PAGE_SIZE + 1)
  scheduler.add(a)
  batch = scheduler.schedule()      # only the first page's tokens are computed in this step
  run(scheduler, batch)
  b = seq(2 * PAGE_SIZE + 1)
  scheduler.add(b)
  assert len(blocks.cached_prefix(b)) == 1  # a's second page is allocated but not computed: no hit


def test_data_parallel_ranks_each_hold_their_sequences_pages():
  ranks = [BlockManager(6), BlockManager(6)]  # 5 usable pages each
  scheduler = Scheduler(ranks, max_num_seqs=2, max_num_batched_tokens=1000)
  seqs = [seq(100, first=i) for i in range(3)]
  for s in seqs:
    scheduler.add(s)
  batch = scheduler.schedule()
  assert [s.rank for s in batch.seqs] == [0, 1, 0]  # the most free pages first: the ranks alternate
  assert all(p in range(1, 6) for s in seqs for p in s.block_table)  # page numbers are each rank's own
  assert sum(len(s.block_table) for s in seqs if s.rank == 0) == 5 - ranks[0].num_free == 4
  twin = seq(100, first=1)  # the same prompt as the sequence on rank 1: its cached prefix decides
  run(scheduler, batch)
  for s in seqs:
    scheduler.remove(s)
  scheduler.add(twin)
  scheduler.schedule()
  assert twin.rank == 1 and twin.num_cached_tokens == PAGE_SIZE
