"""The contiguous layout builder against a plain-loop oracle, and its use under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fp8


def _oracle(sizes: list[int], m_sum: int) -> np.ndarray:
  rows = []
  for group, size in enumerate(sizes):
    rows += [group] * size + [-1] * (-size % 128)
  rows = (rows + [-1] * m_sum)[:m_sum]
  return np.array(rows, np.int32)


@given(st.lists(st.integers(0, 300), min_size=1, max_size=6), st.integers(0, 8))
def test_matches_the_loop_oracle(sizes, blocks):
  m_sum = blocks * 128
  m_indices, starts = fp8.contiguous_m_indices(jnp.array(sizes), m_sum)
  np.testing.assert_array_equal(np.asarray(m_indices), _oracle(sizes, m_sum))
  aligned = [-(-s // 128) * 128 for s in sizes]
  np.testing.assert_array_equal(np.asarray(starts), np.concatenate([[0], np.cumsum(aligned)]))


def test_traced_sizes_under_jit():
  build = jax.jit(lambda sizes: fp8.contiguous_m_indices(sizes, 512)[0])
  for sizes in ([1, 2, 3], [200, 0, 128]):
    np.testing.assert_array_equal(np.asarray(build(jnp.array(sizes))), _oracle(sizes, 512))
  assert fp8.get_m_alignment_for_contiguous_layout() == 128
