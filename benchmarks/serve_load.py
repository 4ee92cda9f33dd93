"""Serving under load: N concurrent streaming clients against `python -m serve`, and the same
requests through Hugging Face `generate` as the baseline.

  python -m benchmarks.serve_load [--requests=16] [--clients=4] [--prompt_len=32,256] [--output_len=16,64]
      [--num_speculative_tokens=0,1]

The workload is `--requests` completions drawn with `--seed`: prompt and output lengths from
`--distribution` (uniform, or lognormal around the geometric mean) within the given [min, max];
prompts are ASCII text cut at random offsets from Python's standard-library sources (the demo
model's tokenizer is byte-level: one character is one token). Every request is greedy
(temperature 0) with `max_tokens` = its output length and `ignore_eos` (the server's vLLM-style
extension), so each is expected to produce exactly that many tokens.

Fireflyer: `python -m serve` starts on a free port (the demo checkpoint, `--dtype`, and
`--max_num_seqs` = `--clients`), then a warm-up, timed on its own, compiles the step shapes:
groups of 1, 2, 4, ... concurrent requests per prefill-length bucket, then one pass of a second
workload drawn like the measured one. Concurrent arrivals can still group requests in a shape
neither produced, so the server runs with JAX_LOG_COMPILES and `compiles` counts the XLA
compilations in its log: during the warm-up (with their seconds) and during the measured run
(should be 0). Then `--clients` asyncio clients (aiohttp) take requests from the shared list
and stream each one (`stream_options.include_usage`). Per request: TTFT (send to the first
chunk with text), ITL (gaps between chunks with text: a chunk is one engine step's text,
normally one token, but a token with no text, such as a generated EOS, merges its gap into the
next chunk; `tok_per_chunk` shows how often) and end-to-end latency. Token counts are the usage
chunk's, so throughput counts what was generated whatever `ignore_eos` did; `complete` counts
requests that ended by length with exactly `max_tokens` tokens.

Baseline: `AutoModelForCausalLM.from_pretrained(model.DEMO_CHECKPOINT)` in the same dtype
(after the server has exited, so they never share the cores) runs the same requests in
arrival order as static batches of `--hf_batch` (default `--clients`; 1 = one at a time),
left-padded, greedy, `max_new_tokens` = the batch's longest output. No EOS id is given, so
`generate` never stops early, as with `ignore_eos` (`min_new_tokens` would instead mask EOS and
change greedy picks). Only each request's own output length counts as generated tokens: the
tokens a static batch computes past a row's length are its cost. `vs_hf` is the ratio of output
tokens/s; the baseline's wall time is the median of `--hf_repeats` passes. Greedy outputs are
compared with the server's text: `agree` is the mean fraction of each output before the first
difference (the server's latent cache is bfloat16, so they may part ways where two tokens are
nearly tied).

`--num_speculative_tokens` lists the server settings to run against the one baseline, each
with a server of its own (1: MTP speculative decoding; `accepted` is the drafts accepted over
those verified in the measured run, from the server's /metrics).

`--threads` (default: every CPU of this process) sets both sides' parallelism: the server is
pinned to that many CPUs, the baseline gets that many torch threads. On a host shared with
other work, 1 is the fairer setting: torch's OpenMP threads wait on each other at every op,
and a descheduled one stalls the rest (on a busy 2-core host, 2 threads ran `generate` 10x
slower than 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import queue as queue_module
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from absl import app, flags

from benchmarks.harness import append_results, format_table

_READY = "serve: listening on "
_COMPILED = "Finished XLA compilation of "  # jax's line per compile under JAX_LOG_COMPILES
_CORPUS_FILES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "inspect.py", "json/decoder.py",
                 "logging/__init__.py", "pathlib.py", "subprocess.py", "threading.py", "typing.py")


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: str  # ASCII, so its length is its token count under the byte-level tokenizer
  output_len: int


@dataclasses.dataclass
class Result:
  """One streamed request, timed on the client (perf_counter seconds)."""

  ttft: float
  itls: list[float]
  latency: float
  prompt_tokens: int
  completion_tokens: int
  text: str
  finish_reason: str | None


def corpus() -> str:
  """ASCII text of a few standard-library modules (offline, the same on every machine with this Python)."""
  root = os.path.dirname(os.__file__)
  parts = []
  for name in _CORPUS_FILES:
    with open(os.path.join(root, name), encoding="utf-8") as f:
      parts.append(f.read().encode("ascii", "ignore").decode().replace("\r", ""))
  return "\n".join(parts)


def _lengths(rng: np.random.Generator, n: int, bounds: tuple[int, int], distribution: str) -> np.ndarray:
  low, high = bounds
  if not 1 <= low <= high:
    raise ValueError(f"length bounds must satisfy 1 <= min <= max, got {bounds}")
  if distribution == "uniform":
    return rng.integers(low, high + 1, n)
  if distribution == "lognormal":  # median at the geometric mean; +-2 sigma spans [min, max]
    sigma = max(np.log(high / low) / 4, 1e-6)
    return np.clip(np.round(rng.lognormal(np.log(np.sqrt(low * high)), sigma, n)), low, high).astype(int)
  raise ValueError(f"distribution must be 'uniform' or 'lognormal', got {distribution!r}")


def workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], distribution: str,
             seed: int, text: str) -> list[Request]:
  """`num_requests` requests with lengths drawn from `distribution`, prompts cut from `text` at random offsets."""
  if num_requests < 1:
    raise ValueError(f"num_requests must be >= 1, got {num_requests}")
  if prompt_len[1] > len(text):
    raise ValueError(f"prompt_len max {prompt_len[1]} is longer than the corpus ({len(text)} characters)")
  rng = np.random.default_rng(seed)
  prompts = _lengths(rng, num_requests, prompt_len, distribution)
  outputs = _lengths(rng, num_requests, output_len, distribution)
  starts = rng.integers(0, len(text) - prompts + 1)
  return [Request(text[s:s + p], int(o)) for s, p, o in zip(starts, prompts, outputs)]


# -- the server --
class Server:
  """`python -m serve` in a subprocess on a free port; `url` once its ready line is printed."""

  def __init__(self, args: list[str], log_path: str, cpus: list[int] | None = None, timeout_s: float = 600):
    env = dict(os.environ)
    # `python -m benchmarks` forces 8 fake CPU devices for its ep suite; the server gets the host as it is.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_LOG_COMPILES"] = "1"  # each compile logged: counted to check the warm-up covered the run's shapes
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                 stderr=self._log, text=True, env=env,
                                 preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    lines: queue_module.Queue = queue_module.Queue()

    def drain():  # for the server's lifetime, so a chatty server never blocks on a full pipe
      for line in self.proc.stdout:
        lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        line = lines.get(timeout=1.0)
      except queue_module.Empty:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.close()
          raise RuntimeError(f"the server did not get ready (exit code {self.proc.returncode}); see {log_path}")
        continue
      if line.startswith(_READY):
        self.url = line[len(_READY):].strip()
        return

  def compiles(self) -> tuple[int, float]:
    """XLA compilations so far, and their seconds, from the server's log."""
    with open(self.log_path) as f:
      seconds = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in f if _COMPILED in line]
    return len(seconds), sum(seconds)

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()


# -- the clients --
async def stream_one(session, url: str, request: Request, ignore_eos: bool) -> Result:
  """One streamed completion, timed from the send."""
  body = {"prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  if ignore_eos:
    body["ignore_eos"] = True
  start = time.perf_counter()
  chunk_times, text, usage, finish = [], [], None, None
  async with session.post(f"{url}/v1/completions", json=body) as response:
    if response.status != 200:
      raise RuntimeError(f"the server answered {response.status}: {await response.text()}")
    async for raw in response.content:
      line = raw.decode().strip()
      if not line.startswith("data: "):
        continue
      data = line[len("data: "):]
      if data == "[DONE]":
        break
      chunk = json.loads(data)
      if "error" in chunk:
        raise RuntimeError(f"the server failed mid-stream: {chunk['error']}")
      for choice in chunk.get("choices", []):
        if choice.get("text"):
          chunk_times.append(time.perf_counter())
          text.append(choice["text"])
        finish = choice.get("finish_reason") or finish
      usage = chunk.get("usage") or usage
  end = time.perf_counter()
  if usage is None:
    raise RuntimeError("the stream ended without a usage chunk")
  return Result(ttft=(chunk_times[0] if chunk_times else end) - start, itls=list(np.diff(chunk_times)),
                latency=end - start, prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"], text="".join(text), finish_reason=finish)


async def run_clients(url: str, requests: list[Request], clients: int, ignore_eos: bool) -> tuple[list[Result], float]:
  """`clients` concurrent clients taking requests from the shared list; (results in list order, wall s)."""
  import aiohttp
  pending = iter(enumerate(requests))
  results: list[Result | None] = [None] * len(requests)
  timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
  async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
    async def client():
      for i, request in pending:  # one shared iterator: each request goes to whichever client is free
        results[i] = await stream_one(session, url, request, ignore_eos)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - start


def warmup_groups(max_num_seqs: int, max_num_batched_tokens: int, max_prompt: int) -> list[list[int]]:
  """Prompt lengths of concurrent groups that reach each (batch, prefill-length) bucket the engine
  pads to: powers of two from 16 for lengths, from 1 for batches (see `LLMEngine.step`)."""
  longest = min(max_num_batched_tokens, max_prompt)
  groups = []
  for batch in sorted({min(1 << k, max_num_seqs) for k in range(max_num_seqs.bit_length() + 1)}):
    length = 16
    while True:
      # One row in the bucket, the rest 1 token, all within one step's token budget.
      first = min(length, max_num_batched_tokens - (batch - 1))
      groups.append([first] + [1] * (batch - 1))
      if length >= longest:
        break
      length *= 2
  return groups


async def warm_up(url: str, groups: list[list[int]], extra: list[Request], clients: int, text: str,
                  ignore_eos: bool, holder_len: int) -> None:
  """Sends each group of `warmup_groups` (sorted by batch), then the `extra` workload."""
  import aiohttp
  async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=900)) as session:
    for i, group in enumerate(groups):
      holder = []
      if len(group) > 1:
        # Sent to an idle engine, the group's first request would run alone; a one-token request
        # with a long (already compiled) prefill keeps the engine busy while the group arrives,
        # and finishes with that step, so the group is admitted together.
        prompt = text[len(text) - 1000 * (i + 1):][:holder_len]
        holder.append(asyncio.ensure_future(stream_one(session, url, Request(prompt, 1), ignore_eos)))
        await asyncio.sleep(0.02)
      # Different text per group so the prefix cache cannot shorten the prefill.
      await asyncio.gather(*holder, *(stream_one(session, url, Request(text[1000 * i + 97 * j:][:n], 4), ignore_eos)
                                      for j, n in enumerate(group)))
  await run_clients(url, extra, clients, ignore_eos)


# -- the baseline --
def hf_generate(requests: list[Request], batch: int, dtype: str, threads: int,
                repeats: int = 3) -> tuple[list[list[int]], float]:
  """Hugging Face `generate` over `requests` in static batches; (each request's output ids, median wall s of
  `repeats` passes: a pass is cheap, and one alone is at the mercy of whatever else shares the cores)."""
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  import model
  from model.tokenizer import ByteTokenizer
  torch.set_num_threads(threads)
  hf_logging.set_verbosity_error()  # the checkpoint's MTP layer is reported as unexpected keys
  net = AutoModelForCausalLM.from_pretrained(model.DEMO_CHECKPOINT, dtype=getattr(torch, dtype)).eval()
  net.generation_config.eos_token_id = None  # never stop early, as the server's ignore_eos
  pad = ByteTokenizer.pad_id

  def generate(group: list[Request]) -> list[list[int]]:
    prompts = [list(r.prompt.encode()) for r in group]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    new = max(r.output_len for r in group)
    with torch.inference_mode():
      out = net.generate(ids, attention_mask=(ids != pad).long(), max_new_tokens=new, do_sample=False,
                         pad_token_id=pad)
    if out.shape[1] != width + new:
      raise RuntimeError(f"generate stopped early: {out.shape[1] - width} of {new} tokens")
    return [row[width:width + r.output_len].tolist() for row, r in zip(out, group)]

  generate(requests[:batch])  # first-call costs (allocations, kernel choices) left out, as the server's compiles
  walls = []
  for _ in range(repeats):
    start = time.perf_counter()
    outputs = [ids for i in range(0, len(requests), batch) for ids in generate(requests[i:i + batch])]
    walls.append(time.perf_counter() - start)
  return outputs, float(np.median(walls))


def agreement(server_text: str, hf_ids: list[int]) -> float:
  """The fraction of the output before the first difference, compared as decoded text."""
  from model.tokenizer import ByteTokenizer
  hf_text = ByteTokenizer().decode(hf_ids)
  longest = max(len(server_text), len(hf_text), 1)
  same = next((i for i, (a, b) in enumerate(zip(server_text, hf_text)) if a != b), min(len(server_text), len(hf_text)))
  return same / longest


def _ms(values, q: float) -> float:
  return round(float(np.percentile(values, q)) * 1e3, 1) if len(values) else float("nan")


def run(requests: int = 16, clients: int = 4, prompt_len: tuple[int, int] = (32, 256),
        output_len: tuple[int, int] = (16, 64), distribution: str = "uniform", seed: int = 0,
        dtype: str = "float32", max_num_batched_tokens: int = 256, num_kv_pages: int = 64,
        hf_batch: int | None = None, ignore_eos: bool = True, threads: int | None = None,
        hf_repeats: int = 3, num_speculative_tokens: tuple[int, ...] = (0,)) -> list[dict]:
  """Runs the server (once per speculative setting) and the baseline on one workload; table rows."""
  if clients < 1:
    raise ValueError(f"clients must be >= 1, got {clients}")
  available = sorted(os.sched_getaffinity(0))
  threads = threads or len(available)
  if not 1 <= threads <= len(available):
    raise ValueError(f"threads must be in [1, {len(available)}] (this process's CPUs), got {threads}")
  hf_batch = hf_batch or clients
  text = corpus()
  measured = workload(requests, prompt_len, output_len, distribution, seed, text)
  extra = workload(requests, prompt_len, output_len, distribution, seed + 1, text)
  max_model_len = prompt_len[1] + output_len[1] + 1
  served = []  # per speculative setting: (rows' name, warm-up groups, warm-up s, compiles, results, wall, drafts)
  for speculative in num_speculative_tokens:
    with tempfile.TemporaryDirectory() as tmp:
      server = Server(["--max_num_seqs", str(clients), "--max_num_batched_tokens", str(max_num_batched_tokens),
                       "--num_kv_pages", str(num_kv_pages), "--max_model_len", str(max_model_len), "--dtype", dtype,
                       "--num_speculative_tokens", str(speculative)],
                      os.path.join(tmp, "serve.log"),
                      cpus=None if threads == len(available) else available[:threads])
      try:
        groups = warmup_groups(clients, max_num_batched_tokens, prompt_len[1])
        at_ready, start = server.compiles(), time.perf_counter()
        asyncio.run(warm_up(server.url, groups, extra, clients, text, ignore_eos,
                            min(max_num_batched_tokens, prompt_len[1])))
        warmup_s = time.perf_counter() - start
        warmed = server.compiles()
        before = spec_counters(server.url)
        results, wall = asyncio.run(run_clients(server.url, measured, clients, ignore_eos))
        after = spec_counters(server.url)
        run_compiles = server.compiles()[0] - warmed[0]
      finally:
        server.close()
    name = "fireflyer" if not speculative else "fireflyer + MTP speculative decoding"
    drafts = (after[0] - before[0], after[1] - before[1])
    served.append((name, groups, warmup_s, (warmed[0] - at_ready[0], warmed[1] - at_ready[1]), run_compiles, results,
                   wall, drafts))
  hf_outputs, hf_wall = hf_generate(measured, hf_batch, dtype, threads, hf_repeats)

  expected = sum(r.output_len for r in measured)
  hf_out_s = expected / hf_wall
  shape = (f"{requests} requests, prompts {prompt_len[0]}-{prompt_len[1]}, outputs {output_len[0]}-{output_len[1]}, "
           f"{dtype}, {threads} CPU(s)")
  rows = []
  for name, groups, warmup_s, warm_compiles, run_compiles, results, wall, (drafts, accepted) in served:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    complete = sum(r.completion_tokens == q.output_len and r.finish_reason == "length"
                   for r, q in zip(results, measured))
    chunks = sum(len(r.itls) + 1 for r in results if r.text)
    ttft, itl = [r.ttft for r in results], [g for r in results for g in r.itls]
    out_s = completion_tokens / wall
    row = {"suite": "serve", "case": f"{name}, {clients} streaming clients, {shape}",
           "wall_s": round(wall, 2), "compiles": run_compiles, "req_s": round(requests / wall, 2),
           "in_tok_s": round(prompt_tokens / wall, 1),
           "out_tok_s": round(out_s, 1), "vs_hf": round(out_s / hf_out_s, 2),
           "ttft_p50_ms": _ms(ttft, 50), "ttft_p90_ms": _ms(ttft, 90), "ttft_p99_ms": _ms(ttft, 99),
           "itl_p50_ms": _ms(itl, 50), "itl_p90_ms": _ms(itl, 90), "itl_p99_ms": _ms(itl, 99),
           "e2e_p50_s": round(float(np.median([r.latency for r in results])), 2),
           "complete": f"{complete}/{requests}", "tok_per_chunk": round(completion_tokens / max(chunks, 1), 2),
           "agree": round(float(np.mean([agreement(r.text, h) for r, h in zip(results, hf_outputs)])), 3)}
    if drafts:
      row["accepted"] = f"{accepted}/{drafts} ({accepted / drafts:.0%})"
    rows += [{"suite": "serve", "case": f"{name} warm-up: {len(groups)} bucket groups + {requests} requests",
              "wall_s": round(warmup_s, 1), "compiles": f"{warm_compiles[0]} ({warm_compiles[1]:.0f} s)"}, row]
  rows.append({"suite": "serve",
               "case": f"baseline: HF generate, static batches of {hf_batch}, left-padded, {dtype}, {threads} thread(s)",
               "wall_s": round(hf_wall, 2), "req_s": round(requests / hf_wall, 2),
               "in_tok_s": round(sum(len(r.prompt) for r in measured) / hf_wall, 1), "out_tok_s": round(hf_out_s, 1),
               "vs_hf": 1.0})
  return rows


def spec_counters(url: str) -> tuple[int, int]:
  """(draft tokens verified, accepted) so far, from the server's /metrics."""
  with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
    text = response.read().decode()
  values = {}
  for line in text.splitlines():
    if line.startswith("fireflyer:spec_decode_num_"):
      name, value = line.rsplit(" ", 1)
      values[name] = int(float(value))
  return (values.get("fireflyer:spec_decode_num_draft_tokens_total", 0),
          values.get("fireflyer:spec_decode_num_accepted_tokens_total", 0))


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_integer("requests", 16, "Requests in the measured workload.")
  flags.DEFINE_integer("clients", 4, "Concurrent streaming clients (and the server's max_num_seqs).")
  flags.DEFINE_list("prompt_len", ["32", "256"], "min,max prompt tokens.")
  flags.DEFINE_list("output_len", ["16", "64"], "min,max output tokens.")
  flags.DEFINE_enum("distribution", "uniform", ["uniform", "lognormal"], "How lengths are drawn within [min, max].")
  flags.DEFINE_integer("seed", 0, "Seeds the workload (the warm-up's is seed + 1).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights' dtype, on the server and in the baseline.")
  flags.DEFINE_integer("max_num_batched_tokens", 256, "The server's prefill token budget per step.")
  flags.DEFINE_integer("num_kv_pages", 64, "The server's KV-cache pages (64 tokens each).")
  flags.DEFINE_integer("hf_batch", None, "The baseline's static batch size; default --clients (1: one at a time).")
  flags.DEFINE_bool("ignore_eos", True, "Send vLLM's ignore_eos extension (off for servers that refuse it).")
  flags.DEFINE_integer("threads", None, "CPUs for each side: the server is pinned to that many, the baseline gets "
                       "that many torch threads; default all of this process's.")
  flags.DEFINE_integer("hf_repeats", 3, "Baseline passes; the median is reported.")
  flags.DEFINE_list("num_speculative_tokens", ["0"], "The server's settings to run, each with its own server "
                    "(0: plain decoding, 1: MTP speculative decoding), e.g. 0,1.")


def _pair(values: list[str], name: str) -> tuple[int, int]:
  if len(values) != 2:
    raise app.UsageError(f"--{name} must be min,max, got {','.join(values)}")
  return int(values[0]), int(values[1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.requests, FLAGS.clients, _pair(FLAGS.prompt_len, "prompt_len"),
             _pair(FLAGS.output_len, "output_len"), FLAGS.distribution, FLAGS.seed, FLAGS.dtype,
             FLAGS.max_num_batched_tokens, FLAGS.num_kv_pages, FLAGS.hf_batch, FLAGS.ignore_eos, FLAGS.threads,
             FLAGS.hf_repeats, tuple(int(v) for v in FLAGS.num_speculative_tokens))
  append_results("serve", rows, command=" ".join(["python -m benchmarks.serve_load", *sys.argv[1:]]))
  columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("suite", "case")))
  print(format_table(rows, ["case", *columns]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
