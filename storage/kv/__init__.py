"""The transactional KV seam under the metadata service (3FS's IKVEngine), with its backends."""

from storage.kv.engine import Conflict, KVEngine, KVError, ReadOnlyError, Transaction, run_transaction
from storage.kv.etcd import EtcdKV
from storage.kv.memory import MemoryKV
from storage.kv.spec import open_kv
from storage.kv.sqlite import SqliteKV

__all__ = ["Conflict", "EtcdKV", "KVEngine", "KVError", "MemoryKV", "ReadOnlyError", "SqliteKV", "Transaction",
           "open_kv", "run_transaction"]
