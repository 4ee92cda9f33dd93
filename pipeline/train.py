"""`python -m pipeline.train`: trains a DeepSeek-V3 preset with a pipeline schedule on a `pp x ep` mesh.

  python -m pipeline.train --preset=demo --pp=2 --ep=4 --schedule=dualpipev --chunks=4 --steps=200 \\
      --checkpoint_dir=/tmp/run --checkpoint_every=50

Text comes from `--data` (files or globs; default: the Python standard library's sources,
offline everywhere), byte-tokenized. It prints the next-token loss and tokens/s with a progress
bar (and with `--metrics_file` a JSON line per step: MTP losses, gradient norm, learning rate),
writes the model's safetensors checkpoint (plus optimizer state and tokenizer) every
`--checkpoint_every` steps and at the end, and `--resume` continues from the latest one in
`--checkpoint_dir`. Unknown flags and settings that cannot work together are usage errors. On
CPU hosts it runs on as many devices as `pp x ep` (fake CPU devices are made when the host has
fewer).

Several hosts: pass `--coordinator_address`, `--num_processes` and `--process_id`; every process
runs the same command (collectives over gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string("preset", "demo", "model preset (model.PRESETS)")
flags.DEFINE_integer("pp", 1, "pipeline ranks (mesh axis pp)")
flags.DEFINE_integer("ep", 1, "expert-parallel ranks (mesh axis ep)")
flags.DEFINE_string("schedule", "1f1b", "pipeline schedule: 1f1b, zb1p, dualpipe, dualpipev")
flags.DEFINE_integer("chunks", 2, "micro-batches per step")
flags.DEFINE_integer("micro_batch", 8, "sequences per micro-batch (split over ep)")
flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
flags.DEFINE_integer("steps", 200, "optimizer steps in all (the schedule's length)")
flags.DEFINE_float("lr", 3e-3, "peak learning rate")
flags.DEFINE_integer("warmup_steps", 20, "linear warm-up steps")
flags.DEFINE_float("min_lr_ratio", 0.1, "final learning rate / peak (cosine decay)")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay")
flags.DEFINE_float("clip_norm", 1.0, "clip gradients to this global norm (0: no clipping)")
flags.DEFINE_float("mtp_weight", 0.3, "weight of the multi-token-prediction loss (0: MTP modules untrained)")
flags.DEFINE_bool("fp8", False, "attention and dense-MLP projections compute in FP8 (DeepSeek-V3's recipe)")
flags.DEFINE_integer("seed", 0, "initialization and data order")
flags.DEFINE_list("data", [], "text files or globs (default: the Python standard library's .py files)")
flags.DEFINE_integer("max_corpus_mb", 64, "read at most this much text")
flags.DEFINE_string("checkpoint_dir", None, "where checkpoints go (step_NNNNNNNN/ subdirectories): a local "
                    "directory (safetensors, what serving loads) or a URL such as 3fs://HOST:PORT/dir (the sharded "
                    "train state, through storage.checkpoint)")
flags.DEFINE_integer("checkpoint_every", 0, "steps between checkpoints (0: only at the end)")
flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --checkpoint_dir")
flags.DEFINE_integer("log_every", 10, "steps between log lines")
flags.DEFINE_string("metrics_file", None, "append one JSON line per step (loss parts, grad norm, lr, tokens/s)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes")
flags.DEFINE_integer("num_processes", 1, "processes in the job")
flags.DEFINE_integer("process_id", 0, "this process's index")
FLAGS = flags.FLAGS


def _setup_devices() -> None:
  """Before jax starts: enough fake CPU devices for the mesh, and gloo for CPU collectives across processes."""
  want = FLAGS.pp * FLAGS.ep // max(FLAGS.num_processes, 1)
  xla = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla and want > 1:
    os.environ["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={want}".strip()
  import jax
  if FLAGS.num_processes > 1:
    if not FLAGS.coordinator_address:
      raise app.UsageError("--num_processes > 1 needs --coordinator_address")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.resume and not FLAGS.checkpoint_dir:
    raise app.UsageError("--resume needs --checkpoint_dir")
  if FLAGS.checkpoint_every and not FLAGS.checkpoint_dir:
    raise app.UsageError("--checkpoint_every needs --checkpoint_dir")
  _setup_devices()
  import jax
  from tqdm import tqdm

  from pipeline.data import TokenCorpus
  from pipeline.trainer import TrainConfig, Trainer
  config = TrainConfig(preset=FLAGS.preset, pp=FLAGS.pp, ep=FLAGS.ep, schedule=FLAGS.schedule, chunks=FLAGS.chunks,
                       micro_batch=FLAGS.micro_batch, seq_len=FLAGS.seq_len, steps=FLAGS.steps, lr=FLAGS.lr,
                       warmup_steps=FLAGS.warmup_steps, min_lr_ratio=FLAGS.min_lr_ratio,
                       weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm, mtp_weight=FLAGS.mtp_weight,
                       fp8=FLAGS.fp8, seed=FLAGS.seed)
  try:
    trainer = Trainer(config)
    corpus = TokenCorpus(FLAGS.data or None, max_bytes=FLAGS.max_corpus_mb << 20)
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  start = trainer.restore(FLAGS.checkpoint_dir) if FLAGS.resume else 0
  tokens_per_step = config.chunks * config.micro_batch * config.seq_len
  main_process = jax.process_index() == 0
  if main_process:
    logging.info("%s: %d files, %.1f M tokens; %s on pp=%d x ep=%d; %d tokens per step; from step %d",
                 config.preset, len(corpus.files), len(corpus.tokens) / 1e6, config.schedule, config.pp, config.ep,
                 tokens_per_step, start)
  bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not main_process,
             file=sys.stdout, dynamic_ncols=True)
  metrics_file = None
  if FLAGS.metrics_file and main_process:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.metrics_file)), exist_ok=True)
    if start and os.path.exists(FLAGS.metrics_file):  # resumed: the steps after the checkpoint run again
      with open(FLAGS.metrics_file) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
      with open(FLAGS.metrics_file, "w") as f:
        f.writelines(kept)
    metrics_file = open(FLAGS.metrics_file, "a")
  last, timed_tokens, timed_seconds = None, 0, 0.0
  for step in bar:
    windows = corpus.batch(step, config.chunks * config.micro_batch, config.seq_len, seed=config.seed)
    begin = time.perf_counter()
    metrics = trainer.step(windows)
    last = metrics["main"]
    if step > start:  # the first step compiles
      timed_tokens += tokens_per_step
      timed_seconds += time.perf_counter() - begin
    rate = timed_tokens / timed_seconds if timed_seconds else 0.0
    bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{rate:,.0f}")
    if metrics_file:
      metrics_file.write(json.dumps({"step": step + 1, **metrics, "tokens_per_s": rate}) + "\n")
      metrics_file.flush()
    if main_process and (step + 1) % FLAGS.log_every == 0:
      mtp = " ".join(f"{v:.4f}" for v in metrics["mtp"])
      logging.info("step %d main loss %.4f mtp [%s] total %.4f grad_norm %.3f lr %.2e tokens/s %.0f", step + 1,
                   last, mtp, metrics["loss"], metrics["grad_norm"], metrics["lr"], rate)
    if FLAGS.checkpoint_every and (step + 1) % FLAGS.checkpoint_every == 0 and step + 1 < config.steps:
      trainer.save(FLAGS.checkpoint_dir)
  if FLAGS.checkpoint_dir and config.steps > start:
    path = trainer.save(FLAGS.checkpoint_dir)
    if main_process:
      print(f"checkpoint: {path}")
  if metrics_file:
    metrics_file.close()
  if main_process and last is not None:
    print(f"final loss {last:.4f}")


if __name__ == "__main__":
  app.run(main)
