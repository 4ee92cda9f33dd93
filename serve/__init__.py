"""The inference engine and OpenAI-compatible server (not built yet).

Will hold: sequences, a block manager with prefix hashing, a continuous-batching scheduler,
the model runner, sampling, MTP speculative decoding, prefill/decode disaggregation and the
serving binary (`python -m serve`). Rebuilds DeepSeek's inference system.
"""
