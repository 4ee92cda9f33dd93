"""The metadata service: file-system semantics over the KV seam (3FS's stateless meta servers)."""

from storage.meta.namespace import Layout, Namespace, Stat, split_path

__all__ = ["Layout", "Namespace", "Stat", "split_path"]
