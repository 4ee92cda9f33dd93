"""The one rule every op uses to pick its implementation."""

from __future__ import annotations

import pytest

from backends import select_and_run


def _backends(log):
  def refuses(x):
    log.append("fast")
    raise NotImplementedError("not this shape")

  return {"fast": refuses, "xla": lambda x: log.append("xla") or x + 1, "other": lambda x: x * 10}


def test_explicit_name_runs_that_backend():
  assert select_and_run("op", _backends([]), "other", {}, 3) == 30


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match=r"implementation='cuda' is not available for op; choose from \['fast', 'other', 'xla'\]"):
    select_and_run("op", _backends([]), "cuda", {}, 3)


def test_none_falls_through_not_implemented_in_preference_order():
  log = []
  assert select_and_run("op", _backends(log), None, {"cpu": ("missing", "fast", "xla")}, 3) == 4
  assert log == ["fast", "xla"]


def test_the_last_candidate_raises_for_itself():
  with pytest.raises(NotImplementedError, match="not this shape"):
    select_and_run("op", _backends([]), None, {"cpu": ("fast",)}, 3)


def test_unlisted_platform_uses_xla_and_empty_preferences_are_an_error():
  assert select_and_run("op", _backends([]), None, {"tpu": ("other",)}, 3) == 4
  with pytest.raises(ValueError, match="no implementation of op is preferred"):
    select_and_run("op", {"other": abs}, None, {}, 3)
