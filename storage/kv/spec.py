"""A KV engine named by a string, as binaries take it in a flag: `sqlite:PATH`, `etcd://HOST:PORT` or `memory`."""

from __future__ import annotations

from storage.kv.engine import KVEngine


def open_kv(spec: str) -> KVEngine:
  """The engine `spec` names; ValueError for anything else.

  `memory` lives in this process only (tests, a single server); SQLite is shared by the
  processes of one host; etcd by every host.
  """
  from storage.kv.etcd import EtcdKV
  from storage.kv.memory import MemoryKV
  from storage.kv.sqlite import SqliteKV
  if spec == "memory":
    return MemoryKV()
  if spec.startswith("sqlite:") and len(spec) > len("sqlite:"):
    return SqliteKV(spec[len("sqlite:"):])
  if spec.startswith("etcd://") and len(spec) > len("etcd://"):
    return EtcdKV("http://" + spec[len("etcd://"):])
  raise ValueError(f"a KV engine must be sqlite:PATH, etcd://HOST:PORT or memory, got {spec!r}")
