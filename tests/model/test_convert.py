"""`model.convert`: another precision, tokenizer carried, trainer state left behind, bad paths refused."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import model
from model.convert import convert
from model.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("src") / "ckpt")
  net = model.DeepseekV3(model.PRESETS["tiny"], rngs=nnx.Rngs(0))
  model.save_pretrained(net, path)
  ByteTokenizer().save_pretrained(path)
  with open(os.path.join(path, "optimizer.safetensors"), "wb") as f:
    f.write(b"not a model file")
  return path, net


def test_bf16_copy_holds_the_same_weights_rounded(source, tmp_path):
  src, net = source
  dst = str(tmp_path / "bf16")
  convert(src, dst, dtype="bfloat16")
  assert sorted(os.listdir(dst)) == ["config.json", "model-00001-of-00001.safetensors",
                                     "model.safetensors.index.json", "tokenizer_config.json"]
  loaded = model.from_pretrained(dst, dtype=jax.numpy.float32)
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(net))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2**-8, atol=0)
  shard = "model-00001-of-00001.safetensors"
  assert os.path.getsize(f"{dst}/{shard}") < 0.6 * os.path.getsize(f"{src}/{shard}")


def test_refusals(source, tmp_path):
  src, _ = source
  with pytest.raises(ValueError, match="is not a directory"):
    convert(str(tmp_path / "missing"), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="exists; pass overwrite=True"):
    convert(src, src)
  with pytest.raises(ValueError, match="is src"):
    convert(src, src, overwrite=True)


def test_command_line_overwrites(source, tmp_path):
  src, _ = source
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "stale.txt").write_text("old")
  done = subprocess.run([sys.executable, "-m", "model.convert", src, str(dst), "--dtype=float32", "--overwrite"],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert not (dst / "stale.txt").exists() and (dst / "model.safetensors.index.json").exists()
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".convert-")]  # no staging left
