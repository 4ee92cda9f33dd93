"""What the engine reports: per-request outputs (incremental and final) and engine-wide stats."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestOutput:
  """One request's progress after an engine step.

  Attributes:
    request_id: as given to `add_request`.
    prompt_token_ids: the prompt's tokens.
    token_ids: every generated token so far (stop strings' tokens included).
    text: the generated text so far, cut before a stop string.
    new_text: the part of `text` added by this step (what a stream sends).
    finished: the request is done; no further outputs follow.
    finish_reason: "stop" (EOS or a stop string), "length" (max_tokens or the model's limit),
      "abort" (cancelled), or None while running.
    num_cached_tokens: prompt tokens served from the prefix cache.
  """

  request_id: str
  prompt_token_ids: list[int]
  token_ids: list[int]
  text: str
  new_text: str
  finished: bool
  finish_reason: str | None
  num_cached_tokens: int = 0

  @property
  def usage(self) -> dict[str, int]:
    """OpenAI's usage object."""
    prompt, completion = len(self.prompt_token_ids), len(self.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """A snapshot for /metrics.

  Attributes:
    running, waiting: requests in each state.
    kv_cache_usage: fraction of KV pages in use (0..1).
    prefix_cache_hit_tokens, prefix_cache_query_tokens: prompt tokens found in the prefix cache,
      and prompt tokens looked up, since start.
    prompt_tokens, generation_tokens: tokens processed since start.
    spec_draft_tokens, spec_accepted_tokens: speculative decoding's drafts verified, and those
      accepted, since start (0 without speculative decoding).
    kv_store_spills: pages spilled to the KV-cache store since start, by outcome (`serve.kv_spill`'s
      counters: written, not_stored, dropped, failed); empty without a store.
  """

  running: int
  waiting: int
  kv_cache_usage: float
  prefix_cache_hit_tokens: int
  prefix_cache_query_tokens: int
  prompt_tokens: int
  generation_tokens: int
  spec_draft_tokens: int = 0
  spec_accepted_tokens: int = 0
  kv_store_spills: dict[str, int] = dataclasses.field(default_factory=dict)
