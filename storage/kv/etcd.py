"""An etcd v3 KV engine, for metadata shared by meta servers on several hosts.

Talks to etcd's JSON gateway (`/v3/kv/...`, etcd 3.4+) with the standard library. A
transaction reads at the store revision it began at, so its reads form one snapshot; commit is
one etcd `txn` whose compares fail if anything it read changed after that revision (see
`_commit`). A failed compare is a `Conflict`, retried by `run_transaction`.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from storage.kv.engine import Conflict, KVEngine, KVError, Transaction


def _b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
  return base64.b64decode(text)


class EtcdKV(KVEngine):
  """A KV engine over the etcd cluster at `endpoint` (e.g. "http://127.0.0.1:2379")."""

  max_ops_per_transaction = 128  # etcd's default --max-txn-ops: compares and puts/deletes, each

  def __init__(self, endpoint: str, *, timeout_s: float = 10.0):
    if not endpoint.startswith(("http://", "https://")):
      endpoint = "http://" + endpoint
    self.endpoint = endpoint.rstrip("/")
    self.timeout_s = timeout_s
    self.post("/v3/kv/range", {"key": _b64(b"\0")})  # fail now, not at the first transaction

  def post(self, path: str, body: dict) -> dict:
    request = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as err:
      raise KVError(f"etcd {path} failed: {err.code} {err.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as err:
      raise KVError(f"etcd at {self.endpoint} is unreachable: {err}") from None

  def read_only(self) -> Transaction:
    return _EtcdTransaction(self, read_only=True)

  def read_write(self) -> Transaction:
    return _EtcdTransaction(self, read_only=False)


class _EtcdTransaction(Transaction):
  def __init__(self, engine: EtcdKV, read_only: bool):
    super().__init__(read_only)
    self._engine = engine
    self._revision = int(engine.post("/v3/kv/range", {"key": _b64(b"\0")})["header"]["revision"])
    self._seen: dict[bytes, int] = {}  # key -> mod_revision, for keys read that existed
    self._read_keys: set[bytes] = set()
    self._read_ranges: list[tuple[bytes, bytes]] = []

  def _read(self, key: bytes) -> bytes | None:
    self._read_keys.add(key)
    reply = self._engine.post("/v3/kv/range", {"key": _b64(key), "revision": self._revision})
    kvs = reply.get("kvs", [])
    if not kvs:
      return None
    self._seen[key] = int(kvs[0]["mod_revision"])
    return _unb64(kvs[0].get("value", ""))

  def _read_range(self, begin: bytes, end: bytes, limit: int | None) -> list[tuple[bytes, bytes]]:
    self._read_ranges.append((begin, end))
    body = {"key": _b64(begin), "range_end": _b64(end), "revision": self._revision, "sort_order": "ASCEND",
            "sort_target": "KEY"}
    if limit is not None:
      body["limit"] = limit
    pairs = [(_unb64(kv["key"]), _unb64(kv.get("value", ""))) for kv in self._engine.post("/v3/kv/range", body).get("kvs", [])]
    return pairs

  def _commit(self, writes: dict[bytes, bytes | None]) -> None:
    # One compare per key read (etcd allows 128 operations per txn): a key seen must still have
    # the revision we read (a delete makes it 0); a key absent must still be older than our start.
    # A range gets one compare that catches new or changed keys; a key deleted from a range read
    # is not caught (the namespace only range-reads to check that a directory is empty).
    unchanged = str(self._revision + 1)
    compare = [{"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": str(self._seen[k])}
               if k in self._seen else {"key": _b64(k), "target": "MOD", "result": "LESS", "mod_revision": unchanged}
               for k in self._read_keys]
    compare += [{"key": _b64(b), "range_end": _b64(e), "target": "MOD", "result": "LESS", "mod_revision": unchanged}
                for b, e in self._read_ranges]
    success = [{"request_put": {"key": _b64(k), "value": _b64(v)}} if v is not None else
               {"request_delete_range": {"key": _b64(k)}} for k, v in writes.items()]
    reply = self._engine.post("/v3/kv/txn", {"compare": compare, "success": success})
    if not reply.get("succeeded", False):
      raise Conflict("a key this transaction read changed before it committed")
