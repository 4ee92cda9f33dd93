"""A 3FS-style distributed file system and a smallpond-style data layer (not built yet).

Will hold: a transactional KV seam, the metadata service, cluster manager, storage service
with CRAQ chain replication, a Python client, an fsspec filesystem, the KV-cache store, and
DuckDB-based data processing. Rebuilds 3FS and smallpond.
"""
