"""The JIT build: cache miss then hit, two processes racing, a corrupt entry, missing and failing compilers, CUDA."""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffi import build, targets

REPO = pathlib.Path(__file__).parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_miss_then_hit(cache, monkeypatch):
  path = build.build("cpu")
  assert path.parent == cache and path.is_file()
  assert (cache / (path.name + ".sha256")).read_text() == build._digest(path)
  stamp = path.stat().st_mtime_ns
  calls = []
  monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail("rebuilt on a hit"))
  assert build.build("cpu") == path and path.stat().st_mtime_ns == stamp


def test_key_changes_with_flags_sources_and_environment(cache, monkeypatch, tmp_path):
  first = build.library_path("cpu")
  monkeypatch.setattr(build, "CPU_FLAGS", (*build.CPU_FLAGS, "-DFIREFLYER_TEST"))
  with_flag = build.library_path("cpu")
  assert with_flag != first
  edited = tmp_path / "csrc"
  shutil.copytree(build.CSRC, edited)
  (edited / "extra.cuh").write_text("// a new header in csrc/ is part of the key\n")
  monkeypatch.setattr(build, "CSRC", edited)
  with_header = build.library_path("cpu")
  assert with_header != with_flag
  monkeypatch.setenv("CPATH", "/somewhere/else")
  assert build.library_path("cpu") != with_header


def test_two_processes_compile_once(cache, tmp_path):
  """A logging compiler wrapper counts compiles: the lock must make the second process wait and reuse."""
  log = tmp_path / "compiles.log"
  wrapper = tmp_path / "cxx"
  wrapper.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] || {{ echo run >> {log}; sleep 1; }}\n"
                     f"exec {shutil.which('g++')} \"$@\"\n")
  wrapper.chmod(0o755)
  script = "from ffi import build; print(build.build('cpu'))"
  env = dict(os.environ, PYTHONPATH=str(REPO), CXX=str(wrapper))
  procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  assert log.read_text().count("run") == 1  # one compile; the other process waited on the lock
  paths = {out.strip() for out, _ in outputs}
  assert len(paths) == 1
  library = pathlib.Path(paths.pop())
  assert build._is_valid(library)
  assert not [p for p in cache.iterdir() if ".building" in p.name or p.name.endswith(".tmp")]
  ctypes.cdll.LoadLibrary(str(library))  # whole, loadable


def test_a_killed_build_leaves_nothing_behind(cache):
  target = build.library_path("cpu")
  cache.mkdir(parents=True)
  stale = cache / f".{target.stem}.99999.building.so"
  stale.write_bytes(b"half a library")
  build.build("cpu")
  assert not stale.exists()


def test_corrupt_entry_is_rebuilt(cache, caplog):
  path = build.build("cpu")
  path.write_bytes(path.read_bytes()[:1000])  # a torn write
  rebuilt = build.build("cpu")
  assert rebuilt == path and build._is_valid(path) and path.stat().st_size > 1000
  assert "corrupt" in caplog.text


def test_missing_compiler_is_a_clear_error(cache, monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler-xyz")
  with pytest.raises(build.CompilerNotFoundError, match="no-such-compiler-xyz"):
    build.build("cpu")
  monkeypatch.setenv("PATH", "/nonexistent")
  monkeypatch.delenv("CUDA_HOME", raising=False)
  monkeypatch.setattr(build.sysconfig, "get_paths", lambda: {"purelib": "/nonexistent"})
  with pytest.raises(build.CompilerNotFoundError, match="no nvcc"):
    build.find_nvcc()


def test_failed_build_reports_command_and_stderr(cache, monkeypatch, tmp_path):
  broken = tmp_path / "csrc"
  shutil.copytree(build.CSRC, broken)
  (broken / "dispatch_cpu.cc").write_text("this is not C++;\n")
  monkeypatch.setattr(build, "CSRC", broken)
  with pytest.raises(build.BuildError) as err:
    build.build("cpu")
  message = str(err.value)
  assert "command:" in message and "dispatch_cpu.cc" in message and "error" in message.lower()
  assert not list(cache.glob("*.so"))


def test_unknown_kind():
  with pytest.raises(ValueError, match="kind"):
    build.library_path("rocm")


def _have_nvcc() -> bool:
  try:
    build.find_nvcc()
    return True
  except build.CompilerNotFoundError:
    return False


@pytest.mark.skipif(not _have_nvcc(), reason="no nvcc ($CUDA_HOME, PATH or the CUDA 13 wheels): CUDA cannot compile here")
def test_cuda_sources_compile_register_and_lower():
  """Compile only (no GPU needed), so a CUDA error fails CI; then load, register every handler
  symbol for CUDA, and lower each op for cuda. (Lowering does not check that a handler exists;
  the symbol lookups in `ensure_registered` do.)"""
  library = build.build("cuda")
  assert build._is_valid(library)
  targets.ensure_registered("cuda")
  ops = {
      "fireflyer_dispatch_layout": ((jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.int32),
                                     jax.ShapeDtypeStruct((8, 4), jnp.bool_)),
                                    (jax.ShapeDtypeStruct((8, 2), jnp.int32),), dict(num_experts=16, num_ranks=4)),
      "fireflyer_dispatch_pack": ((jax.ShapeDtypeStruct((4, 8, 32), jnp.bfloat16),
                                   *[jax.ShapeDtypeStruct((4,), jnp.int32)] * 2, jax.ShapeDtypeStruct((4, 8), jnp.int32),
                                   jax.ShapeDtypeStruct((4,), jnp.int32)),
                                  (jax.ShapeDtypeStruct((8, 32), jnp.bfloat16), jax.ShapeDtypeStruct((8, 2), jnp.int32)),
                                  dict(num_experts=16, num_ranks=4, capacity=8)),
      "fireflyer_combine_unpack": ((jax.ShapeDtypeStruct((8, 32), jnp.bfloat16), jax.ShapeDtypeStruct((8, 4), jnp.int32)),
                                   (jax.ShapeDtypeStruct((4, 8, 32), jnp.bfloat16), jax.ShapeDtypeStruct((4, 8), jnp.int32),
                                    jax.ShapeDtypeStruct((4, 8), jnp.float32)), dict(num_tokens=8)),
  }
  for name, (results, args, attrs) in ops.items():
    call = jax.ffi.ffi_call(name, results, vmap_method="sequential")
    fn = jax.jit(lambda *a, call=call, attrs=attrs: call(*a, **{k: np.int64(v) for k, v in attrs.items()}))
    lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
    assert f"@{name}" in lowered.as_text() or name in lowered.as_text()
