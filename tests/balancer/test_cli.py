"""`python -m balancer`, run as a user would, in a subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.balancer.test_rebalance import README_WEIGHT


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "balancer", *args], capture_output=True, text=True, timeout=120,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_loads_file_prints_placement_and_saves_it(tmp_path, suffix):
  path = tmp_path / f"loads{suffix}"
  if suffix == ".npy":
    np.save(path, np.array(README_WEIGHT))
  else:
    path.write_text(json.dumps(README_WEIGHT))
  out = tmp_path / "placement.npz"
  result = run_cli("--loads", str(path), "--replicas=16", "--groups=4", "--nodes=2", "--gpus=8",
                   "--show_layers=2", f"--output={out}")
  assert result.returncode == 0, result.stderr
  assert "hierarchical policy" in result.stdout
  assert "no redundant experts" in result.stdout and "EPLB greedy" in result.stdout
  assert "EPLB + refine" in result.stdout
  assert "layer 1:" in result.stdout and "GPU   7:" in result.stdout
  saved = np.load(out)
  assert saved["phy2log"].shape == (2, 16) and saved["log2phy"].shape[:2] == (2, 12)


def test_demo_is_deepseek_v3_sized():
  result = run_cli("--demo")
  assert result.returncode == 0, result.stderr
  assert "58 layers x 256 experts -> 288 replicas on 32 GPUs (4 nodes, 8 groups)" in result.stdout
  rows = {line.split("  ")[1].strip(): line.split()[-2:] for line in result.stdout.splitlines()
          if line.startswith("  EPLB") or line.startswith("  no redundant")}
  greedy, refined = float(rows["EPLB greedy"][0]), float(rows["EPLB + refine"][0])
  assert refined <= greedy < float(rows["no redundant experts"][0])


@pytest.mark.parametrize("args,message", [
    ((), "exactly one of --demo or --loads"),
    (("--demo", "extra"), "unexpected arguments"),
    (("--loads", "/nonexistent.npy"), "does not exist"),
    (("--demo", "--gpus=7"), "num_replicas=288 must be a multiple of num_gpus=7"),
    (("--demo", "--output=/nonexistent/dir/x"), "its directory does not exist"),
    (("--loads", "{empty}"), "could not be read"),
    (("--loads", "{text}"), "must end in .npy or .json"),
])
def test_bad_usage_fails_with_a_message(tmp_path, args, message):
  (tmp_path / "empty.npy").write_bytes(b"")
  (tmp_path / "loads.txt").write_text("1 2 3")
  args = [a.format(empty=tmp_path / "empty.npy", text=tmp_path / "loads.txt") for a in args]
  result = run_cli(*args)
  assert result.returncode != 0
  assert message in result.stderr


def test_placement_report_rejects_a_bad_show_layers():
  from balancer import cli

  with pytest.raises(ValueError, match="show_layers must be a non-negative int"):
    cli.placement_report(np.ones((2, 12)), cli.Cluster(16, 4, 2, 8), show_layers="x")
