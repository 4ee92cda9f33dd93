"""pipeline.render draws a schedule's timeline to a PNG, from Python and from the command line."""

from __future__ import annotations

import subprocess
import sys


import pipeline
from pipeline import schedules

PNG = b"\x89PNG\r\n\x1a\n"


def test_render_writes_a_png(tmp_path):
  path = tmp_path / "dualpipev.png"
  pipeline.render(schedules.dualpipev(4, 10), path, FB=2.5)
  data = path.read_bytes()
  assert data.startswith(PNG) and len(data) > 20_000  # a drawn figure, not an empty canvas
  width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  assert width > height > 200


def test_command_line(tmp_path):
  out = tmp_path / "dp.png"
  done = subprocess.run([sys.executable, "-m", "pipeline.render", "--schedule", "dualpipe", "--ranks", "4",
                         "--chunks", "8", str(out)], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert out.read_bytes().startswith(PNG)
  bad = subprocess.run([sys.executable, "-m", "pipeline.render", "--schedule", "dualpipe", "--ranks", "3",
                        str(out)], capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "num_ranks must be even" in bad.stderr
