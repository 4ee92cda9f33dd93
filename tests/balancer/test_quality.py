"""balancedness and gpu_loads on hand-computed placements, and their argument checks."""

import numpy as np
import pytest

from balancer import balancedness, gpu_loads, unbalanced_baseline


def test_gpu_loads_split_each_expert_evenly_over_its_replicas():
  weight = [[8.0, 2.0, 2.0]]
  phy2log = [[0, 1, 0, 2]]  # GPU 0: slots 0-1, GPU 1: slots 2-3
  logcnt = [[2, 1, 1]]
  np.testing.assert_allclose(gpu_loads(weight, phy2log, logcnt, 2), [[4.0 + 2.0, 4.0 + 2.0]])
  np.testing.assert_allclose(balancedness(weight, phy2log, logcnt, 2), [1.0])


def test_balancedness_is_max_over_mean_per_layer():
  weight = np.array([[6, 0, 3, 3], [1, 1, 1, 1]])
  phy2log = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_allclose(balancedness(weight, phy2log, np.ones((2, 4), int), 2), [6 / 6, 1.0])
  np.testing.assert_allclose(balancedness(weight, phy2log, np.ones((2, 4), int), 4), [6 / 3, 1.0])


def test_all_zero_layer_counts_as_balanced():
  np.testing.assert_array_equal(balancedness(np.zeros((1, 4)), [[0, 1, 2, 3]], np.ones((1, 4), int), 2), [1.0])


def test_unbalanced_baseline_uses_the_contiguous_layout():
  weight = np.array([[4, 0, 0, 0, 2, 2, 0, 0]])
  np.testing.assert_allclose(unbalanced_baseline(weight, 4), [4 / 2])
  # 8 experts on 3 GPUs: GPU g takes the experts with e*3//8 == g, i.e. {0,1,2}, {3,4,5}, {6,7}.
  np.testing.assert_allclose(unbalanced_baseline(weight, 3), [4 / (8 / 3)])


@pytest.mark.parametrize("phy2log,logcnt,num_gpus,message", [
    ([[0, 1, 2, 3, 0]], [[2, 1, 1, 1]], 2, "num_gpus=2 must divide"),
    ([[0, 1, 4, 2]], [[1, 1, 1, 1]], 2, "outside"),
    ([[0, 1, 1, 2]], [[1, 1, 1]], 2, "logcnt must be an int array shaped like weight"),
    ([[0, 1, 2, 3]], [[2, 1, 1, 1]], 2, "logcnt disagrees"),
    ([[0, 1, 1, 2]], [[1, 2, 1, 0]], 2, "phy2log gives 1 experts no replica, e.g. expert 3"),
    ([0, 1, 2, 3], [[1, 1, 1, 1]], 2, "phy2log must be an int"),
    ([[0, 1, 2, 3]], [[1, 1, 1, 1]], 0, "num_gpus must be a positive integer"),
])
def test_bad_placement_names_the_argument(phy2log, logcnt, num_gpus, message):
  with pytest.raises(ValueError, match=message):
    gpu_loads(np.ones((1, 4)), np.array(phy2log), np.array(logcnt), num_gpus)
