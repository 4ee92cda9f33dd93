"""The Hopper kernels beyond the shared suite: GPU lowering from this host, races, dispatch, config.

The shared suite (test_gemm.py, test_linear.py) checks their numbers in interpret mode; here:
- every op lowers for CUDA from the CPU host (`lowering_platforms=("cuda",)`), which applies
  the hardware rules the interpreter does not (fp8 wgmma wants K-major B, layouts, smem size);
- one case per op runs with race detection on;
- `implementation=None` never picks the kernels off sm90, and asking for them there without
  `interpret=True` says how to run them;
- the block-size heuristic follows DeepGEMM's rules and the per-device table overrides it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import fp8
from fp8.mosaic_gpu import config as configs
from backends import mosaic_interpret as interpret_mode
from fp8.mosaic_gpu.ops import compile_for
from tests.fp8 import cases


def _problems():
  """(name, op, problem, static kwargs) for one small case of each op."""
  k_grouped = cases.k_grouped_problem(4, [256, 0, 128], 128, 192, sum_k=512, with_c=True)
  masked = cases.masked_problem(3, [3, 60], 64, 128, 256)
  return [
      ("gemm_nt", fp8.gemm_nt, cases.gemm_nt_problem(1, 128, 128, 256, with_c=True), {}),
      ("contiguous", fp8.m_grouped_gemm_nt_contiguous, cases.contiguous_problem(2, [100, 0, 28], 128, 256),
       {"out_dtype": jnp.float32}),
      ("masked", functools.partial(fp8.m_grouped_gemm_nt_masked, expected_m=masked.args[3]),
       masked._replace(args=masked.args[:3]), {}),
      ("k_grouped", fp8.k_grouped_gemm_tn_contiguous, k_grouped._replace(
          args=(*k_grouped.args[:2], jnp.array(k_grouped.args[2], jnp.int32))), {}),
  ]


@pytest.mark.parametrize("name, op, problem, kwargs", _problems(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_op_lowers_for_cuda_from_this_host(name, op, problem, kwargs):
  del name
  call = jax.jit(lambda *args: op(*args, **problem.kwargs, **kwargs, implementation="mosaic_gpu"))
  with compile_for("NVIDIA H200", 132):
    lowered = call.trace(*problem.args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("name, op, problem, kwargs", _problems(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_races_in_any_op(name, op, problem, kwargs, monkeypatch):
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  del name
  monkeypatch.setattr(interpret_mode, "DETECT_RACES", True)
  out = op(*problem.args, **problem.kwargs, **kwargs, implementation="mosaic_gpu", interpret=True)
  assert not get_races().races_found
  out = cases.f64(out)
  assert fp8.calc_diff(out, problem.exact) < 1e-5


def test_off_sm90_the_kernels_step_aside_or_explain():
  problem = cases.gemm_nt_problem(5, 64, 128, 128)
  if jax.default_backend() == "gpu":
    pytest.skip("this host has a GPU")
  with pytest.raises(NotImplementedError, match="interpret=True"):
    fp8.gemm_nt(*problem.args, implementation="mosaic_gpu")
  assert fp8.gemm_nt(*problem.args).shape == (64, 128)  # None: the platform's choice (xla here)


def test_the_heuristic_follows_deepgemms_rules():
  assert configs.heuristic(64, 4096).block_m == 64
  assert configs.heuristic(65, 4096).block_m == 128
  assert configs.heuristic(8, 4096, contiguous=True).block_m == 128
  # 4096 x 7168 on 132 SMs: 32 x 56 = 1792 tiles of 128 (14 waves) or 3584 of 64 (28 waves).
  assert configs.heuristic(4096, 7168).block_n == 128
  # 128 x 4096: 32 tiles of 128 columns fill 32 SMs in one wave; 64 tiles of 64 fill 64: a fuller wave.
  assert configs.heuristic(128, 4096).block_n == 64
  assert configs.heuristic(128, 2112).block_n == 64  # 2112 is no multiple of 128
  for m, n, out_bytes in ((64, 2112, 2), (4096, 7168, 2), (4096, 7168, 4)):
    cfg = configs.heuristic(m, n, out_bytes=out_bytes)
    used = cfg.stages * configs.stage_bytes(cfg.block_m, cfg.block_n)
    assert used + configs.epilogue_bytes(cfg.block_m, cfg.block_n, out_bytes) <= configs.SMEM_BYTES
    assert cfg.stages == configs.MAX_STAGES or used + configs.stage_bytes(cfg.block_m, cfg.block_n) + \
        configs.epilogue_bytes(cfg.block_m, cfg.block_n, out_bytes) + 1024 > configs.SMEM_BYTES


def test_a_measured_config_overrides_the_heuristic(monkeypatch):
  tuned = configs.Config(block_m=64, block_n=64, stages=3)
  monkeypatch.setitem(configs.TUNED, "NVIDIA H200", {("gemm_nt", 4096, 7168, 2048): tuned})
  assert configs.choose("gemm_nt", 4096, 7168, 2048, device_kind="NVIDIA H200") == tuned
  assert configs.choose("gemm_nt", 4096, 7168, 2048, device_kind="NVIDIA H100") == configs.heuristic(4096, 7168)
  wrong = configs.Config(block_m=64, block_n=128, stages=3)
  monkeypatch.setitem(configs.TUNED, "NVIDIA H200", {("gemm_nt", 64, 2112, 7168): wrong,
                                                     ("m_grouped_gemm_nt_contiguous", 64, 4096, 7168): wrong})
  with pytest.raises(ValueError, match="cannot tile n=2112"):  # 2112 columns are no whole number of 128s
    configs.choose("gemm_nt", 64, 2112, 7168, device_kind="NVIDIA H200")
  with pytest.raises(ValueError, match="contiguous"):
    configs.choose("m_grouped_gemm_nt_contiguous", 64, 4096, 7168, device_kind="NVIDIA H200", contiguous=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_m": 96, "block_n": 64, "stages": 2}, "block_m"),
    ({"block_m": 64, "block_n": 256, "stages": 2}, "block_n"),
    ({"block_m": 64, "block_n": 64, "stages": 0}, "stages"),
])
def test_bad_configs_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    configs.Config(**kwargs)
  with pytest.raises(ValueError, match="n must be"):
    configs.heuristic(64, 100)


def test_under_shard_map_on_8_devices():
  """Each device runs the kernel on its rows (the expert-parallel layer will); the interpreter needs
  its barrier patch for this (tests/mosaic_gpu_interpret_patches.py)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((8,), ("x",))
  problem = cases.gemm_nt_problem(6, 8 * 64, 128, 256)
  (a_fp8, sa), (b_fp8, sb) = problem.args
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  gemm = jax.shard_map(lambda a8, sa, b8, sb: fp8.gemm_nt((a8, sa), (b8, sb), out_dtype=jnp.float32,
                                                          implementation="mosaic_gpu", interpret=True),
                       mesh=mesh, in_specs=(P("x"), P("x"), P(), P()), out_specs=P("x"), check_vma=False)
  out = jax.jit(gemm)(put(a_fp8, P("x")), put(sa, P("x")), put(b_fp8, P()), put(sb, P()))
  assert fp8.calc_diff(cases.f64(out), problem.exact) < 1e-6
