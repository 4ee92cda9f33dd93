"""Every bad input to the four GEMMs raises a ValueError that names the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8

E4M3 = jnp.float8_e4m3fn


def _pair(rows, cols, scale_shape, dtype=E4M3, scale_dtype=jnp.float32):
  return jnp.zeros((rows, cols) if not isinstance(rows, tuple) else (*rows, cols), dtype), \
      jnp.ones(scale_shape, scale_dtype)


A = _pair(64, 256, (64, 2))
B = _pair(128, 256, (1, 2))
GA = _pair(256, 256, (256, 2))
GB = _pair((2, 128), 256, (2, 1, 2))
MA = _pair((2, 32), 256, (2, 32, 2))
KA = _pair(256, 64, (2, 64))
KB = _pair(256, 128, (2, 128))
M_INDICES = jnp.concatenate([jnp.zeros(128, jnp.int32), jnp.ones(128, jnp.int32)])

GEMM_NT = [
    (dict(a=A[0]), "a must be a pair"),
    (dict(a=(A[0].astype(jnp.bfloat16), A[1])), r"a\[0\] must be float8_e4m3fn"),
    (dict(a=(A[0], A[1].astype(jnp.bfloat16))), r"a\[1\] .* must be float32"),
    (dict(b=(B[0][None], B[1])), r"b\[0\] must be 2-D"),
    (dict(b=_pair(128, 384, (1, 3))), "share k"),
    (dict(a=_pair(64, 200, (64, 2)), b=_pair(128, 200, (1, 2))), "k=200 must be a multiple of 128"),
    (dict(b=_pair(96, 256, (1, 2))), "n=96 must be a multiple of 64"),
    (dict(a=_pair(64, 256, (64, 1))), r"a\[1\] must have shape \(64, 2\)"),
    (dict(b=_pair(128, 256, (128, 2))), r"b\[1\] must have shape \(1, 2\)"),
    (dict(c=jnp.zeros((64, 128), jnp.bfloat16)), "c must be a float32"),
    (dict(c=jnp.zeros((64, 64), jnp.float32)), r"c must have shape \(64, 128\)"),
    (dict(out_dtype=jnp.float16), "out_dtype must be bfloat16 or float32"),
    (dict(out_dtype="nonsense"), "out_dtype"),
    (dict(c=jnp.zeros((64, 128), jnp.float32), out_dtype=jnp.bfloat16), "must be float32 when c"),
    (dict(implementation="cutlass"), "implementation='cutlass' is not available"),
]


@pytest.mark.parametrize("override,match", GEMM_NT)
def test_gemm_nt_rejects(override, match):
  args = dict(a=A, b=B) | override
  with pytest.raises(ValueError, match=match):
    fp8.gemm_nt(**args)


CONTIGUOUS = [
    (dict(a=_pair(200, 256, (200, 2))), "m_sum=200 .* multiple of 128"),
    (dict(b=(GB[0][0], GB[1])), r"b\[0\] must be 3-D"),
    (dict(b=_pair((0, 128), 256, (0, 1, 2))), "at least one group"),
    (dict(b=_pair((2, 128), 256, (2, 2))), r"b\[1\] must have shape \(2, 1, 2\)"),
    (dict(m_indices=M_INDICES[:128]), r"m_indices must have shape \(256,\)"),
    (dict(m_indices=M_INDICES.astype(jnp.float32)), "m_indices must be an integer array"),
    (dict(m_indices=M_INDICES.at[7].set(2)), r"m_indices\[7\]=2 is out of range"),
    (dict(m_indices=M_INDICES.at[7].set(-2)), r"m_indices\[7\]=-2 is out of range"),
    (dict(m_indices=M_INDICES.at[130].set(0)), "rows 128..255 are not one group's rows followed by padding"),
    (dict(m_indices=M_INDICES.at[128:192].set(-1)), "rows 128..255 are not one group's rows"),  # padding first
    (dict(m_indices=M_INDICES.at[100:128].set(-1).at[128:].set(0)), "group 0 has -1 padding in the middle"),
    (dict(m_indices=np.full(256, 2**32, np.int64)), "outside int32"),
    (dict(a=(GA[0].astype(jnp.bfloat16), GA[1])), r"a\[0\] must be float8_e4m3fn"),
    (dict(b=(GB[0], GB[1].astype(jnp.float16))), r"b\[1\] .* must be float32"),
    (dict(a=_pair(384, 256, (384, 2)), m_indices=jnp.repeat(jnp.array([0, 1, 0], jnp.int32), 128)),
     "group 0's rows are not contiguous"),
    (dict(out_dtype=jnp.int8), "out_dtype"),
]


@pytest.mark.parametrize("override,match", CONTIGUOUS)
def test_contiguous_rejects(override, match):
  args = dict(a=GA, b=GB, m_indices=M_INDICES) | override
  with pytest.raises(ValueError, match=match):
    fp8.m_grouped_gemm_nt_contiguous(**args)


def test_contiguous_accepts_padding_after_a_group_and_whole_padding_blocks():
  m_indices = M_INDICES.at[100:128].set(-1)
  assert fp8.m_grouped_gemm_nt_contiguous(GA, GB, m_indices).shape == (256, 128)
  m_indices = jnp.full(256, -1, jnp.int32).at[128:200].set(1)
  assert fp8.m_grouped_gemm_nt_contiguous(GA, GB, m_indices).shape == (256, 128)


def test_traced_ks_list_is_a_clear_error():
  with pytest.raises(ValueError, match="ks must be an int array or a list of ints"):
    jax.jit(lambda k: fp8.k_grouped_gemm_tn_contiguous(KA, KB, [k, 128]))(128)


MASKED = [
    (dict(a=GA), r"a\[0\] must be 3-D"),
    (dict(b=_pair((3, 128), 256, (3, 1, 2))), "b has 3 groups but a has 2"),
    (dict(a=_pair((2, 32), 256, (2, 32, 1))), r"a\[1\] must have shape \(2, 32, 2\)"),
    (dict(masked_m=jnp.array([1, 2, 3])), r"masked_m must have shape \(2,\)"),
    (dict(masked_m=jnp.array([1, 33])), r"masked_m\[1\]=33 must be in \[0, m_max=32\]"),
    (dict(masked_m=jnp.array([-1, 3])), r"masked_m\[0\]=-1"),
    (dict(masked_m=np.array([2**32 + 1, 3], np.int64)), "masked_m holds values outside int32"),
    (dict(a=(MA[0], MA[1].astype(jnp.bfloat16))), r"a\[1\] .* must be float32"),
    (dict(expected_m=2.5), "expected_m must be a non-negative int"),
    (dict(expected_m=-1), "expected_m"),
]


@pytest.mark.parametrize("override,match", MASKED)
def test_masked_rejects(override, match):
  args = dict(a=MA, b=GB, masked_m=jnp.array([4, 32]), expected_m=16) | override
  with pytest.raises(ValueError, match=match):
    fp8.m_grouped_gemm_nt_masked(**args)


K_GROUPED = [
    (dict(b=_pair(384, 128, (3, 128))), "share their k rows"),
    (dict(a=_pair(200, 64, (2, 64)), b=_pair(200, 128, (2, 128))), r"k rows of a and b \(200\)"),
    (dict(b=_pair(256, 96, (2, 96))), "n=96 must be a multiple of 64"),
    (dict(a=_pair(256, 64, (256, 64))), "quantize_per_channel"),
    (dict(b=_pair(256, 128, (2, 1))), r"b\[1\] must have shape \(2, 128\)"),
    (dict(ks=[]), "ks must be a non-empty 1-D"),
    (dict(ks=[[128]]), "ks must be a non-empty 1-D"),
    (dict(ks=[100, 28]), r"ks\[0\]=100 must be a non-negative multiple of 128"),
    (dict(ks=[-128, 128]), r"ks\[0\]=-128"),
    (dict(ks=[256, 128]), r"sum\(ks\)=384 exceeds the 256 k rows"),
    (dict(ks=[128.0, 128.0]), "ks must be an integer array"),
    (dict(a=("abc", KA[1])), "a must hold two arrays"),
    (dict(c=jnp.zeros((2, 64, 64), jnp.float32)), r"c must have shape \(2, 64, 128\)"),
    (dict(c=jnp.zeros((2, 64, 128), jnp.bfloat16)), "c must be a float32"),
]


@pytest.mark.parametrize("override,match", K_GROUPED)
def test_k_grouped_rejects(override, match):
  args = dict(a=KA, b=KB, ks=[128, 128]) | override
  with pytest.raises(ValueError, match=match):
    fp8.k_grouped_gemm_tn_contiguous(**args)
