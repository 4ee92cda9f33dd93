"""A 3FS-style distributed file system (a smallpond-style data layer comes with the ecosystem issue).

`storage.kv`: the transactional KV seam (memory, SQLite, etcd). `storage.transport`: the RPC
transport (msgpack over TCP; the one module to replace for RDMA). `storage.cluster`: mgmtd,
leases, the target state machine and resync rules. `storage.meta`: the namespace and the meta
service. `storage.node` and `storage.chunks`: the storage service with CRAQ and checksummed
chunks. `storage.connect`: the client; `storage.ioring`: batched reads. `python -m storage`:
the services, a local cluster launcher, and client commands. Rebuilds 3FS.
"""

from storage.client import Client, connect

__all__ = ["Client", "connect"]
