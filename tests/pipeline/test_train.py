"""The trainer and `python -m pipeline.train`: a pipelined step equals an unpipelined one (also across 2 processes), resume continues exactly, bad flags are usage errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import model
from pipeline.data import TokenCorpus
from pipeline.trainer import TrainConfig, Trainer, latest_checkpoint
from tests.ports import reserved_port
from tests.storage.local_cluster import LocalCluster

SMALL = dict(chunks=2, micro_batch=8, seq_len=16, steps=10, warmup_steps=1)


@pytest.fixture(scope="module")
def corpus():
  return TokenCorpus(max_bytes=1 << 20)


def _windows(corpus, config, step):
  return corpus.batch(step, config.chunks * config.micro_batch, config.seq_len, seed=config.seed)


def _assert_same_metrics(got, want, rtol):
  for key in ("loss", "main", "grad_norm", "lr"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=rtol, err_msg=key)
  np.testing.assert_allclose([m["mtp"] for m in got], [m["mtp"] for m in want], rtol=rtol, err_msg="mtp")


def test_dualpipev_on_pp_by_ep_equals_one_device(corpus):
  """Same 16 sequences per step; the V runs 4 stages of one MoE layer on 2 ranks, experts over 4.

  Equal loss, MTP loss and gradient norm (one device's is a plain sum: the pipelined one sums
  squares over the ranks holding distinct parameters) for two steps, with clipping active.
  """
  plain = TrainConfig(pp=1, ep=1, schedule="1f1b", **SMALL)
  piped = TrainConfig(pp=2, ep=4, schedule="dualpipev", **{**SMALL, "chunks": 4, "micro_batch": 4})
  runs = {}
  for config in (plain, piped):
    trainer = Trainer(config)
    runs[config.schedule] = [trainer.step(_windows(corpus, config, s)) for s in range(2)]
  _assert_same_metrics(runs["dualpipev"], runs["1f1b"], rtol=1e-5)
  first, second = runs["1f1b"]
  assert second["main"] != first["main"]  # the first step changed the parameters
  assert first["grad_norm"] > plain.clip_norm  # so clipping took part
  assert len(first["mtp"]) == 1 and first["loss"] == pytest.approx(first["main"] + 0.3 * first["mtp"][0], rel=1e-6)


def test_mtp_weight_zero_leaves_mtp_untouched(corpus):
  config = TrainConfig(**{**SMALL, "mtp_weight": 0.0})
  trainer = Trainer(config)
  before = jax.tree.map(np.array, jax.tree.leaves(nnx.state(trainer.model.mtp)))
  metrics = trainer.step(_windows(corpus, config, 0))
  assert metrics["mtp"] == [] and metrics["loss"] == metrics["main"]
  after = jax.tree.leaves(nnx.state(trainer.model_with_params().mtp))
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)


def test_fp8_projections_train_like_float(corpus):
  """FP8 projections (fp8.linear: FP8 forward, dgrad, wgrad) learn a fixed batch about as fast as float.

  Measured on this batch: first losses 6.629 vs 6.671, after 6 steps 1.085 vs 1.141.
  """
  runs = {}
  windows = _windows(corpus, TrainConfig(**SMALL), 0)
  for fp8 in (False, True):
    trainer = Trainer(TrainConfig(**{**SMALL, "fp8": fp8}))
    runs[fp8] = [trainer.step(windows)["main"] for _ in range(6)]
  assert runs[True][0] != runs[False][0]  # the FP8 path did run
  assert runs[True][0] == pytest.approx(runs[False][0], rel=0.02)  # the same model, quantized
  assert runs[True][-1] < 0.25 * runs[True][0]
  assert runs[True][-1] < 1.3 * runs[False][-1]


def test_resume_continues_exactly(corpus, tmp_path):
  config = TrainConfig(**SMALL)  # the binary's defaults: one device, no pipeline, no expert parallelism
  trainer = Trainer(config)
  metrics = [trainer.step(_windows(corpus, config, s)) for s in range(2)]
  path = trainer.save(str(tmp_path))
  assert latest_checkpoint(str(tmp_path)) == path
  metrics.append(trainer.step(_windows(corpus, config, 2)))
  resumed = Trainer(config)
  assert resumed.restore(str(tmp_path)) == 2
  _assert_same_metrics([resumed.step(_windows(corpus, config, 2))], metrics[2:], rtol=1e-6)


def test_checkpoints_at_a_url_hold_the_sharded_train_state(tmp_path):
  """On the storage cluster (`3fs://`): the restored parameters and optimizer state equal the saved ones bit for bit."""
  config = TrainConfig(pp=2, ep=2, schedule="1f1b", **{**SMALL, "chunks": 4, "micro_batch": 4})
  trainer = Trainer(config)
  trainer.step_count = 3  # as if it had trained: the state to save is the initial one, no compile needed
  with LocalCluster(tmp_path, gc_delay_s=0.0) as cluster:
    url = f"3fs://{cluster.address}/runs/a"
    assert latest_checkpoint(url) is None
    path = trainer.save(url)
    assert path == f"{url}/step_00000003" and latest_checkpoint(url) == path
    resumed = Trainer(dataclasses.replace(config, seed=config.seed + 1))  # other initial values
    assert resumed.restore(url) == 3
  for name in ("params", "opt_state"):
    for got, want in zip(jax.tree.leaves(getattr(resumed, name)), jax.tree.leaves(getattr(trainer, name))):
      assert got.sharding == want.sharding
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_two_processes_equal_one(corpus, tmp_path):
  """`python -m pipeline.train` as 2 processes x 4 CPU devices (gloo) on a pp x ep = 2 x 4 mesh equals this process on 8.

  Also its checkpoint, written by both processes together, holds this process's parameters.
  """
  with reserved_port() as port:  # held until both processes are done with the coordinator
    args = ["--pp=2", "--ep=4", "--schedule=dualpipe", "--chunks=4", "--micro_batch=4", "--seq_len=16", "--steps=2",
            "--warmup_steps=1", "--max_corpus_mb=1", "--num_processes=2", f"--coordinator_address=127.0.0.1:{port}",
            f"--checkpoint_dir={tmp_path}/run", f"--metrics_file={tmp_path}/metrics.jsonl"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # the binary makes its own 4 devices per process
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.train", *args, f"--process_id={i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
      outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
      for p in procs:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    got = [json.loads(line) for line in f]

  config = TrainConfig(pp=2, ep=4, schedule="dualpipe", chunks=4, micro_batch=4, seq_len=16, steps=2, warmup_steps=1)
  trainer = Trainer(config)
  want = [trainer.step(_windows(corpus, config, s)) for s in range(2)]
  # gloo's all-reduces add in another order than XLA:CPU's in-process ones.
  _assert_same_metrics(got, want, rtol=1e-6)

  saved = model.from_pretrained(f"{tmp_path}/run/step_00000002", dtype=np.float32)
  # Adam's normalized steps can turn a near-zero gradient's last-bit difference into a visible
  # difference on that one weight (measured up to 1.4e-5, against steps of lr = 3e-3), so each
  # tensor is compared as a whole (measured: within 8.7e-7 of its norm).
  for a, b in zip(jax.tree.leaves(nnx.state(saved)), jax.tree.leaves(nnx.state(trainer.model_with_params()))):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


@pytest.mark.parametrize("args, message", [
    (["--pp=3", "--ep=4"], "needs 12 devices"),
    (["--schedule=dualpipe", "--pp=1"], "num_ranks must be even"),
    (["--micro_batch=6", "--ep=4", "--pp=2"], "does not split over ep=4"),
    (["--resume"], "--resume needs --checkpoint_dir"),
    (["--clip_norm=-1"], "clip_norm must be >= 0"),
    (["--no_such_flag"], "Unknown command line flag"),
])
def test_bad_flags_are_usage_errors(args, message):
  done = subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


def test_latest_checkpoint_reads_a_local_path_that_looks_like_a_chained_url(tmp_path):
  from pipeline.trainer import STATE
  root = tmp_path / "runs::a"  # fsspec would split this at "::"
  for step, complete in ((2, True), (5, True), (7, False)):
    (root / f"step_{step:08d}").mkdir(parents=True)
    if complete:
      (root / f"step_{step:08d}" / STATE).write_text("{}")
  assert latest_checkpoint(str(root)) == str(root / "step_00000005")
