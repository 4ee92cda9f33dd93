"""The timing harness: it times what it is given, blocks on jax results, and records JSON lines."""

import json
import time

import jax.numpy as jnp
import pytest

from benchmarks.harness import append_results, format_table, time_fn


def test_time_fn_measures_the_call():
  calls = []

  def sleepy():
    calls.append(1)
    time.sleep(0.01)

  timing = time_fn(sleepy, warmup=2, repeats=5)
  assert len(calls) == 7 and timing.repeats == 5 and timing.warmup == 2
  assert 0.009 < timing.min_s <= timing.median_s <= timing.max_s < 1.0
  assert timing.iqr_s >= 0


def test_time_fn_blocks_on_jax_results():
  timing = time_fn(lambda x: {"y": x @ x}, jnp.ones((64, 64)), repeats=3)
  assert timing.median_s > 0


def test_time_fn_rejects_bad_counts():
  with pytest.raises(ValueError, match="repeats"):
    time_fn(lambda: None, repeats=0)


def test_append_results_stamps_each_record(tmp_path):
  path = append_results("demo", [{"case": "a", "median_ms": 1.0}, {"case": "b"}], command="python -m x",
                        path=tmp_path / "demo.jsonl")
  append_results("demo", [{"case": "c"}], command="python -m x", path=path)
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["case"] for r in records] == ["a", "b", "c"]
  for record in records:
    assert record["command"] == "python -m x" and record["date"] and record["machine"]["cores"] >= 1


def test_format_table_aligns_columns():
  table = format_table([{"case": "a", "ms": 1.5}, {"case": "long name"}], ["case", "ms"])
  header, rule, first, second = table.splitlines()
  assert header.index("ms") == first.index("1.5") == len("long name") + 2
  assert rule.startswith("-" * len("long name") + "  --")
  assert second.rstrip() == "long name"
