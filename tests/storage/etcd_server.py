"""A real etcd server for tests, started in a temporary directory on free loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.ports import free_ports


def start_etcd(data_dir):
  """Yields the client endpoint; skips (with the reason) when etcd is not installed."""
  binary = shutil.which("etcd")
  if binary is None:
    pytest.skip("etcd is not installed (apt-get install etcd-server; .ci/run installs it)")
  client, peer = free_ports(2)
  endpoint = f"http://127.0.0.1:{client}"
  proc = subprocess.Popen([binary, "--data-dir", str(data_dir), "--listen-client-urls", endpoint,
                           "--advertise-client-urls", endpoint, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                           "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                           "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      with urllib.request.urlopen(endpoint + "/health", timeout=1) as response:
        if b"true" in response.read():
          break
    except OSError:
      pass
    if time.monotonic() > deadline or proc.poll() is not None:
      proc.kill()
      raise RuntimeError("etcd did not become healthy within 30 s")
    time.sleep(0.1)
  return proc, endpoint
