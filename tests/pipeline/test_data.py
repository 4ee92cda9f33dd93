"""Training text: the offline default corpus, deterministic windows, and bad paths named."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import TokenCorpus, default_corpus


def test_default_corpus_is_the_standard_library():
  files = default_corpus()
  assert any(f.endswith("/json/__init__.py") for f in files) and files == sorted(files)
  corpus = TokenCorpus(max_bytes=2_000_000)
  assert 2_000_000 <= len(corpus.tokens) < 3_000_000
  batch = corpus.batch(7, 4, 32, seed=1)
  assert batch.shape == (4, 33) and batch.dtype == np.int32 and batch.max() <= 257
  np.testing.assert_array_equal(batch, corpus.batch(7, 4, 32, seed=1))  # resumable: a function of (seed, step)
  assert not np.array_equal(batch, corpus.batch(8, 4, 32, seed=1))


def test_own_files_and_bad_paths(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n" * 10)
  corpus = TokenCorpus([str(tmp_path / "*.txt")])
  assert len(corpus.tokens) == 121 and corpus.tokens[-1] == 257  # EOS after each file
  with pytest.raises(ValueError, match="matches no file"):
    TokenCorpus([str(tmp_path / "*.md")])
  with pytest.raises(ValueError, match="does not exist"):
    TokenCorpus([str(tmp_path / "missing.txt")])
  with pytest.raises(ValueError, match="longer than the corpus"):
    corpus.batch(0, 1, 500)
