"""Cluster management (3FS's mgmtd): target states, chains and chain tables, and resync decisions."""
