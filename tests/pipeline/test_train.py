"""The trainer and `python -m pipeline.train`: a pipelined step equals an unpipelined one, resume continues exactly, bad flags are usage errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.data import TokenCorpus
from pipeline.trainer import TrainConfig, Trainer, latest_checkpoint

SMALL = dict(chunks=2, micro_batch=8, seq_len=16, steps=10, warmup_steps=1)


@pytest.fixture(scope="module")
def corpus():
  return TokenCorpus(max_bytes=500_000)


def _windows(corpus, config, step):
  return corpus.batch(step, config.chunks * config.micro_batch, config.seq_len, seed=config.seed)


def test_dualpipev_on_pp_by_ep_equals_no_pipeline(corpus):
  plain = TrainConfig(pp=1, ep=8, schedule="1f1b", **SMALL)
  # 4 stages of one MoE layer, a V on 2 ranks; the same 16 sequences per step in 4 micro-batches.
  piped = TrainConfig(pp=2, ep=4, schedule="dualpipev", **{**SMALL, "chunks": 4, "micro_batch": 4})
  losses = {}
  for config in (plain, piped):
    trainer = Trainer(config)
    losses[config.schedule] = [trainer.step(_windows(corpus, config, s)) for s in range(2)]
  np.testing.assert_allclose(losses["dualpipev"], losses["1f1b"], rtol=1e-5)
  assert losses["1f1b"][1] != losses["1f1b"][0]  # the first step changed the parameters


def test_resume_continues_exactly(corpus, tmp_path):
  config = TrainConfig(**SMALL)  # the binary's defaults: one device, no pipeline, no expert parallelism
  trainer = Trainer(config)
  losses = [trainer.step(_windows(corpus, config, s)) for s in range(2)]
  path = trainer.save(str(tmp_path))
  assert latest_checkpoint(str(tmp_path)) == path
  losses.append(trainer.step(_windows(corpus, config, 2)))
  resumed = Trainer(config)
  assert resumed.restore(str(tmp_path)) == 2
  np.testing.assert_allclose(resumed.step(_windows(corpus, config, 2)), losses[2], rtol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--pp=3", "--ep=4"], "needs 12 devices"),
    (["--schedule=dualpipe", "--pp=1"], "num_ranks must be even"),
    (["--micro_batch=6", "--ep=4", "--pp=2"], "does not split over ep=4"),
    (["--resume"], "--resume needs --checkpoint_dir"),
    (["--no_such_flag"], "Unknown command line flag"),
])
def test_bad_flags_are_usage_errors(args, message):
  done = subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
