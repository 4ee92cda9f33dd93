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


def test_key_changes_with_flags_and_sources(cache, monkeypatch):
  first = build.library_path("cpu")
  monkeypatch.setattr(build, "CPU_FLAGS", (*build.CPU_FLAGS, "-DFIREFLYER_TEST"))
  assert build.library_path("cpu") != first


def test_two_processes_build_once(cache):
  script = textwrap.dedent("""
      import sys
      from ffi import build
      print(build.build("cpu"))
  """)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  paths = {out.strip() for out, _ in outputs}
  assert len(paths) == 1
  library = pathlib.Path(paths.pop())
  assert build._is_valid(library)
  assert not [p for p in cache.iterdir() if ".building" in p.name or p.name.endswith(".tmp")]
  ctypes.cdll.LoadLibrary(str(library))  # whole, loadable


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


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="no nvcc on this machine: the CUDA sources cannot be compiled here")
def test_cuda_sources_compile_register_and_lower():
  """Compile only (no GPU needed): a CUDA error fails CI; then register and lower a call for cuda."""
  library = build.build("cuda")
  assert build._is_valid(library)
  targets.ensure_registered("cuda")
  call = jax.ffi.ffi_call("fireflyer_dispatch_layout",
                          (jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.int32),
                           jax.ShapeDtypeStruct((8, 4), jnp.bool_)), vmap_method="sequential")
  fn = jax.jit(lambda idx: call(idx, num_experts=np.int64(16), num_ranks=np.int64(4)))
  lowered = fn.trace(jax.ShapeDtypeStruct((8, 2), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "fireflyer_dispatch_layout" in lowered.as_text()
