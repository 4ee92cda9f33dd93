"""The storage service: targets, CRAQ chains, resync."""

from storage.node.service import NotServing, StaleChain, StorageNode

__all__ = ["NotServing", "StaleChain", "StorageNode"]
