"""The synthetic load generators used by the demo, the benchmark and the tests."""

import numpy as np
import pytest

from balancer.synthetic import hot_expert_loads, zipf_loads


def test_shapes_totals_and_skew():
  zipf = zipf_loads(3, 16, exponent=1.0, num_tokens=1000, seed=0)
  hot = hot_expert_loads(3, 16, hot_share=0.5, num_tokens=1000, seed=0)
  for loads in (zipf, hot):
    assert loads.shape == (3, 16) and (loads.sum(-1) == 1000).all()
  assert (hot.max(-1) > 400).all()
  assert (np.sort(zipf, -1)[:, -1] > 3 * np.median(zipf, -1)).all()
  np.testing.assert_array_equal(zipf, zipf_loads(3, 16, exponent=1.0, num_tokens=1000, seed=0))


@pytest.mark.parametrize("call,message", [
    (lambda: zipf_loads(2, 4, num_tokens=1.5), "num_tokens must be a positive integer"),
    (lambda: zipf_loads(2, 4, exponent=float("nan")), "exponent must be a finite number"),
    (lambda: zipf_loads(2, 4, seed=-1), "seed must be a non-negative int"),
    (lambda: hot_expert_loads(2, 4, hot_share="x"), "hot_share must be a number in"),
    (lambda: hot_expert_loads(0, 4), "num_layers must be a positive integer"),
])
def test_bad_arguments(call, message):
  with pytest.raises(ValueError, match=message):
    call()
