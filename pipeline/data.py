"""Training text: files read as bytes and cut into fixed-length token windows, the same on every run.

The default corpus is the Python standard library's own `.py` sources, which every machine
with Python has, offline. Files are concatenated in sorted path order, each followed by EOS;
window `i` of a step is a deterministic function of `(seed, step, i)`, so a resumed run sees
the batches the uninterrupted one would have.
"""

from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np

from model.tokenizer import ByteTokenizer


def default_corpus() -> list[str]:
  """The standard library's `.py` files (not site-packages), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
           if "site-packages" not in f and "dist-packages" not in f]
  return sorted(files)


class TokenCorpus:
  """All files' tokens in one array, sampled in windows of `seq_len + 1` (inputs and next-token targets).

  Args:
    files: paths, or glob patterns; empty or None: `default_corpus()`.
    max_bytes: stop reading after this many bytes (a bound on host memory), or None.
  """

  def __init__(self, files: list[str] | None = None, *, max_bytes: int | None = None):
    paths = []
    for pattern in files or []:
      matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
      if not matched:
        raise ValueError(f"data pattern {pattern!r} matches no file")
      paths += matched
    paths = paths or default_corpus()
    tokenizer = ByteTokenizer()
    chunks, total = [], 0
    for path in paths:
      if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
      with open(path, "rb") as f:
        data = f.read()
      chunks.append(np.frombuffer(data, np.uint8).astype(np.int32))
      chunks.append(np.array([tokenizer.eos_id], np.int32))
      total += len(data) + 1
      if max_bytes is not None and total >= max_bytes:
        break
    self.tokens = np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)
    self.files = paths
    if len(self.tokens) < 2:
      raise ValueError("the corpus holds no text")

  def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0) -> np.ndarray:
    """`[batch_size, seq_len + 1]` int32 windows for `step` (the same for the same arguments)."""
    if seq_len + 1 > len(self.tokens):
      raise ValueError(f"seq_len {seq_len} is longer than the corpus ({len(self.tokens)} tokens)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(self.tokens) - seq_len, size=batch_size)
    return np.stack([self.tokens[s:s + seq_len + 1] for s in starts])
