"""Shared storage fixtures: a real etcd server per test session (skipped with the reason when not installed)."""

import pytest

from tests.storage.etcd_server import start_etcd


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory):
  proc, endpoint = start_etcd(tmp_path_factory.mktemp("etcd"))
  yield endpoint
  proc.terminate()
  proc.wait(timeout=10)
