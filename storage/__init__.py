"""A 3FS-style distributed file system and a smallpond-style data layer (in progress).

Built so far: the transactional KV seam (`storage.kv`: memory and SQLite backends), the chunk
store with CRAQ versions and checksums (`storage.chunks`), the RPC transport (`storage.transport`),
and the cluster manager's target state machine and resync rules (`storage.cluster`). Still to
come: the mgmtd, meta and storage services, the client, the command line, and the data layer.
Rebuilds 3FS and smallpond.
"""
