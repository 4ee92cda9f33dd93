"""Free loopback ports for test subprocesses, without handing the same port out twice.

A port found free and closed again can be taken by anyone before the child binds it. Children
that bind with SO_REUSEPORT (gRPC, so JAX's coordinator) can share a port this process keeps
bound (not listening) with SO_REUSEPORT, and the kernel never auto-assigns a bound port: the
reservation holds until the child is done. Others (etcd) get distinct ports, found together.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
  """A loopback port held for a child that binds it with SO_REUSEPORT, until the block ends."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]


def free_ports(count: int) -> list[int]:
  """`count` distinct loopback ports, free when this returns."""
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in sockets:  # all bound at once: no two the same
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
