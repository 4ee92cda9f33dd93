"""`python -m serve`: the OpenAI-compatible server, or one completion printed as it streams.

  python -m serve                                  # the bundled demo model on 127.0.0.1:8000
  python -m serve --model PATH --port 8080 --max_num_seqs 16
  python -m serve --prompt "Once upon a time" --max_tokens 32 --temperature 0
"""

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Checkpoint directory or preset name; default: the bundled demo checkpoint "
                    "(model.DEMO_CHECKPOINT).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on; 0 picks a free one (the ready line names it).")
flags.DEFINE_integer("max_num_seqs", 8, "Most sequences in one batch.")
flags.DEFINE_integer("max_num_batched_tokens", 256, "Most prompt tokens one prefill step computes (chunked prefill).")
flags.DEFINE_integer("num_kv_pages", 128, "KV-cache pages.")
flags.DEFINE_integer("max_model_len", None, "Longest sequence, prompt plus output; default: the model's.")
flags.DEFINE_string("dtype", "float32", "dtype of the weights (float32 or bfloat16); the latent KV cache is bfloat16.")
flags.DEFINE_integer("seed", 0, "Engine seed, for requests that give none.")
flags.DEFINE_integer("ep", 1, "Devices for data-parallel attention with the routed experts split over them "
                     "(DeepSeek's decode layout); each has its own KV cache of --num_kv_pages pages and up to "
                     "--max_num_seqs sequences.")
flags.DEFINE_integer("num_speculative_tokens", 0, "1: draft a token per decode step with the model's MTP module "
                     "and verify it in the next (DeepSeek-V3's speculative decoding; same outputs, up to two tokens "
                     "per step). 0: plain decoding.")
flags.DEFINE_float("health_stall_s", 600.0, "/health answers 503 while one engine step has run longer than this "
                   "(seconds; a first use of a shape compiles).")
flags.DEFINE_string("kv_store", None, "3fs://HOST:PORT/ROOT: spill prefix-cache pages leaving the device to this "
                    "storage cluster's KV-cache store, and read them back on a hit (needs --kv_store_index).")
flags.DEFINE_string("kv_store_index", None, "The KV-cache store's index: sqlite:PATH (this host's servers share "
                    "it), etcd://HOST:PORT (every host's), or memory (this server only).")
flags.DEFINE_integer("kv_store_pages", None, "The KV-cache store's capacity in pages: needed when this "
                     "server creates the store; an existing store keeps its own.")
flags.DEFINE_bool("warmup", False, "Compile every batch and chunk shape before serving (the ready line waits "
                  "for it), so no request waits for a compile.")
flags.DEFINE_string("prompt", None, "Print one completion of this prompt, token by token, and exit (no server).")
flags.DEFINE_integer("max_tokens", 64, "--prompt mode: most tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "--prompt mode: sampling temperature (0: greedy).")
flags.DEFINE_float("top_p", 1.0, "--prompt mode: nucleus sampling threshold.")
flags.DEFINE_integer("top_k", 0, "--prompt mode: keep the k most likely tokens (0: all).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  import jax

  import model
  from serve.engine import LLMEngine
  from serve.sampling_params import SamplingParams

  logging.info("process %d of %d", jax.process_index(), jax.process_count())
  try:
    if not FLAGS.health_stall_s > 0:
      raise ValueError(f"--health_stall_s must be > 0, got {FLAGS.health_stall_s}")
    params = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                            max_tokens=FLAGS.max_tokens)
    name = FLAGS.model or model.DEMO_CHECKPOINT
    engine = LLMEngine(name, dtype=FLAGS.dtype, max_num_seqs=FLAGS.max_num_seqs,
                       max_num_batched_tokens=FLAGS.max_num_batched_tokens, num_kv_pages=FLAGS.num_kv_pages,
                       max_model_len=FLAGS.max_model_len, seed=FLAGS.seed, ep=FLAGS.ep,
                       num_speculative_tokens=FLAGS.num_speculative_tokens, kv_store=_kv_store(name))
    if FLAGS.prompt is not None:
      complete(engine, FLAGS.prompt, params)
      engine.flush_kv_store(timeout_s=30)  # pages spilled meanwhile (--kv_store), before the process ends
      return
  except ValueError as err:
    raise app.UsageError(str(err)) from None

  import asyncio

  from serve import server

  if FLAGS.warmup:
    logging.info("warm-up: compiled %d step shapes", engine.warmup())

  asyncio.run(server.serve(engine, host=FLAGS.host, port=FLAGS.port, health_stall_s=FLAGS.health_stall_s,
                           on_ready=lambda url: print(f"serve: listening on {url}", flush=True)))


def _kv_store(model_name: str):
  """The `--kv_store` flags' `storage.kvcache.KVCacheStore` (None without them); ValueError naming the flag."""
  if FLAGS.kv_store is None:
    if FLAGS.kv_store_index is not None or FLAGS.kv_store_pages is not None:
      raise ValueError("--kv_store_index and --kv_store_pages need --kv_store")
    return None
  if not FLAGS.kv_store.startswith("3fs://") or not FLAGS.kv_store[len("3fs://"):].split("/")[0]:
    raise ValueError(f"--kv_store must be 3fs://HOST:PORT/ROOT, got {FLAGS.kv_store!r}")
  if FLAGS.kv_store_index is None:
    raise ValueError("--kv_store needs --kv_store_index (sqlite:PATH, etcd://HOST:PORT or memory)")
  if FLAGS.kv_store_pages is not None and FLAGS.kv_store_pages < 1:
    raise ValueError(f"--kv_store_pages must be >= 1, got {FLAGS.kv_store_pages}")
  if FLAGS.num_speculative_tokens not in (0, 1):  # before a store of the wrong page size is created
    raise ValueError(f"--num_speculative_tokens must be 0 or 1, got {FLAGS.num_speculative_tokens}")
  import storage
  from serve.engine import LLMEngine, model_config
  from storage.kv import open_kv
  from storage.kv import KVError
  from storage.kvcache import KVCacheStore
  from storage.transport import StorageError
  address, _, root = FLAGS.kv_store[len("3fs://"):].partition("/")
  try:
    index = open_kv(FLAGS.kv_store_index)
  except (ValueError, OSError, KVError) as err:
    raise ValueError(f"--kv_store_index: {err}") from None
  page_bytes = LLMEngine.page_bytes_for(model_config(model_name), FLAGS.num_speculative_tokens)
  try:
    return KVCacheStore(storage.connect(address, timeout_s=10), index, "/" + (root or "kvcache"),
                        page_bytes=page_bytes, capacity_pages=FLAGS.kv_store_pages)
  except ValueError as err:  # e.g. a new store without --kv_store_pages, or another page size than this model's
    raise ValueError(f"--kv_store (--kv_store_pages when it is created): {err}") from None
  except (OSError, StorageError, KVError) as err:  # unreachable, refused, timed out; the index too
    raise ValueError(f"--kv_store: cannot use the storage cluster at {address} or its index: {err!r}") from None


def complete(engine, prompt: str, params) -> None:
  """Streams one completion of `prompt` to stdout as the engine produces it."""
  engine.add_request("prompt", prompt, params)
  while engine.has_unfinished():
    for output in engine.step():
      sys.stdout.write(output.new_text)
      sys.stdout.flush()
  sys.stdout.write("\n")


if __name__ == "__main__":
  app.run(main)
