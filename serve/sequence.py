"""One request in the engine: its tokens, its pages, and its state (waiting, running, finished)."""

from __future__ import annotations

import enum

from serve.sampling_params import SamplingParams


class Status(enum.Enum):
  WAITING = "waiting"    # queued, or preempted (its pages freed; it is recomputed when readmitted)
  RUNNING = "running"    # has pages; prefilling its prompt in chunks, then decoding
  FINISHED = "finished"


class Sequence:
  """A request's token ids (prompt, then generated) and its place in the paged cache.

  Attributes:
    request_id: the caller's id.
    token_ids: prompt then generated tokens.
    num_prompt_tokens: the prompt's length.
    num_computed_tokens: tokens whose latent rows are in the cache (the prefix cache's count
      included); the rest are computed by the next steps.
    num_cached_tokens: prompt tokens found in the prefix cache at its first admission.
    block_table: the cache pages holding the tokens, in order.
    params: how to sample and when to stop.
    arrival: order of arrival, for first-come first-served admission.
    draft: speculative decoding's guess of the token after the newest (from the MTP module),
      checked by the next decode step; None when there is none.
  """

  def __init__(self, request_id: str, token_ids: list[int], params: SamplingParams, arrival: int):
    self.request_id = request_id
    self.token_ids = list(token_ids)
    self.num_prompt_tokens = len(token_ids)
    self.num_computed_tokens = 0
    self.num_cached_tokens = 0
    self.block_table: list[int] = []
    self.num_hashed_pages = 0  # leading pages whose prefix hash the block manager registered
    self.page_hashes: list[bytes] = []  # prefix hashes of its full pages, as far as computed
    self.admitted = False  # got pages once (a preempted sequence is readmitted)
    self.rank = 0  # the data-parallel rank whose cache holds its pages
    self.params = params
    self.arrival = arrival
    self.status = Status.WAITING
    self.finish_reason: str | None = None
    self.draft: int | None = None

  def __len__(self) -> int:
    return len(self.token_ids)

  @property
  def num_generated(self) -> int:
    return len(self.token_ids) - self.num_prompt_tokens

  @property
  def generated_ids(self) -> list[int]:
    return self.token_ids[self.num_prompt_tokens:]

  @property
  def prefilling(self) -> bool:
    """Whether tokens other than the newest one still need computing (the prompt, or all of a
    preempted sequence's tokens)."""
    return self.num_computed_tokens < len(self.token_ids) - 1

  def __repr__(self) -> str:
    return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self)}, "
            f"computed={self.num_computed_tokens}, pages={self.block_table})")
