"""The batch API for notebooks: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from typing import Sequence

from serve.engine import LLMEngine
from serve.outputs import RequestOutput
from serve.sampling_params import SamplingParams


class LLM:
  """An engine that runs whole batches of prompts to completion.

  Args:
    model: a checkpoint directory, a preset name, or None for the bundled demo checkpoint.
    **engine_args: `LLMEngine`'s (dtype, max_num_seqs, max_num_batched_tokens, num_kv_pages,
      max_model_len, seed, ep, kv_store, num_speculative_tokens).
  """

  def __init__(self, model: str | None = None, **engine_args):
    self.engine = LLMEngine(model, **engine_args)

  def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
    """Completes every prompt (a string, or token ids); returns their final outputs in order.

    Args:
      prompts: one prompt or a list of them.
      params: one `SamplingParams` for all, or one per prompt; default `SamplingParams()`.
    """
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
    prompts = [prompts] if single else list(prompts)
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"params must be one SamplingParams or one per prompt: {len(params)} for {len(prompts)}")
    ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
    done: dict[str, RequestOutput] = {}
    try:
      for request_id, prompt, p in zip(ids, prompts, params):  # a refused prompt leaves none of the batch queued
        self.engine.add_request(request_id, prompt, p)
      while len(done) < len(ids):
        for out in self.engine.step():
          if out.finished:
            done[out.request_id] = out
    finally:
      for request_id in ids:  # an interrupted batch leaves nothing behind
        self.engine.abort(request_id)
    return [done[request_id] for request_id in ids]
