"""Just-in-time builds of the C++ and CUDA sources under `ffi/csrc/` into cached shared libraries.

Like DeepGEMM's JIT: the compile command is deterministic, the output is cached under a key
that hashes everything that can change the binary (sources, local and JAX FFI headers, the
compiler's version, the flags), writes are atomic (temp file, then `os.replace`), and a file
lock keeps parallel pytest workers and processes from building the same library twice.

  CPU:  g++ (or $CXX) -O3 -std=c++17 -fPIC -shared -isystem <jax ffi headers>
  CUDA: nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC, sm_90a code plus compute_90 PTX

nvcc is looked for in `$CUDA_HOME/bin`, then on PATH, then in the CUDA 13 compiler wheels
(`pip install -e ".[cuda]"`), which also need `-L<site-packages>/nvidia/cu13/lib`.
`python -m ffi` builds everything this machine can build and prints where it went.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
from typing import NamedTuple

import filelock
import jax

CSRC = pathlib.Path(__file__).parent / "csrc"
CACHE_ENV = "FIREFLYER_CACHE_DIR"
CPU_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")
CUDA_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
              "-gencode", "arch=compute_90a,code=sm_90a",  # Hopper, with wgmma/TMA features
              "-gencode", "arch=compute_90,code=compute_90")  # PTX, JIT-compiled by newer drivers
LIBRARIES = {"cpu": ("dispatch_cpu.cc",), "cuda": ("dispatch_cuda.cu",)}
_LOCK_TIMEOUT_S = 900


class BuildError(RuntimeError):
  """A compile failed; the message holds the command and the compiler's stderr."""


class CompilerNotFoundError(BuildError, NotImplementedError):
  """No compiler for this kind of library; `implementation=None` falls back past it."""


class Compiler(NamedTuple):
  path: str
  extra_flags: tuple[str, ...]  # e.g. the wheel's library directory for nvcc


def cache_dir() -> pathlib.Path:
  """`$FIREFLYER_CACHE_DIR`, or `~/.cache/fireflyer/ffi`."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "fireflyer" / "ffi")


def find_cxx() -> Compiler:
  """The host C++ compiler: $CXX, else g++ on PATH."""
  name = os.environ.get("CXX", "g++")
  path = shutil.which(name)
  if path is None:
    raise CompilerNotFoundError(f"no C++ compiler: {name!r} is not on PATH (set CXX, or apt-get install g++)")
  return Compiler(path, ())


def find_nvcc() -> Compiler:
  """nvcc from $CUDA_HOME, PATH, or the CUDA 13 wheels, in that order."""
  cuda_home = os.environ.get("CUDA_HOME")
  if cuda_home and (pathlib.Path(cuda_home) / "bin" / "nvcc").is_file():
    return Compiler(str(pathlib.Path(cuda_home) / "bin" / "nvcc"), ())
  on_path = shutil.which("nvcc")
  if on_path:
    wheel_lib = pathlib.Path(on_path).resolve().parent.parent / "lib"  # the wheels' nvcc.profile looks in lib64
    in_wheel = pathlib.Path(on_path).resolve().parent.parent.name == "cu13" and wheel_lib.is_dir()
    return Compiler(on_path, (f"-L{wheel_lib}",) if in_wheel else ())
  wheel = pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13"
  if (wheel / "bin" / "nvcc").is_file():
    return Compiler(str(wheel / "bin" / "nvcc"), (f"-L{wheel / 'lib'}",))
  raise CompilerNotFoundError("no nvcc: not in $CUDA_HOME/bin, not on PATH, and the CUDA 13 wheels are not "
                              "installed (pip install -e '.[cuda]')")


@functools.lru_cache(maxsize=None)
def _compiler_version(path: str) -> str:
  result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
  return result.stdout + result.stderr


# Environment that changes what a compiler produces without changing its command line.
_ENV_IN_KEY = ("CXX", "CPATH", "CPLUS_INCLUDE_PATH", "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "NVCC_CCBIN")


def _inputs() -> list[pathlib.Path]:
  """Every file a build may read from this project and JAX: all of csrc/, and JAX's FFI headers."""
  ffi_api = pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api"
  return sorted(ffi_api.glob("*.h")) + sorted(p for p in CSRC.rglob("*") if p.is_file())


def _command(kind: str, compiler: Compiler, sources: list[pathlib.Path], output: pathlib.Path) -> list[str]:
  flags = CPU_FLAGS if kind == "cpu" else CUDA_FLAGS
  return [compiler.path, *flags, "-isystem", jax.ffi.include_dir(), *compiler.extra_flags,
          *map(str, sources), "-o", str(output)]


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_valid(library: pathlib.Path) -> bool:
  """A cached library counts only with its checksum beside it, matching (a torn or edited file does not)."""
  checksum = library.with_name(library.name + ".sha256")
  try:
    return library.is_file() and checksum.read_text().strip() == _digest(library)
  except OSError:
    return False


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def library_path(kind: str) -> pathlib.Path:
  """Where the `kind` library ("cpu" or "cuda") is cached for the current sources, compiler and flags."""
  if kind not in LIBRARIES:
    raise ValueError(f"kind must be one of {sorted(LIBRARIES)}, got {kind!r}")
  compiler = find_cxx() if kind == "cpu" else find_nvcc()
  sources = [CSRC / name for name in LIBRARIES[kind]]
  key = hashlib.sha256()
  for part in _inputs():
    key.update(part.name.encode() + b"\0" + part.read_bytes())
  key.update(_compiler_version(compiler.path).encode())
  if kind == "cuda" and shutil.which(os.environ.get("CXX", "g++")):  # nvcc's host compiler
    key.update(_compiler_version(find_cxx().path).encode())
  for name in _ENV_IN_KEY:
    key.update(f"{name}={os.environ.get(name, '')}".encode())
  key.update("\0".join(_command(kind, compiler, sources, pathlib.Path("out"))[1:]).encode())
  return cache_dir() / f"fireflyer_{kind}_{key.hexdigest()[:20]}.so"


def build(kind: str) -> pathlib.Path:
  """Returns the cached library for `kind`, compiling it first if needed.

  Raises:
    CompilerNotFoundError: no compiler for `kind`.
    BuildError: the compiler failed; the message has the command and its stderr.
  """
  target = library_path(kind)
  if _is_valid(target):
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(str(target) + ".lock", timeout=_LOCK_TIMEOUT_S):
    if _is_valid(target):  # another process built it while we waited
      return target
    if target.exists():
      logging.warning("fireflyer.ffi: cached %s is corrupt (checksum mismatch); rebuilding", target.name)
    for stale in target.parent.glob(f".{target.stem}.*.building.so"):  # left by a killed build; we hold the lock
      stale.unlink(missing_ok=True)
    compiler = find_cxx() if kind == "cpu" else find_nvcc()
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.building.so")
    command = _command(kind, compiler, [CSRC / name for name in LIBRARIES[kind]], tmp)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      tmp.unlink(missing_ok=True)
      raise BuildError(f"building the {kind} FFI library failed (exit {result.returncode}).\n"
                       f"command: {' '.join(command)}\nstderr:\n{result.stderr.strip()}")
    checksum = _digest(tmp)
    os.replace(tmp, target)
    _write_atomically(target.with_name(target.name + ".sha256"), checksum.encode())
  return target


def main() -> int:
  """`python -m ffi`: build every library this machine has a compiler for."""
  status = 0
  for kind in LIBRARIES:
    try:
      print(f"{kind}: {build(kind)}")
    except CompilerNotFoundError as err:
      print(f"{kind}: skipped ({err})")
    except BuildError as err:
      print(f"{kind}: FAILED\n{err}", file=sys.stderr)
      status = 1
  return status
