"""Serving DeepSeek-V3 models: the engine, the batch API, and the OpenAI-compatible server.

  import serve
  llm = serve.LLM()                                       # the bundled demo checkpoint
  out = llm.generate("def main():", serve.SamplingParams(temperature=0.7, max_tokens=32, seed=0))
  print(out[0].text)

`serve.engine.LLMEngine` runs continuous batching over the paged MLA latent cache (pages with
prefix hashing, chunked prefill, preemption by recompute, optional spill to the storage
KV-cache store); `serve.LLM` runs batches to completion; `python -m serve` is the HTTP server
(`/v1/completions`, `/v1/chat/completions`, streaming, `/metrics`) or, with `--prompt`, one
streamed completion. Rebuilds the serving side of DeepSeek's inference system on one host.
"""

from serve.engine import LLMEngine
from serve.llm import LLM
from serve.outputs import EngineStats, RequestOutput
from serve.sampling_params import SamplingParams

__all__ = ["LLM", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
