"""A 3FS-style distributed file system and a smallpond-style data layer (in progress).

Built so far: the transactional KV seam (`storage.kv`: memory and SQLite backends), the chunk
store with CRAQ versions and checksums (`storage.chunks`), the RPC transport
(`storage.transport`), mgmtd with the target state machine and resync rules
(`storage.cluster`), the meta service (`storage.meta`), the storage service with CRAQ
(`storage.node`), and the client (`storage.connect`). Still to come: the command line and
cluster launcher, the etcd backend, the IoRing batched reads, and the data layer.
Rebuilds 3FS and smallpond.
"""

from storage.client import Client, connect

__all__ = ["Client", "connect"]
